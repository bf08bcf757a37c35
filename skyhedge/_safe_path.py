"""Takes the current directory off Python's path for `python -m skyhedge[.cli]`.

`python -m` puts the directory it runs in first on `sys.path`; the `skyhedge` console script does
not. Taken off again (as `python -m pip` does), a `module:Class` policy plug-in is imported from the
installed packages or `PYTHONPATH` only, never from a `.py` file that happens to lie where the
command runs, such as a GitOps checkout a pull request added it to (docs/policy.md, "Plug-in
policies"). The package itself is imported already by then, so a source checkout still runs.
"""

from __future__ import annotations

import os
import sys


def drop_current_directory() -> None:
    try:
        here = os.getcwd()
    except OSError:  # deleted under the shell: nothing can be imported from it anyway
        here = None
    if sys.path and sys.path[0] in ("", here):
        del sys.path[0]
