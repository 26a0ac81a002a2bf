"""data and evaluate subcommands."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Register data subcommands."""
