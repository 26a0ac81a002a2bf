"""`lineguard bundle ...` and `lineguard deploy ...`.

Imports stay light at module level (argparse only): `lineguard --help` must not load cryptography,
paho or the inference engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_ROOT = os.environ.get("LINEGUARD_ROOT", "/var/lib/lineguard")


def _print(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human)


# ---- bundle ---------------------------------------------------------------------------------


def _bundle_build(args: argparse.Namespace) -> int:
    from lineguard.deploy.build import build_bundle

    res = build_bundle(
        artifact=args.artifact,
        stations=args.stations,
        version=args.version,
        out=args.out,
        site=args.site,
        sign_key=args.sign,
    )
    m = res.manifest
    total = sum(f.size for f in m.files.values())
    data = {
        "bundle": str(res.path),
        "sha256": res.sha256,
        "version": m.version,
        "signed": res.signed,
        "files": len(m.files),
        "bytes": total,
        "stations": [s.id for s in m.stations],
        "model": m.model.name,
    }
    human = (
        f"built {res.path} ({'signed' if res.signed else 'unsigned'})\n"
        f"  version  {m.version}\n  model    {m.model.name} {m.model.input_size} "
        f"{'/'.join(m.model.precisions) or '-'}\n"
        f"  stations {', '.join(data['stations'])}\n"
        f"  files    {len(m.files)} ({total / 1e6:.1f} MB)\n  sha256   {res.sha256}"
    )
    _print(args, data, human)
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from lineguard.deploy.bundle import verify_bundle

    v = verify_bundle(args.bundle, args.pubkey, require_signature=args.pubkey is not None)
    m = v.manifest
    if v.signature_checked:
        sig = f"valid signature ({v.key_fingerprint})"
    elif v.signed:
        sig = "signed, signature NOT checked (pass --pubkey)"
    else:
        sig = "unsigned"
    data = {
        "ok": True,
        "bundle": str(v.path),
        "sha256": v.sha256,
        "version": m.version,
        "signed": v.signed,
        "signature_checked": v.signature_checked,
        "key": v.key_fingerprint,
        "manifest": json.loads(v.manifest_bytes),
    }
    human = (
        f"OK {v.path}: {len(m.files)} files match manifest.json; {sig}\n"
        f"  version  {m.version} (built {m.created}, lineguard {m.runtime.lineguard}, "
        f"openvino {m.runtime.openvino or '-'}, onnxruntime {m.runtime.onnxruntime or '-'})\n"
        f"  model    {m.model.name} ({m.model.backbone}, classes: {', '.join(m.model.classes)})\n"
        f"  stations {', '.join(s.id for s in m.stations)}"
    )
    _print(args, data, human)
    return 0


def _bundle_keygen(args: argparse.Namespace) -> int:
    from lineguard.deploy.signing import generate_keypair, key_fingerprint, load_public_key

    priv, pub = generate_keypair(args.out, force=args.force)
    print(
        f"private key {priv} (keep secret)\npublic key  {pub} "
        f"({key_fingerprint(load_public_key(pub))}): copy it to each edge PC"
    )
    return 0


# ---- deploy ---------------------------------------------------------------------------------


def _options(args: argparse.Namespace):
    from lineguard.deploy.install import Options

    return Options(
        pubkey=args.pubkey,
        keep=getattr(args, "keep", 3),
        service=args.service,
        health_timeout=args.health_timeout,
        health_cmd=args.health_cmd,
        wait_online=args.wait_online,
        lock_timeout=None if args.lock_timeout < 0 else args.lock_timeout,
        inference=not args.no_inference,
        backend=args.backend,
        precision=args.precision,
        force=getattr(args, "force", False),
        publish=not args.no_publish,
    )


def _result(args: argparse.Namespace, res) -> int:
    data = res.as_dict()
    human = res.message
    if res.pruned:
        human += f"\n  pruned {', '.join(res.pruned)}"
    if res.published:
        human += f"\n  published on {res.published}"
    for station, r in (res.health.get("inference") or {}).items():
        if isinstance(r, dict) and "score" in r:
            human += f"\n  health {station}: ran on its prompt image, score {r['score']:.4g}"
    _print(args, data, human)
    return 0


def _install(args: argparse.Namespace) -> int:
    from lineguard.deploy.install import install

    return _result(args, install(args.bundle, args.root, _options(args)))


def _rollback(args: argparse.Namespace) -> int:
    from lineguard.deploy.install import rollback

    return _result(args, rollback(args.root, _options(args), to=args.to))


def _status(args: argparse.Namespace) -> int:
    from lineguard.deploy.releases import status

    st = status(args.root)
    lines = [
        f"root     {st['root']}",
        f"current  {st['current'] or '-'}"
        + ("  (BROKEN: release missing)" if st["current_broken"] else ""),
        f"previous {st['previous'] or '-'}",
        "releases:",
    ]
    for r in st["releases"]:
        mark = "*" if r["active"] else " "
        lines.append(
            f"  {mark} {r['version']:<20} model {r.get('model', '?'):<20} "
            f"stations {','.join(r.get('stations', []))}  "
            f"activated {r.get('last_activated') or 'never'}"
        )
    if st["last"]:
        last = st["last"]
        lines.append(
            f"last     {last.get('action')} {last.get('version')} at {last.get('time')}: "
            + ("ok" if last.get("ok") else f"FAILED: {last.get('error')}")
        )
    _print(args, st, "\n".join(lines))
    return 0 if not st["current_broken"] else 1


def _unit(args: argparse.Namespace) -> int:
    from lineguard.deploy.service import render_unit

    text = render_unit(args.root, args.bin, args.user, args.group)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _live_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        default=DEFAULT_ROOT,
        help="deploy root holding releases/ and current (default: $LINEGUARD_ROOT or %(default)s)",
    )
    p.add_argument(
        "--pubkey",
        type=Path,
        help="ed25519 public key (PEM): the bundle must carry a valid signature (default: "
        "ROOT/bundle-signing.pub when present)",
    )
    p.add_argument(
        "--service",
        metavar="NAME",
        help="systemd unit to restart after switching (e.g. lineguard.service)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds each live health step may take (default %(default)s)",
    )
    p.add_argument(
        "--health-cmd",
        metavar="CMD",
        help="shell command run after the switch; non-zero exit rolls back. Gets "
        "LINEGUARD_ROOT, LINEGUARD_RELEASE, LINEGUARD_VERSION, LINEGUARD_PREVIOUS",
    )
    p.add_argument(
        "--wait-online",
        choices=["auto", "yes", "no"],
        default="auto",
        help="wait for the runtime to report online on <prefix>/<edge>/available and every "
        "station online on <prefix>/<line>/<station>/status "
        "(auto: when --service is given and the site config names a broker)",
    )
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="wait this long for another install to finish; 0 fails at once, "
        "negative waits forever (default %(default)s)",
    )
    p.add_argument(
        "--no-inference",
        action="store_true",
        help="health check without loading the model (configs and sha256 only); without "
        "this, an inference engine that cannot be imported fails the install",
    )
    p.add_argument(
        "--backend",
        choices=["openvino", "onnxruntime"],
        help="engine backend for the health check (default: the station's)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "int8", "bf16"],
        help="precision for the health check (default: the station's)",
    )
    p.add_argument(
        "--no-publish",
        action="store_true",
        help="do not publish the active bundle on <prefix>/<edge>/bundle",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    """Register `bundle` and `deploy` command groups."""
    b = sub.add_parser(
        "bundle",
        help="build, sign and verify deployment bundles",
        description="A bundle is one tar.gz with manifest.json (versions, sha256 + size of every "
        "file, optional ed25519 signature), the model artifact, station configs and their images.",
    )
    bs = b.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    p = bs.add_parser(
        "build",
        help="pack a model artifact and station configs into a bundle",
        description="Copy the artifact, the station configs and every image they "
        "refer to into one archive; paths are rewritten relative to the bundle.",
    )
    p.add_argument(
        "--artifact", type=Path, required=True, help="model artifact folder (model.json)"
    )
    p.add_argument(
        "--stations",
        type=Path,
        required=True,
        help="folder of station configs (*.yaml) or one station config",
    )
    p.add_argument("--version", required=True, help="bundle version, e.g. 2026.11.23-1")
    p.add_argument("--site", type=Path, help="site config to ship as site.yaml")
    p.add_argument(
        "--sign", type=Path, metavar="KEY", help="ed25519 private key (PEM) to sign with"
    )
    p.add_argument("--out", type=Path, required=True, help="bundle file to write (.tar.gz)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_bundle_build)

    p = bs.add_parser(
        "verify",
        help="check a bundle's sizes, hashes and signature",
        description="Refuses links, absolute or '..' paths and unlisted files.",
    )
    p.add_argument("bundle", type=Path, help="bundle file")
    p.add_argument("--pubkey", type=Path, help="ed25519 public key: require a valid signature")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_bundle_verify)

    p = bs.add_parser(
        "keygen",
        help="create an ed25519 signing key pair",
        description="Writes KEY (mode 0600) and KEY.pub (PEM).",
    )
    p.add_argument("--out", type=Path, required=True, metavar="KEY", help="private key file")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(handler=_bundle_keygen)

    d = sub.add_parser(
        "deploy",
        help="install, roll back and inspect releases on an edge PC",
        description="Releases live in ROOT/releases/<version>; ROOT/current points at the active "
        "one and is switched atomically. A failed health check rolls back automatically.",
    )
    ds = d.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)

    p = ds.add_parser(
        "install",
        help="verify, unpack, health-check and activate a bundle",
        description="Verify -> unpack to releases/<V> -> validate configs and run "
        "the model once -> switch current -> restart the service and check it -> "
        "roll back on failure. One install at a time per root (lock).",
    )
    p.add_argument("bundle", type=Path, help="bundle file")
    _live_options(p)
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        metavar="K",
        help="keep the last K releases (default %(default)s)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="unpack again over an inactive installed release of the same version",
    )
    p.set_defaults(handler=_install)

    p = ds.add_parser(
        "rollback",
        help="switch back to the previous (or a named) release",
        description="Re-checks the release on disk, switches current, restarts the "
        "service; if that fails, current returns to where it was.",
    )
    p.add_argument("--to", metavar="VERSION", help="release to activate (default: the previous)")
    _live_options(p)
    p.set_defaults(handler=_rollback)

    p = ds.add_parser("status", help="show the active release, the rollback target and history")
    p.add_argument("--root", default=DEFAULT_ROOT, help="deploy root (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_status)

    p = ds.add_parser(
        "unit",
        help="render the systemd unit for a deploy root",
        description="Fills deploy/systemd/lineguard.service for ROOT.",
    )
    p.add_argument("--root", default=DEFAULT_ROOT, help="deploy root (default %(default)s)")
    p.add_argument("--bin", help="lineguard executable (default: the one running now)")
    p.add_argument("--user", default="lineguard", help="service user (default %(default)s)")
    p.add_argument("--group", help="service group (default: the user)")
    p.add_argument("--out", help="write here instead of stdout")
    p.set_defaults(handler=_unit)
