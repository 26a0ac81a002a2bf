"""The README and docs/*.md say only what the code does.

- Every `lineguard ...` line in a fenced code block parses with the real CLI parser
  (`lineguard.runtime.cli.build_parser`), placeholders such as FILE or N substituted, and reaches a
  subcommand handler. Inline `lineguard ...` fragments name existing subcommands and options.
- `python -m lineguard.deploy.demo ...` lines parse with the demo's own parser; `python
  benchmarks/x.py` and `ansible-playbook ... deploy/...yml` name files that exist; `make X` names a
  Makefile target.
- docs/configuration.md is what docs/gen_config_reference.py generates from the config models.
- The MQTT topics in docs/mqtt.md are exactly the ones the runtime and deploy publish or read.
- Relative links between the documents point at files that exist.
- The README's first screen gives exactly two commands: `make demo` and `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```")
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)\s*$")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:\.\.\.)?|<[^<>]+>)$")
SHELL_OPS = {"&&", "||", ";", "|", "&"}


def _fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every line of ```bash (sh, shell, console) blocks, with
    backslash continuations joined. Other blocks (pictures, folder trees, YAML) hold no commands."""
    out: list[tuple[int, str]] = []
    inside, shell, pending, start = False, False, "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        if FENCE.match(raw.strip()):
            inside, shell, pending = not inside, bool(SHELL_FENCE.match(raw.strip())), ""
            continue
        if not (inside and shell):
            continue
        line = raw.strip()
        if not pending:
            start = no
            line = line.removeprefix("$ ")
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending + line:
            out.append((start, pending + line))
        pending = ""
    return out


def _commands(line: str) -> list[list[str]]:
    """Simple commands of a shell line (split at && ; | ...), env assignments and sudo dropped."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    cmds, cur = [], []
    for t in tokens:
        if t in SHELL_OPS:
            cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    cmds.append(cur)
    out = []
    for c in cmds:
        while c and (re.match(r"^[A-Z_][A-Z0-9_]*=", c[0]) or c[0] == "sudo"):
            c = c[1:]
        if c:
            out.append(c)
    return out


def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for no, line in _fenced_lines(doc.read_text(encoding="utf-8")):
            for cmd in _commands(line):
                found.append((f"{doc.relative_to(ROOT)}:{no}", cmd))
    return found


COMMANDS = _all_commands()


def _is_lineguard(cmd: list[str]) -> bool:
    return Path(cmd[0]).name == "lineguard"


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from lineguard.runtime.cli import build_parser

    return build_parser()


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[int, str, object]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return 0, "", parser.parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue().strip(), None


LINEGUARD_LINES = [(where, cmd) for where, cmd in COMMANDS if _is_lineguard(cmd)]


def test_docs_show_lineguard_commands():
    assert len(LINEGUARD_LINES) >= 40, "expected the docs to show the commands they describe"
    for name in ("training.md", "calibration.md", "fleet.md", "benchmarks.md", "mqtt.md"):
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize(("where", "cmd"), LINEGUARD_LINES, ids=[w for w, _ in LINEGUARD_LINES])
def test_lineguard_command_parses(parser, where, cmd):
    argv = ["1" if PLACEHOLDER.match(t) else t for t in cmd[1:]]
    code, err, ns = _parse(parser, argv)
    assert code == 0, f"{where}: `{shlex.join(cmd)}` does not parse: {err}"
    if ns is not None and "--help" not in argv and "-h" not in argv:
        assert getattr(ns, "handler", None) is not None, (
            f"{where}: `{shlex.join(cmd)}` is no command"
        )


def _inline_fragments() -> list[tuple[str, list[str]]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"(?<!`)`(lineguard [^`\n]+)`(?!`)", text):
            no = text.count("\n", 0, m.start()) + 1
            try:
                out.append((f"{doc.relative_to(ROOT)}:{no}", shlex.split(m.group(1))))
            except ValueError:
                out.append((f"{doc.relative_to(ROOT)}:{no}", m.group(1).split()))
    return out


INLINE = _inline_fragments()


@pytest.mark.parametrize(("where", "words"), INLINE, ids=[w for w, _ in INLINE])
def test_inline_lineguard_fragment_names_real_options(parser, where, words):
    """`lineguard deploy install --root` in prose: the subcommand and each option exist."""
    current = parser
    for word in words[1:]:
        if PLACEHOLDER.match(word):  # `lineguard COMMAND --help`
            continue
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            assert name in current._option_string_actions, (
                f"{where}: `{' '.join(words)}`: {current.prog} has no option {name}"
            )
            continue
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices:
            current = subs[0].choices[word]
        elif subs and current is parser:
            pytest.fail(f"{where}: `{' '.join(words)}`: no subcommand {word}")


OTHER = [(w, c) for w, c in COMMANDS if not _is_lineguard(c)]


def _python_target(cmd: list[str]) -> list[str] | None:
    if Path(cmd[0]).name.startswith("python"):
        return cmd[1:]
    return None


@pytest.mark.parametrize(("where", "cmd"), OTHER, ids=[w for w, _ in OTHER])
def test_other_commands_name_real_things(where, cmd):
    args = _python_target(cmd)
    if args and args[:2] == ["-m", "lineguard.deploy.demo"]:
        from lineguard.deploy.demo import parse_args

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parse_args(args[2:])
            except SystemExit as exc:  # --help exits 0
                assert not exc.code, f"{where}: demo arguments {args[2:]} rejected: {err}"
    elif args and args[0].endswith(".py"):
        assert (ROOT / args[0]).is_file(), f"{where}: no script {args[0]}"
    elif cmd[0] == "make":
        targets = re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M)
        for t in cmd[1:]:
            assert t in targets, f"{where}: no Makefile target {t}"
    elif cmd[0] == "ansible-playbook":
        books = [t for t in cmd if t.endswith(".yml") and t.startswith("deploy/")]
        assert books and all((ROOT / b).is_file() for b in books), f"{where}: {cmd}"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "docs" / "gen_config_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    text = gen.render()
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == text, (
        "docs/configuration.md is stale: run python docs/gen_config_reference.py"
    )
    from lineguard.runtime.config import StationConfig
    from lineguard.runtime.site_config import SiteConfig

    for model in (SiteConfig, StationConfig):  # every key of the models is documented
        for key in model.model_fields:
            assert f"| `{key}` |" in text, key


def test_configuration_reference_sees_a_new_field():
    """The reference is generated, not copied: a model change shows up in it."""
    from pydantic import Field, create_model

    from lineguard.runtime.config import QueueConfig

    gen = _generator()
    extended = create_model(
        "QueueConfig", __base__=QueueConfig, burst=(int, Field(3, ge=1, title="Burst size"))
    )
    section = gen._section("QueueConfig", extended.model_json_schema(), extended, ["queue"])
    assert "| `burst` | int | `3` | Burst size (≥ 1) |" in section


def _code_topics() -> set[str]:
    from lineguard.deploy.configs import BrokerInfo
    from lineguard.deploy.mqtt_state import available_topic, bundle_topic
    from lineguard.runtime.events import Topics

    t = Topics("<prefix>", "<edge>")
    line, st = "<line>", "<station>"
    info = BrokerInfo("h", 1, "<prefix>", "<edge>")
    return {
        t.available(),
        available_topic(info),
        bundle_topic(info),
        t.status(line, st),
        t.defect(line, st),
        t.evidence(line, st, "<event_id>"),
        t.stats(line, st),
        t.threshold_set(line, st),
        t.threshold_state(line, st),
        t.threshold_error(line, st),
    }


@pytest.mark.parametrize("doc", ["docs/mqtt.md", "README.md"])
def test_docs_list_exactly_the_topics_of_the_code(doc):
    documented = set(re.findall(r"`(<prefix>/[^`\s]+)`", (ROOT / doc).read_text(encoding="utf-8")))
    assert documented == _code_topics()


def test_mqtt_doc_names_every_payload_schema():
    text = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
    for schema in re.findall(r"`((?:runtime|deploy)/schemas/[\w.]+\.json)`", text):
        assert (ROOT / schema).is_file(), schema
    shipped = {p.name for p in (ROOT / "runtime" / "schemas").glob("*.json")}
    assert all(name in text for name in shipped), "every payload schema is named in mqtt.md"


def test_relative_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{doc.relative_to(ROOT)}: broken link {target}"


def test_readme_first_screen_has_exactly_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = text.split("\n## ", 1)[0]
    cmds = [shlex.join(c) for _, line in _fenced_lines(first) for c in _commands(line)]
    assert cmds == ["make demo", "make test"]
