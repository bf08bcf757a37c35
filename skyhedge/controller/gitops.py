"""GitOps mode: instead of applying, write the re-rendered tree into a git working copy and commit.

For teams whose CI applies Terraform: `skyhedge watch SPEC --gitops REPO_DIR` keeps reacting to
preemptions, but its output is a commit on the checked-out branch of REPO_DIR (push it, or let a
CI job pick it up). The tree goes to `REPO_DIR/infra/` (the layout of examples/gitops); when the
state dir is inside the repository too, its `state.json` is committed with the tree. The commit
message says what was preempted, the new layout and the cost change. A plan that changes nothing
writes an identical tree, so git sees no change and no commit is made.

Replicas are recorded as provisioned (and, by the controller's `assume_ready`, READY) once
committed: the watcher cannot probe what CI has not applied yet, and counting them as missing
would make the policy buy on-demand fallback on every tick. The state records the mode
(`service.set_gitops`), so that `compute_plan` (the watcher's, and `plan`/`render` in CI) runs the
policy without on-demand fallback and counts a committed replacement for a rolling update only
once the readiness probe's initial delay has passed. A root a commit empties stays rendered for
a while (`apply.roots_with_resources`): nothing tells the watcher when CI has applied it.
Preemptions still arrive from the clouds' event sources.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skyhedge.apply import Workspace, instance_types, roots_with_resources
from skyhedge.controller.ports import ExecResult
from skyhedge.errors import RenderError, StateError
from skyhedge.planner import CREATE, DELETE, Plan
from skyhedge.render import render_tree, write_tree
from skyhedge.service import GITOPS_KEY, Placement, resolve_placement
from skyhedge.spec import ServiceSpec
from skyhedge.state import STATE_FILE, ServiceState

DEFAULT_SUBDIR = "infra"  # examples/gitops: infra/ holds the tree, state/ the state dir
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_GIT_ENV}
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise StateError(f"git {' '.join(args[:1])} in {repo}: {exc}") from exc
    if check and done.returncode != 0:
        raise StateError(f"git {' '.join(args)} in {repo} failed: {(done.stderr or done.stdout).strip()}")
    return done


def check_repo(repo: Path) -> Path:
    """REPO_DIR must be a git working copy (its top level or a folder inside one)."""
    if not repo.is_dir():
        raise StateError(f"{repo}: --gitops expects a git working copy (directory not found)")
    done = git(repo, "rev-parse", "--show-toplevel", check=False)
    if done.returncode != 0:
        raise StateError(
            f"{repo}: --gitops expects a git working copy (`git init` it or clone your repository)"
        )
    return Path(done.stdout.strip())


def commit_message(
    service: str, plan: Plan, state: ServiceState, since: float | None, before: float | None
) -> str:
    """Subject: what happened; body: what was preempted, the new layout, the cost change."""
    lost = [
        h
        for h in state.history
        if h.get("event") in {"preempted", "launch_failed"}
        and (since is None or float(h.get("at", 0)) > since)
    ]
    creates = [r for r in plan.replicas if r.action == CREATE]
    deletes = [r for r in plan.replicas if r.action == DELETE]
    s = plan.summary()
    who = sorted({h["replica_id"] for h in lost if h.get("replica_id")})
    if who:
        subject = f"skyhedge: {service}: replace preempted {', '.join(who)}"
    elif lost:
        zones = sorted({str(h.get("location", "?")) for h in lost})
        subject = f"skyhedge: {service}: move off preempted {', '.join(zones)}"
    elif creates and not deletes:
        subject = f"skyhedge: {service}: scale to {len(plan.desired)} replicas"
    elif deletes and not creates:
        subject = f"skyhedge: {service}: remove {', '.join(r.id for r in deletes)}"
    else:
        subject = f"skyhedge: {service}: re-render ({s['spot']} spot / {s['on_demand']} on-demand)"
    lines = [subject, ""]
    if lost:
        lines.append("Preempted:")
        for h in lost:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(h.get("at", 0))))
            what = "launch refused" if h.get("event") == "launch_failed" else "preempted"
            lines.append(f"  {h.get('replica_id') or 'zone'} in {h.get('location', '?')} ({what} at {when})")
        lines.append("")
    zones = Counter((r.location.key, r.market.value) for r in plan.desired)
    zones_used = f"{s['zones_used']} zone{'' if s['zones_used'] == 1 else 's'}"
    lines.append(f"New layout ({s['spot']} spot, {s['on_demand']} on-demand, {zones_used}):")
    for (where, market), n in sorted(zones.items()):
        lines.append(f"  {n} x {market} in {where}")
    for r in creates:
        lines.append(f"  + {r.id} {r.location.key} {r.market.value}")
    for r in deletes:
        lines.append(f"  - {r.id} {r.location.key} {r.market.value}")
    lines.append("")
    after = float(s["hourly_cost"])
    if before is None:
        lines.append(f"Cost: ${after:.4f}/h (on-demand only: ${s['ondemand_only_hourly_cost']:.4f}/h)")
    else:
        lines.append(
            f"Cost: ${before:.4f}/h -> ${after:.4f}/h ({after - before:+.4f}; on-demand only: "
            f"${s['ondemand_only_hourly_cost']:.4f}/h)"
        )
    return "\n".join(lines) + "\n"


class GitOpsExecutor:
    """`Executor` that renders into `repo/subdir` and commits instead of running Terraform.

    `apply` renders and stages the tree and records the committed layout in the state; `finish`,
    called by the controller once the pass has saved the state, commits the tree together with
    that final `state.json`, so the working copy is clean right after a commit and CI re-renders
    from exactly the state the watcher ended the pass with.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        state_dir: Path,
        repo: Path,
        *,
        subdir: str | None = None,
        placement: Placement | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.top = check_repo(Path(repo))
        where = subdir if subdir is not None else DEFAULT_SUBDIR
        self.out = (Path(repo) / where).resolve()
        if self.out == self.top:
            raise StateError(
                f"{repo}: --gitops writes the tree into a folder of the repository, not its top level"
            )
        if not self.out.is_relative_to(self.top) or self.out.is_relative_to(self.top / ".git"):
            raise StateError(
                f"--gitops-path {where}: must name a folder inside the repository {self.top} "
                "(and not inside .git)"
            )
        if git(self.top, "symbolic-ref", "-q", "HEAD", check=False).returncode != 0:
            raise StateError(
                f"{self.top}: HEAD is detached; check out the branch the watcher should commit to"
            )
        self.workspace = Workspace(spec, state_dir)
        self.state_file = self.workspace.state_dir / STATE_FILE
        # the state's path in the repository (None: kept outside it, so never committed)
        state_path = self.state_file.resolve()
        inside = state_path.is_relative_to(self.top)
        self.state_rel = str(state_path.relative_to(self.top)) if inside else None
        if inside and git(self.top, "check-ignore", "-q", "--", str(state_path), check=False).returncode == 0:
            raise StateError(
                f"{state_path}: the state is ignored by git, so CI could not "
                "re-render the committed tree from it; ignore only state.lock, tf/ and local/ of "
                "the state dir, or keep the state dir outside the repository"
            )
        self.placement = placement or resolve_placement(spec)
        self.clock = clock
        self.commits: list[str] = []
        self._pending: str | None = None  # the message of the commit `finish` owes

    def apply(self, state: ServiceState, plan: Plan, now: float) -> ExecResult:
        tree = render_tree(
            self.spec,
            plan,
            context=self.workspace.context(),
            instance_types=instance_types(state, self.placement),
            extra_roots=roots_with_resources(state, now),
        )
        try:
            write_tree(tree, self.out)
        except RenderError as exc:
            return ExecResult(errors=(str(exc),))
        rel = str(self.out.relative_to(self.top))
        git(self.top, "add", "-A", "--", rel)
        staged = git(self.top, "diff", "--cached", "--quiet", "--", rel, check=False).returncode != 0
        info = state.extra.setdefault(GITOPS_KEY, {})
        if staged:
            self._pending = commit_message(
                self.spec.name, plan, state, info.get("committed_at"), info.get("hourly_cost")
            )
            info.update({"committed_at": now, "hourly_cost": plan.hourly_cost})
        # What CI will apply: roots emptied by this commit stay rendered a while (roots_with_resources)
        before = info.get("roots") if isinstance(info.get("roots"), dict) else {}
        roots: dict[str, dict[str, Any]] = {}
        for root in tree.roots:
            if root.replicas:
                roots[root.path] = {"replicas": list(root.replicas)}
            else:
                emptied = (before.get(root.path) or {}).get("emptied_at")
                roots[root.path] = {"replicas": [], "emptied_at": now if emptied is None else emptied}
        info["roots"] = roots
        done = self.clock()
        for r in plan.replicas:  # CI applies what was committed: record it as the new layout
            rec = state.replicas.get(r.id)
            if rec is None or rec.gone_at is not None:
                continue
            if r.action == DELETE:
                rec.gone_at, rec.reason, rec.draining = done, "terminated", False
            elif rec.provisioned_at is None:
                rec.provisioned_at = done
        return ExecResult()

    def finish(self, state: ServiceState) -> str:
        """Commit the staged tree with the saved state; returns a note ('' when nothing to commit).
        A failed commit raises (StateError) and is retried by the next pass."""
        if self._pending is None:
            return ""
        rel = str(self.out.relative_to(self.top))
        paths = [rel]
        if self.state_rel is not None and self.state_file.is_file():
            paths.append(self.state_rel)  # same commit: CI re-rendering from it gets this tree
        git(self.top, "add", "-A", "--", *paths)
        identity: list[str] = []
        for key, default in (("user.name", "skyhedge"), ("user.email", "skyhedge@localhost")):
            if git(self.top, "config", key, check=False).returncode != 0:
                identity += ["-c", f"{key}={default}"]
        git(self.top, *identity, "commit", "-q", "-m", self._pending, "--", *paths)
        sha = git(self.top, "rev-parse", "--short", "HEAD").stdout.strip()
        self.commits.append(sha)
        subject = self._pending.splitlines()[0]
        self._pending = None
        return f"gitops: committed {sha} in {self.top}: {subject}"
