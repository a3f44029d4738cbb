"""`python -m lumos` runs the command line."""

from lumos.cli import app

app()
