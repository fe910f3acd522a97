"""``python -m esft_rs`` runs the CLI."""

from esft_rs.cli import run

run()
