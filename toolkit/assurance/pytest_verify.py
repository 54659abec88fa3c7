"""Pytest plugin for `invoke verify`: one JSON record per test, with the controls it names.

Loaded with `-p toolkit.assurance.pytest_verify --verify-json PATH`. It records what pytest
itself decided (outcome per phase, skip reasons, the control markers of the collected item,
parametrised or not), so the report does not have to parse pytest's console output or JUnit XML.

It also records the host's facts (OS, kernel, boot id, name, clock) for the report's provenance,
read once through the suite's own `host` fixture when the first test that uses it is set up: the
same root channel as the tests, so the facts cannot describe another machine than the results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import pytest

OUTCOME_ORDER = ("error", "failed", "xpassed", "skipped", "xfailed", "passed")

# One line: the host's journal logs every command of the channel (tag signhost-verify).
FACTS_SCRIPT = (
    '. /etc/os-release 2>/dev/null; echo "os=${PRETTY_NAME:-$(uname -s)}"; '
    'echo "kernel=$(uname -srvm)"; '
    'echo "boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"; '
    'echo "hostname=$(hostname -f 2>/dev/null || hostname)"; '
    'echo "clock=$(date -u +%Y-%m-%dT%H:%M:%SZ)"'
)
FACTS = ("os", "kernel", "boot_id", "hostname", "clock")


def host_facts(host: Any) -> dict[str, str]:
    """The facts of a testinfra host, or {"error": why}: never an exception into the run."""
    try:
        out = host.run(FACTS_SCRIPT)
    except Exception as exc:  # the report says why instead of losing the run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if out.rc != 0:
        return {"error": f"exit {out.rc}: {out.stderr.strip()[-300:]}"}
    facts = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in FACTS:
            facts[key] = value.strip()
    return facts


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--verify-json",
        default=None,
        help="write one JSON record per test (outcome, controls, message) to this file",
    )


def _controls(item: pytest.Item) -> list[str]:
    out: list[str] = []
    for mark in item.iter_markers("control"):
        out.extend(str(a) for a in mark.args)
    return list(dict.fromkeys(out))


def _lab_only(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("lab_only")
    if mark is None:
        return None
    return str(mark.args[0]) if mark.args else str(mark.kwargs.get("reason", "lab only"))


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return str(crash.message).strip()
        return str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""
    return ""


class Recorder:
    def __init__(self, path: Path, worker: bool = False) -> None:
        self.path = path
        self.worker = worker  # an xdist worker: the controller writes the file
        self.facts: dict[str, str] | None = None
        self.facts_read = False
        self.started = time.time()
        self.items: dict[str, dict[str, Any]] = {}
        self.collect_errors: list[dict[str, str]] = []
        self.stopped: str | None = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.items[item.nodeid] = {
                "nodeid": item.nodeid,
                "outcome": None,
                "duration": 0.0,
                "controls": _controls(item),
                "lab_only": _lab_only(item),
                "message": "",
            }

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append(
                {"nodeid": report.nodeid, "message": str(report.longrepr).strip()[-2000:]}
            )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        # Carried on the report itself so that it also reaches the controller under xdist,
        # where the collected items live in the workers.
        outcome = yield
        report = outcome.get_result()
        report.user_properties.append(
            ("verify", {"controls": _controls(item), "lab_only": _lab_only(item)})
        )
        funcargs = getattr(item, "funcargs", {})
        if call.when == "setup" and not self.facts_read and "host" in funcargs:
            self.facts_read = True
            report.user_properties.append(("verify_host_facts", host_facts(funcargs["host"])))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        facts = dict(report.user_properties).get("verify_host_facts")
        if facts is not None and self.facts is None:
            self.facts = cast(dict[str, str], facts)
        props = cast(dict[str, Any], dict(report.user_properties).get("verify") or {})
        rec = self.items.setdefault(
            report.nodeid,
            {
                "nodeid": report.nodeid,
                "outcome": None,
                "duration": 0.0,
                "controls": props.get("controls", []),
                "lab_only": props.get("lab_only"),
                "message": "",
            },
        )
        rec["duration"] = round(rec["duration"] + report.duration, 3)
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
        elif report.skipped:
            outcome = "skipped"
        else:
            outcome = "passed"
        previous = rec["outcome"]
        # The worst phase wins: a teardown error after a pass is an error.
        if previous is None or OUTCOME_ORDER.index(outcome) < OUTCOME_ORDER.index(previous):
            rec["outcome"] = outcome
            message = _message(report)
            if message or outcome != "passed":
                rec["message"] = "\n".join(message.splitlines()[:3])[:600]

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        # Also called for pytest.exit(): the conftest stops the run this way when the host
        # cannot be reached; keep its one-line reason for the report.
        self.stopped = str(excinfo.value.args[0] if excinfo.value.args else excinfo.typename)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.worker:
            return
        data: dict[str, Any] = {
            "started": self.started,
            "duration": round(time.time() - self.started, 2),
            "exitstatus": int(exitstatus),
            "tests": [r for r in self.items.values() if r["outcome"] is not None],
            "not_run": [r["nodeid"] for r in self.items.values() if r["outcome"] is None],
            "collect_errors": self.collect_errors,
            "host_facts": self.facts or {},
        }
        if self.stopped:
            data["error"] = f"run stopped: {self.stopped}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1))


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--verify-json")
    if path:
        worker = hasattr(config, "workerinput")
        config.pluginmanager.register(Recorder(Path(path), worker), "verify-recorder")
