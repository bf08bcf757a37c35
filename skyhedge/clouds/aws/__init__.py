"""The AWS cloud: render inputs (render.py), events and reconcile (events.py), setup (setup.py)."""

from __future__ import annotations

from typing import Any

from skyhedge.errors import CloudError

__all__ = ["new_session"]


def new_session() -> Any:
    """A `boto3.Session` from the usual chain (env, `AWS_PROFILE`, config files, instance role).

    A mistyped `AWS_PROFILE` makes boto3 raise `ProfileNotFound` right here, before any call:
    turned into one line naming it, like every other credentials problem.
    """
    import boto3  # imported here so that loading skyhedge never needs boto3
    from botocore.exceptions import BotoCoreError

    try:
        return boto3.Session()
    except BotoCoreError as exc:
        raise CloudError(f"aws: {exc}") from exc
