"""The pipeline runner: a failing stage stops the run, teardown still runs, absent stages
are reported as absent (never as passed), and the summary is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from toolkit import pipeline
from toolkit.pipeline import Stage


@pytest.fixture(autouse=True)
def _ci_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "CI_DIR", tmp_path / "ci")
    monkeypatch.setattr(pipeline, "REPORTS", tmp_path)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_failure_stops_the_run_but_teardown_runs(tmp_path: Path) -> None:
    marker = tmp_path / "teardown-ran"
    stages = [
        Stage("one", py("print('ok')")),
        Stage("two", py("import sys; print('boom'); sys.exit(4)")),
        Stage("three", py("print('never')")),
        Stage("down", py(f"open({str(marker)!r}, 'w').write('x')"), always=True),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is False
    assert [s.status for s in stages] == ["passed", "FAILED (exit 4)", "not run", "passed"]
    assert marker.exists()
    assert "boom" in (tmp_path / "ci" / "two.log").read_text()
    summary = json.loads((tmp_path / "ci" / "summary.json").read_text())
    assert [r["status"] for r in summary["stages"]][1] == "FAILED (exit 4)"


def test_absent_stage_is_reported_not_run() -> None:
    stages = [Stage("ok", py("pass")), Stage("later", py("pass"), needs=["no/such/file.yml"])]
    assert pipeline.run(stages, title="t", env_extra={}) is True
    assert stages[1].status == "absent"


def test_failing_teardown_fails_the_run() -> None:
    stages = [Stage("ok", py("pass")),
              Stage("down", py("import sys; sys.exit(1)"), always=True)]
    assert pipeline.run(stages, title="t", env_extra={}) is False
