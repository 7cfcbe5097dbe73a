"""`python -m unionfs` is the `unionfs` command."""

from .cli import run

run()
