"""`python -m superweight.cli`: the same as the `superweight` command."""

from superweight.cli import main

main()
