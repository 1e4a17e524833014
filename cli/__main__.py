"""`python -m ensc.cli` runs the `ensc` command."""

from ensc.cli.main import main

main()
