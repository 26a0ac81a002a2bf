"""Edge subcommands (placeholder until the runtime lands)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Register edge subcommands."""
