"""Subcommands of the `maskloom` CLI, one module each (see maskloom/cli.py)."""
