"""``python -m streams``: the command line (``streams.cli.run``)."""

from streams.cli import run

run()
