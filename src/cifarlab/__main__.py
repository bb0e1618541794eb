"""`python -m cifarlab` is the `cifarlab` command."""

from .cli import main

main()
