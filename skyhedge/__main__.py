"""`python -m skyhedge ...` runs the CLI."""

from skyhedge.cli import main

main()
