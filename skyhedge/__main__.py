"""`python -m skyhedge ...` runs the CLI, with the current directory off Python's path (_safe_path)."""

from skyhedge._safe_path import drop_current_directory

drop_current_directory()

from skyhedge.cli import main  # noqa: E402 - after the path is made safe

main()
