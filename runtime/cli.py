"""The single `lineguard` command: a thin dispatcher over subcommands registered by each stage.

Stages register through the `lineguard.commands` entry-point group (see pyproject.toml), so this
module imports no stage by name and no torch; a stage's `register` must itself stay torch-free at
import time and import heavy libraries only inside the handler it installs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from lineguard.runtime.errors import LineGuardError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lineguard",
        description=(
            "LineGuard: train a OneNIP anomaly model, compress it to OpenVINO/ONNX INT8, run it "
            "on line cameras and publish defect events over MQTT."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="lineguard.commands"), key=lambda e: e.name):
        register = ep.load()
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except LineGuardError as exc:
        print(f"lineguard {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
