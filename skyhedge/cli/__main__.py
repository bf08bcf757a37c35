"""`python -m skyhedge.cli ...` runs the CLI (handy without the console script on PATH), with the
current directory off Python's path (skyhedge/_safe_path.py)."""

from skyhedge._safe_path import drop_current_directory

drop_current_directory()

from skyhedge.cli import main  # noqa: E402 - after the path is made safe

main()
