"""Subcommands of `mailplat` that live outside cli.py, each with `register(sub, common)`."""
