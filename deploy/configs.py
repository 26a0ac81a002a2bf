"""The one place deploy reads station and site configs.

Validation is the runtime's (`lineguard.runtime.config_loader`: pydantic models, errors naming
file, line and key), so a bundle is checked exactly as `lineguard run` will read it. Bundling
additionally works on the raw YAML, to copy in the files a config refers to and rewrite their
paths relative to the bundle while leaving every other key as written.

Path convention (the runtime's): a relative path is relative to the directory of its YAML file.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lineguard.runtime.artifact import MODEL_JSON
from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)

YAML_SUFFIXES = {".yaml", ".yml"}
# Keys of a station config that name files the bundle must carry (StationConfig fields).
PROMPT_KEY = ("prompt", "image")
MODEL_KEY = ("model",)
# Site keys that name machine-local secrets: never bundled, so they must be absolute paths.
SITE_LOCAL_KEYS = (
    ("broker", "tls", "ca"),
    ("broker", "tls", "cert"),
    ("broker", "tls", "key"),
    ("broker", "password_file"),
)


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


def read_mapping(path: Path, kind: str) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise LineGuardError(f"{path}: a {kind} config must be a mapping of keys")
    return data


def dump_yaml(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def get_key(data: Any, key: tuple[str, ...]) -> Any:
    node = data
    for k in key:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def set_key(data: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value


def resolve(value: Any, base: Path) -> Path | None:
    """A config path as the runtime resolves it (relative to the YAML file's folder)."""
    if not isinstance(value, str) or not value:
        return None
    p = Path(os.path.expanduser(value))
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def is_artifact_dir(p: Path) -> bool:
    return p.is_dir() and (p / MODEL_JSON).is_file()


def station_id(data: dict[str, Any], path: Path) -> str:
    sid = data.get("station_id")
    if not isinstance(sid, str) or not sid:
        raise LineGuardError(f"{path}: station_id is missing")
    return sid


def site_station_files(data: dict[str, Any], site: Path) -> list[Path]:
    """The station files a site's `stations` patterns match (as the runtime expands them)."""
    patterns = data.get("stations")
    if not isinstance(patterns, list):
        raise LineGuardError(f"{site}: stations must be a list of files or glob patterns")
    files: list[Path] = []
    for pattern in patterns:
        full = resolve(str(pattern), site.parent.absolute())
        assert full is not None
        matches = (
            sorted(Path(m) for m in glob.glob(str(full)))
            if glob.has_magic(str(pattern))
            else ([full] if full.is_file() else [])
        )
        if not matches:
            raise LineGuardError(f"{site}: stations: no file matches {pattern}")
        files.extend(m for m in matches if m not in files)
    return files


def check_site_local_paths(data: dict[str, Any], site: Path) -> None:
    for key in SITE_LOCAL_KEYS:
        value = get_key(data, key)
        if isinstance(value, str) and not Path(os.path.expanduser(value)).is_absolute():
            raise LineGuardError(
                f"{site}: {'.'.join(key)}: {value!r} must be an absolute path on the edge PC "
                "(certificates and secrets stay on the machine, they are not bundled)"
            )


# ---- validation through the runtime's config models ---------------------------------------------


def validate_station_file(path: Path, check_files: bool = True) -> Any:
    """The runtime's StationConfig for `path`; ConfigError lists every problem with its line."""
    from lineguard.runtime.config_loader import load_station

    return load_station(path, check_files=check_files)


def validate_site_file(path: Path, check_files: bool = True) -> Any:
    """The runtime's LoadedSite (site plus its stations) for `path`."""
    from lineguard.runtime.config_loader import load_site

    return load_site(path, check_files=check_files)


# ---- broker settings for deploy's own MQTT clients ---------------------------------------------


@dataclass
class BrokerInfo:
    host: str
    port: int
    prefix: str
    edge_id: str
    config: Any = None  # lineguard.runtime.config.BrokerConfig: TLS and credentials


def broker_info(site_path: Path) -> BrokerInfo | None:
    """Broker, topic prefix and edge id of a site config; None when it names no broker."""
    if not site_path.is_file():
        return None
    site = validate_site_file(site_path).site
    if site.broker is None:
        return None
    return BrokerInfo(
        host=site.broker.host,
        port=site.broker.port,
        prefix=site.topic_prefix,
        edge_id=site.edge_id,
        config=site.broker,
    )
