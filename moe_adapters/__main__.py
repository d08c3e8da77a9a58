"""`python -m moe_adapters` runs the command-line tool."""

from moe_adapters.cli import main

main()
