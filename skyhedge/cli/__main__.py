"""`python -m skyhedge.cli ...` runs the CLI (handy without the console script on PATH)."""

from skyhedge.cli import main

main()
