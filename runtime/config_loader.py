"""Load site/station YAML into the config models with errors that name file, line and key.

PyYAML's `compose` keeps a node tree with marks; we build the plain data from it ourselves and
remember the line of every key, so a pydantic error location such as `('thresholds', 'image')`
maps back to `stations/s1.yaml:12: thresholds.image: ...`. Duplicate keys (which `safe_load`
silently overwrites) are errors too.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lineguard.runtime.config import StationConfig
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.site_config import SiteConfig

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one file: printed as `file:line: key: message`."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(LineGuardError):
    """Every issue found in a config (site plus its stations), one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("invalid configuration:\n  " + "\n  ".join(str(i) for i in issues))


def display_path(path: Path) -> str:
    """Path as the user will recognise it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


class _Builder:
    """Turns a composed YAML node tree into Python data plus `{loc: line}`."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.issues: list[ConfigIssue] = []
        self._scalars = yaml.SafeLoader("")

    def build(self, node: yaml.Node, loc: Loc = ()) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self._scalars.flatten_mapping(node)  # YAML merge keys (<<)
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalars.construct_object(key_node) if key_node.value else ""
                if not isinstance(key_node, yaml.ScalarNode) or not isinstance(key, str | int):
                    self._issue(key_node, loc, "mapping keys must be plain names")
                    continue
                key = str(key)
                if key in out:
                    self._issue(key_node, (*loc, key), "duplicate key")
                    continue
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        return self._scalars.construct_object(node, deep=True)

    def _issue(self, node: yaml.Node, loc: Loc, message: str) -> None:
        key = ".".join(str(p) for p in loc)
        self.issues.append(ConfigIssue(self.file, node.start_mark.line + 1, key, message))


@dataclass
class ParsedYaml:
    """Data of one YAML file, the line of every key, and problems found while parsing."""

    path: Path
    data: Any
    lines: dict[Loc, int]
    issues: list[ConfigIssue] = field(default_factory=list)

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest part of `loc` that exists in the file (a missing key: its parent)."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def parse_yaml(path: Path) -> ParsedYaml:
    """Read YAML keeping lines; syntax errors and unreadable files become issues, not exceptions."""
    shown = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return ParsedYaml(path, None, {}, [ConfigIssue(shown, None, "", exc.strerror or str(exc))])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = f"YAML syntax: {exc.problem or exc.context}"
        return ParsedYaml(path, None, {}, [ConfigIssue(shown, line, "", msg)])
    except yaml.YAMLError as exc:
        return ParsedYaml(path, None, {}, [ConfigIssue(shown, None, "", f"YAML: {exc}")])
    if node is None:
        return ParsedYaml(path, None, {}, [ConfigIssue(shown, 1, "", "file is empty")])
    builder = _Builder(shown)
    data = builder.build(node)
    return ParsedYaml(path, data, builder.lines, builder.issues)


def _validate(
    model: type[M], parsed: ParsedYaml, check_files: bool, check_local: bool = False
) -> tuple[M | None, list[ConfigIssue]]:
    shown = display_path(parsed.path)
    issues = list(parsed.issues)
    if parsed.data is None and not issues:
        issues.append(ConfigIssue(shown, 1, "", "file is empty"))
    if issues:
        return None, issues
    if not isinstance(parsed.data, dict):
        return None, [ConfigIssue(shown, 1, "", "expected a mapping of keys at the top level")]
    context = {
        "base_dir": parsed.path.parent.absolute(),
        "check_files": check_files,
        "check_local": check_local,
    }
    try:
        return model.model_validate(parsed.data, context=context), []
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            msg = err["msg"].removeprefix("Value error, ")
            issues.append(ConfigIssue(shown, parsed.line_of(loc), key, msg))
        return None, sorted(issues, key=lambda i: i.line or 0)


def load_station(path: str | Path, check_files: bool = True) -> StationConfig:
    """Load and validate one station file (ConfigError lists every problem)."""
    config, issues = _validate(StationConfig, parse_yaml(Path(path)), check_files)
    if issues or config is None:
        raise ConfigError(issues)
    return config


@dataclass
class LoadedSite:
    """A validated site and its stations, with the files they came from."""

    path: Path
    site: SiteConfig
    stations: list[StationConfig]
    station_files: list[Path]


def _expand_stations(site_path: Path, parsed: ParsedYaml, site: SiteConfig):
    base = site_path.parent.absolute()
    files: list[Path] = []
    issues: list[ConfigIssue] = []
    for i, pattern in enumerate(site.stations):
        full = Path(os.path.expanduser(pattern))
        full = full if full.is_absolute() else base / full
        if glob.has_magic(pattern):
            matches = sorted(Path(m) for m in glob.glob(str(full)))
        else:
            matches = [full] if full.is_file() else []
        if not matches:
            shown = display_path(site_path)
            line = parsed.line_of(("stations", i))
            issues.append(ConfigIssue(shown, line, f"stations.{i}", f"no file matches {pattern}"))
        files.extend(m for m in matches if m not in files)
    return files, issues


def load_site(path: str | Path, check_files: bool = True, check_local: bool = False) -> LoadedSite:
    """Load a site file and every station file it names; all problems are reported together.

    `check_local` (validate-config, run): also what only this machine can tell, i.e. that
    `broker.password_env` is set and the outbox and audit log can be created and written.
    """
    site_path = Path(path)
    parsed = parse_yaml(site_path)
    site, issues = _validate(SiteConfig, parsed, check_files, check_local)
    if site is None:
        raise ConfigError(issues)
    files, issues = _expand_stations(site_path, parsed, site)
    stations: list[StationConfig] = []
    seen: dict[str, Path] = {}
    for file in files:
        station_parsed = parse_yaml(file)
        station, station_issues = _validate(StationConfig, station_parsed, check_files)
        issues.extend(station_issues)
        if station is None:
            continue
        if station.station_id in seen:
            other = display_path(seen[station.station_id])
            msg = f"station_id '{station.station_id}' is also used by {other}"
            line = station_parsed.line_of(("station_id",))
            issues.append(ConfigIssue(display_path(file), line, "station_id", msg))
            continue
        seen[station.station_id] = file
        stations.append(station)
    if issues:
        raise ConfigError(issues)
    return LoadedSite(site_path, site, stations, files)


def detect_kind(path: Path) -> str:
    """'site' or 'station', from the top-level keys (a station file has station_id)."""
    parsed = parse_yaml(path)
    if (
        isinstance(parsed.data, dict)
        and "edge_id" not in parsed.data
        and ("station_id" in parsed.data or "stations" not in parsed.data)
    ):
        return "station"
    return "site"
