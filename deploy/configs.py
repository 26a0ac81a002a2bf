"""The one place deploy reads station and site configs.

Bundling needs to know which files a config refers to (prompt images, masks, the model artifact,
the station files a site lists) so it can copy them in and rewrite the paths relative to the
bundle; installing needs to validate the configs. The runtime's pydantic models
(`lineguard.runtime.config`) are the authority for validation; the reference walk below only
looks at values, so it keeps working whatever the runtime names its keys.

Convention (shared with the runtime loader): a relative path in a YAML file is relative to the
directory of that file.
"""

from __future__ import annotations

import importlib
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lineguard.runtime.artifact import MODEL_JSON, sha256_file
from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
YAML_SUFFIXES = {".yaml", ".yml"}

KeyPath = tuple[str | int, ...]


@dataclass
class Ref:
    """A string value in a config that names a file or folder we ship."""

    key: KeyPath
    value: str
    target: Path  # resolved absolute path


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise LineGuardError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise LineGuardError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc


def dump_yaml(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _walk(node: Any, key: KeyPath = ()) -> Iterator[tuple[KeyPath, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*key, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*key, i))
    elif isinstance(node, str):
        yield key, node


def _resolve(value: str, base: Path) -> Path | None:
    if not value or "\n" in value or "://" in value or len(value) > 4096:
        return None
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    try:
        return p.resolve() if p.exists() else None
    except OSError:
        return None


def is_artifact_dir(p: Path) -> bool:
    return p.is_dir() and (p / MODEL_JSON).is_file()


def file_refs(data: Any, base: Path, accept: Callable[[Path], bool]) -> list[Ref]:
    """String values that resolve (relative to `base`) to an existing path `accept` likes."""
    refs = []
    for key, value in _walk(data):
        target = _resolve(value, base)
        if target is not None and accept(target):
            refs.append(Ref(key, value, target))
    return refs


def image_refs(data: Any, base: Path) -> list[Ref]:
    return file_refs(data, base, lambda p: p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def artifact_refs(data: Any, base: Path) -> list[Ref]:
    return file_refs(data, base, is_artifact_dir)


def set_key(data: Any, key: KeyPath, value: Any) -> None:
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value


def get_key(data: Any, key: KeyPath) -> Any:
    node = data
    for k in key:
        node = node[k]
    return node


def station_id(data: Any, path: Path) -> str:
    """The id a station states (`station_id` / `id`), else its file name."""
    if isinstance(data, dict):
        for k in ("station_id", "id", "station"):
            v = data.get(k)
            if isinstance(v, str) and v:
                return v
    return path.stem


def check_prompt_hashes(data: Any, base: Path, where: Path) -> None:
    """Where a mapping holds an image path next to a `sha256`, the image must match it."""
    for key, value in _walk(data):
        if not key or key[-1] == "sha256":
            continue
        parent = get_key(data, key[:-1]) if len(key) > 1 else data
        if not isinstance(parent, dict) or not isinstance(parent.get("sha256"), str):
            continue
        target = _resolve(value, base)
        if target is None or not target.is_file() or target.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if sha256_file(target) != parent["sha256"].lower():
            dotted = ".".join(str(k) for k in key)
            raise LineGuardError(f"{where}: {dotted}: {value} does not match its sha256")


# ---- validation through the runtime's config models (when present) ------------------------------


def _runtime_config() -> Any | None:
    try:
        return importlib.import_module("lineguard.runtime.config")
    except ImportError:
        return None


def _call_loader(mod: Any, names: tuple[str, ...], path: Path) -> Any | None:
    for name in names:
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn(path)
    return None


def validate_station_file(path: Path) -> Any:
    """Validate one station config: the runtime's model when available, else YAML + references."""
    mod = _runtime_config()
    if mod is not None:
        loaded = _call_loader(mod, ("load_station", "load_station_config"), path)
        if loaded is not None:
            return loaded
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise LineGuardError(f"{path}: a station config must be a mapping")
    check_prompt_hashes(data, path.parent, path)
    return data


def validate_site_file(path: Path) -> Any:
    mod = _runtime_config()
    if mod is not None:
        loaded = _call_loader(mod, ("load_site", "load_site_config"), path)
        if loaded is not None:
            return loaded
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise LineGuardError(f"{path}: a site config must be a mapping")
    return data


def runtime_validation_available() -> bool:
    mod = _runtime_config()
    return mod is not None and any(
        callable(getattr(mod, n, None)) for n in ("load_station", "load_station_config")
    )


# ---- broker settings for publishing the bundle state ---------------------------------------------


@dataclass
class BrokerInfo:
    host: str
    port: int = 1883
    prefix: str = "lineguard"
    edge_id: str = "edge"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    site: Any = None  # the runtime's SiteConfig when it was loaded through it


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if not isinstance(obj, dict) and hasattr(obj, n):
            return getattr(obj, n)
    return default


def broker_info(site_path: Path) -> BrokerInfo | None:
    """Broker address, prefix and edge id from a site config; None when no broker is set."""
    if not site_path.is_file():
        return None
    site = validate_site_file(site_path)
    mqtt = _attr(site, "mqtt", "broker")
    if mqtt is None:
        return None
    host = _attr(mqtt, "host", "hostname", "address")
    if not host:
        return None
    tls = _attr(mqtt, "tls", default=None)
    password = _attr(mqtt, "password")
    if hasattr(password, "get_secret_value"):
        password = password.get_secret_value()
    prefix = _attr(mqtt, "topic_prefix", "prefix") or _attr(site, "topic_prefix", "prefix")
    edge = _attr(site, "edge_id", "edge") or _attr(mqtt, "edge_id") or socket.gethostname()
    return BrokerInfo(
        host=str(host),
        port=int(_attr(mqtt, "port", default=1883) or 1883),
        prefix=str(prefix or "lineguard"),
        edge_id=str(edge),
        username=_attr(mqtt, "username", "user"),
        password=password,
        tls=bool(tls),
        ca_file=_attr(tls, "ca_file", "ca", "cafile") if tls not in (None, True, False) else None,
        site=None if isinstance(site, dict) else site,
    )
