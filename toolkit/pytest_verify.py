"""Pytest plugin for `invoke verify`: one JSON record per test, with the controls it names.

Loaded with `-p toolkit.pytest_verify --verify-json PATH`. It records what pytest itself decided
(outcome per phase, skip reasons, the control markers of the collected item, parametrised or
not), so the report does not have to parse pytest's console output or JUnit XML.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import pytest

OUTCOME_ORDER = ("error", "failed", "xpassed", "skipped", "xfailed", "passed")


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
    def __init__(self, path: Path) -> None:
        self.path = path
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
        outcome.get_result().user_properties.append(
            ("verify", {"controls": _controls(item), "lab_only": _lab_only(item)})
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
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
        data = {
            "started": self.started,
            "duration": round(time.time() - self.started, 2),
            "exitstatus": int(exitstatus),
            "tests": [r for r in self.items.values() if r["outcome"] is not None],
            "not_run": [r["nodeid"] for r in self.items.values() if r["outcome"] is None],
            "collect_errors": self.collect_errors,
        }
        if self.stopped:
            data["error"] = f"run stopped: {self.stopped}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1))


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--verify-json")
    if path:
        config.pluginmanager.register(Recorder(Path(path)), "verify-recorder")
