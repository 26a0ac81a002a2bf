"""Edge subcommands: `lineguard run` and `lineguard validate-config`.

Imports here stay light (no inference engine, no torch): the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Register edge subcommands."""
    p = sub.add_parser(
        "run",
        help="run every station of a site (cameras -> model -> MQTT defect events)",
        description=(
            "Run all stations listed in a site file until SIGTERM/SIGINT. Every defect event is "
            "written to a durable SQLite outbox first and published to the broker at QoS 1; "
            "without a broker in the site file, events are printed to stdout as JSON lines."
        ),
    )
    p.add_argument("--site", required=True, type=Path, metavar="FILE", help="site YAML file")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics on http://HOST:N/metrics (overrides the site's "
        "metrics.port; HOST from metrics.host, default 0.0.0.0)",
    )
    p.set_defaults(handler=_run)

    v = sub.add_parser(
        "validate-config",
        help="check site and station YAML files (errors name file, line and key)",
        description=(
            "Validate site and/or station files. A site file also validates every station file "
            "it lists. Each error is printed as FILE:LINE: KEY: MESSAGE; the exit code is 1 if "
            "any file is invalid. Secrets are never printed."
        ),
    )
    v.add_argument("files", nargs="+", type=Path, metavar="FILE", help="site or station YAML")
    v.add_argument(
        "--no-file-checks",
        action="store_true",
        help="skip the checks that need this machine: referenced files exist (model, TLS, "
        "password file), prompt images decode, password_env is set, outbox and audit log "
        "are writable",
    )
    v.add_argument("--show", action="store_true", help="print the resolved configuration as JSON")
    v.set_defaults(handler=_validate)


def _run(args: argparse.Namespace) -> int:
    from lineguard.runtime.config_loader import load_site
    from lineguard.runtime.service import Service

    loaded = load_site(args.site, check_local=True)  # everything checked before any write
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        print("lineguard run: error: --metrics-port must be 1..65535", file=sys.stderr)
        return 2
    return Service(loaded, metrics_port=args.metrics_port).run_forever()


def _validate(args: argparse.Namespace) -> int:
    from lineguard.runtime.config_loader import (
        ConfigError,
        detect_kind,
        display_path,
        load_site,
        load_station,
    )

    check_files = not args.no_file_checks
    failed = 0
    for path in args.files:
        try:
            if detect_kind(path) == "station":
                station = load_station(path, check_files=check_files)
                print(f"OK {display_path(path)}: station {station.line_id}/{station.station_id}")
                if args.show:
                    print(station.model_dump_json(indent=2))
                continue
            loaded = load_site(path, check_files=check_files, check_local=check_files)
        except ConfigError as exc:
            failed += 1
            for issue in exc.issues:
                print(str(issue), file=sys.stderr)
            continue
        site = loaded.site
        names = ", ".join(f"{s.line_id}/{s.station_id}" for s in loaded.stations)
        count = len(loaded.stations)
        print(f"OK {display_path(path)}: edge {site.edge_id}, {count} station(s): {names}")
        if site.broker is None:
            print("   broker: none (events to the outbox and stdout)")
        else:
            b = site.broker
            tls = " TLS" if b.tls else ""
            auth = f", user {b.username}" if b.username else ""
            if b.password_file or b.password_env:
                auth += f", password from {'file' if b.password_file else '$' + b.password_env}"
            print(f"   broker: {b.host}:{b.port}{tls}{auth}, client id {site.client_id()}")
        print(f"   outbox: {site.outbox.path}  audit log: {site.audit_log}")
        if not check_files:
            print(
                "   not checked (--no-file-checks): referenced files, prompt images, "
                "password_env, outbox/audit log writable"
            )
        if args.show:
            shown = {
                "site": json.loads(site.model_dump_json()),
                "stations": [json.loads(s.model_dump_json()) for s in loaded.stations],
            }
            print(json.dumps(shown, indent=2))
    return 1 if failed else 0
