"""Ed25519 keys and signatures for bundle manifests.

Only `manifest.json` is signed: it holds the sha256 and size of every other file, so one
signature over it covers the whole bundle. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo
public) so that `openssl pkey` and other tools can read them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lineguard.runtime.errors import LineGuardError

SIGNATURE_SIZE = 64


def generate_keypair(private_path: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new private key (mode 0600) and its public key next to it as `<name>.pub`."""
    priv = Path(private_path)
    pub = priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() and not force:
            raise LineGuardError(f"{p} already exists (use --force to overwrite)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    priv.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start: a world-readable window would leak the signing key.
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(priv, 0o600)
    pub.write_bytes(public_pem(key.public_key()))
    return priv, pub


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise LineGuardError(f"{p}: signing key not found") from exc
    except (ValueError, TypeError) as exc:
        raise LineGuardError(f"{p}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LineGuardError(f"{p}: not an ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except FileNotFoundError as exc:
        raise LineGuardError(f"{p}: public key not found") from exc
    except ValueError as exc:
        raise LineGuardError(f"{p}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LineGuardError(f"{p}: not an ed25519 public key")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(data)


def check_signature(data: bytes, signature: bytes, key: Ed25519PublicKey, where: str) -> None:
    """Raise a LineGuardError naming `where` unless `signature` is valid for `data`."""
    if len(signature) != SIGNATURE_SIZE:
        raise LineGuardError(f"{where}: signature has {len(signature)} bytes, expected 64")
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise LineGuardError(
            f"{where}: signature does not match manifest.json for this public key "
            "(tampered bundle or wrong key)"
        ) from exc


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """Short sha256 of the raw public key, to show which key signed/verified a bundle."""
    import hashlib

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]
