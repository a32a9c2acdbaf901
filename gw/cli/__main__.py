"""`python -m gw.cli`: the same as the `oakestra-gw` entry point."""

from . import main

main()
