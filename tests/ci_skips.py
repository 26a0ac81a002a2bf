"""Under CI (`CI=true`), a skipped broker or Ansible test is a failure, not a skip.

Locally those tests skip when mosquitto or ansible-playbook is missing, so `make test` works
anywhere; in CI they are the point (the issue: `make test` stayed green without mosquitto).
A test counts as a broker/Ansible test when it uses a broker fixture or its skip reason names
mosquitto or ansible. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest

BROKER_FIXTURES = frozenset({"mosquitto", "mosquitto_tls", "deploy_broker"})
REQUIRED_WORDS = ("mosquitto", "ansible")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def must_not_skip(item: pytest.Item, reason: str) -> bool:
    uses_broker = bool(BROKER_FIXTURES & set(getattr(item, "fixturenames", ())))
    return uses_broker or any(word in reason.lower() for word in REQUIRED_WORDS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    reason = _reason(report)
    if must_not_skip(item, reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a broker/Ansible test must run in CI, but it skipped: {reason}"
