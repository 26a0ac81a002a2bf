"""Config models and loader: valid files load with paths resolved; every error names file, line
and key; secrets are read from a file or the environment and never printed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.runtime.config import StationConfig
from lineguard.runtime.config_loader import ConfigError, load_site, load_station
from lineguard.runtime.site_config import BrokerConfig, SiteConfig

REPO = Path(__file__).resolve().parents[2]

STATION = """\
station_id: s1
line_id: line1
model: ../model
camera:
  kind: folder
  path: ../frames
  fps: 5
prompt:
  image: ../golden.png
  sha256: "{sha}"
roi: [0.1, 0.1, 0.8, 0.8]
ignore_masks:
  - [[0, 0], [0.2, 0], [0.2, 0.2]]
thresholds:
  image: 1.5
  pixel: 1.0
  min_area_px: 12
"""

SITE = """\
edge_id: edge1
broker:
  host: 127.0.0.1
  port: 1883
  username: edge1
  password_file: secrets/pw
stations:
  - stations/*.yaml
outbox:
  path: state/outbox.sqlite
"""


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    (tmp_path / "frames").mkdir()
    png = cv2.imencode(".png", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    (tmp_path / "golden.png").write_bytes(png)
    (tmp_path / "stations").mkdir()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("hunter2-secret\n")
    sha = hashlib.sha256(png).hexdigest()
    (tmp_path / "stations" / "s1.yaml").write_text(STATION.format(sha=sha))
    (tmp_path / "site.yaml").write_text(SITE)
    return tmp_path


def _issues(excinfo) -> list[str]:
    return [str(i) for i in excinfo.value.issues]


def test_valid_site_loads_with_paths_relative_to_their_file(site_dir: Path):
    loaded = load_site(site_dir / "site.yaml")
    assert [s.station_id for s in loaded.stations] == ["s1"]
    st = loaded.stations[0]
    assert st.model == site_dir / "model"
    assert st.camera.path == site_dir / "frames"
    assert st.prompt.image == site_dir / "golden.png"
    assert st.thresholds.image == 1.5 and st.thresholds.min_area_px == 12
    assert st.roi == (0.1, 0.1, 0.8, 0.8)
    assert loaded.site.outbox.path == site_dir / "state" / "outbox.sqlite"
    assert loaded.site.audit_log == site_dir / "state" / "audit.jsonl"  # default, resolved too
    assert loaded.site.broker.password_file == site_dir / "secrets" / "pw"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "line", "key", "message"),
    [
        (("  image: 1.5", "  image: high"), 15, "thresholds.image", "valid number"),
        (("  min_area_px: 12", "  min_area_px: 12\n  area: 3"), 18, "thresholds.area", "Extra"),
        (("  kind: folder", "  kind: usb"), 5, "camera.kind", "'device'"),
        (("  path: ../frames\n", ""), 4, "camera", "needs 'path'"),
        (("line_id: line1\n", ""), None, "line_id", "Field required"),
        (("station_id: s1", "station_id: s/1"), 1, "station_id", "pattern"),
        (("roi: [0.1, 0.1, 0.8, 0.8]", "roi: [0.5, 0.1, 0.8, 0.8]"), 11, "roi", "inside"),
        (
            ("  - [[0, 0], [0.2, 0], [0.2, 0.2]]", "  - [[0, 0], [0.2, 0]]"),
            13,
            "ignore_masks.0",
            "3 points",
        ),
    ],
)
def test_station_errors_name_file_line_and_key(site_dir, change, line, key, message):
    path = site_dir / "stations" / "s1.yaml"
    _write(path, path.read_text().replace(*change))
    with pytest.raises(ConfigError) as excinfo:
        load_station(path)
    issues = excinfo.value.issues
    hit = [i for i in issues if i.key == key]
    assert hit, _issues(excinfo)
    assert hit[0].file.endswith("stations/s1.yaml")
    if line is not None:
        assert hit[0].line == line, str(hit[0])
    else:
        assert hit[0].line is not None  # a missing key points at its parent mapping
    assert message in hit[0].message
    assert str(hit[0]).startswith(f"{hit[0].file}:{hit[0].line}: {key}: ")


def test_yaml_syntax_error_and_duplicate_key_report_lines(site_dir):
    path = site_dir / "stations" / "s1.yaml"
    text = path.read_text()
    _write(path, text.replace("  fps: 5\n", "  fps: 5\n   loop: [true\n"))
    with pytest.raises(ConfigError) as excinfo:
        load_station(path)
    (issue,) = excinfo.value.issues
    assert "YAML syntax" in issue.message and issue.line in (7, 8, 9)

    _write(path, text.replace("threads", "x") + "station_id: s2\n")
    with pytest.raises(ConfigError) as excinfo:
        load_station(path)
    assert any(
        i.key == "station_id" and i.line == 18 and "duplicate" in i.message
        for i in excinfo.value.issues
    ), _issues(excinfo)


def test_sha256_and_missing_files_are_checked(site_dir):
    path = site_dir / "stations" / "s1.yaml"
    _write(path, STATION.format(sha="0" * 64))
    with pytest.raises(ConfigError) as excinfo:
        load_station(path)
    assert any(
        i.key == "prompt.sha256" and i.line == 10 and "config says" in i.message
        for i in excinfo.value.issues
    ), _issues(excinfo)

    _write(path, STATION.replace('  sha256: "{sha}"\n', "").replace("../model", "../nomodel"))
    with pytest.raises(ConfigError) as excinfo:
        load_station(path)
    assert any(i.key == "model" and i.line == 3 for i in excinfo.value.issues)
    # Without file checks the same file is structurally valid.
    assert load_station(path, check_files=False).model == site_dir / "nomodel"

    # An unquoted all-digit sha256 is read by YAML as a number: say so.
    _write(path, STATION.format(sha="1" * 64).replace('"' + "1" * 64 + '"', "1" * 64))
    with pytest.raises(ConfigError) as excinfo:
        load_station(path)
    assert any("quote it" in i.message for i in excinfo.value.issues)


def test_site_reports_station_problems_and_duplicates_together(site_dir):
    stations = site_dir / "stations"
    (stations / "s2.yaml").write_text((stations / "s1.yaml").read_text())  # same station_id
    (stations / "s3.yaml").write_text("station_id: s3\nline_id: l\n  bad: indent\n")
    site = site_dir / "site.yaml"
    site.write_text(
        SITE.replace("  - stations/*.yaml", "  - stations/*.yaml\n  - none/*.yaml").replace(
            "  port: 1883", "  port: 99999"
        )
    )
    with pytest.raises(ConfigError) as excinfo:
        load_site(site)
    text = _issues(excinfo)
    assert any(
        t.endswith("site.yaml:4: broker.port: Input should be less than or equal to 65535")
        for t in text
    ), text
    site.write_text(SITE.replace("  - stations/*.yaml", "  - stations/*.yaml\n  - none/*.yaml"))
    with pytest.raises(ConfigError) as excinfo:
        load_site(site)
    text = _issues(excinfo)
    assert any("site.yaml:9: stations.1: no file matches none/*.yaml" in t for t in text), text
    assert any(
        "stations/s2.yaml:1: station_id: station_id 's1' is also used by" in t for t in text
    ), text
    assert any("stations/s3.yaml:3: YAML syntax" in t for t in text), text


def test_secrets_come_from_file_or_env_and_are_never_printed(site_dir, monkeypatch):
    broker = load_site(site_dir / "site.yaml").site.broker
    secret = broker.password()
    assert secret.get_secret_value() == "hunter2-secret"  # trailing newline stripped
    assert "hunter2" not in repr(secret) and "hunter2" not in str(broker)
    assert "hunter2" not in broker.model_dump_json()

    monkeypatch.setenv("LG_TEST_PW", "from-env")
    env_broker = BrokerConfig(host="h", username="u", password_env="LG_TEST_PW")
    assert env_broker.password().get_secret_value() == "from-env"
    monkeypatch.delenv("LG_TEST_PW")
    with pytest.raises(Exception, match="LG_TEST_PW is not set"):
        env_broker.password()
    with pytest.raises(ValueError, match="needs a username"):
        BrokerConfig(host="h", password_env="X")
    with pytest.raises(ValueError, match="not both"):
        BrokerConfig(host="h", username="u", password_env="X", password_file="f")


def test_models_are_strict_and_titled():
    for model in (SiteConfig, StationConfig, BrokerConfig):
        assert model.model_config["extra"] == "forbid"
        for name, field in model.model_fields.items():
            assert field.title, f"{model.__name__}.{name} has no title"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lineguard.runtime.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_validate_config_cli(site_dir):
    ok = _cli("validate-config", "site.yaml", cwd=site_dir)
    assert ok.returncode == 0, ok.stderr
    assert "OK site.yaml: edge edge1, 1 station(s): line1/s1" in ok.stdout
    assert "hunter2" not in ok.stdout + ok.stderr

    path = site_dir / "stations" / "s1.yaml"
    path.write_text(path.read_text().replace("  image: 1.5", "  image: high"))
    bad = _cli("validate-config", "site.yaml", "stations/s1.yaml", cwd=site_dir)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert "stations/s1.yaml:15: thresholds.image: must be a valid number" in lines[0]
    assert len(lines) == 2  # once through the site, once as a station file


def test_example_configs_validate():
    files = [
        REPO / "configs" / "site.example.yaml",
        *sorted((REPO / "configs" / "stations").glob("*.example.yaml")),
    ]
    result = _cli("validate-config", "--no-file-checks", *map(str, files), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK ") == len(files)


def test_edge_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import lineguard.runtime.config, lineguard.runtime.config_loader, "
        "lineguard.runtime.outbox, lineguard.runtime.mqtt, lineguard.runtime.publisher, "
        "lineguard.runtime.service, lineguard.runtime.commands, lineguard.runtime.events, "
        "lineguard.runtime.audit, lineguard.runtime.threshold_commands\n"
        "bad = [m for m in ('torch', 'timm', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_run_refuses_a_bad_site_before_starting(site_dir):
    (site_dir / "site.yaml").write_text(SITE.replace("edge_id: edge1", "edge_id: edge 1"))
    result = _cli("run", "--site", "site.yaml", cwd=site_dir)
    assert result.returncode == 1
    assert "site.yaml:1: edge_id: String should match pattern" in result.stderr
    assert "Traceback" not in result.stderr
