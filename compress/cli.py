"""compress subcommands."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Register compress subcommands."""
