"""The pipeline runner: a failing stage stops the run, teardown still runs, a stage whose files
are missing fails (a renamed playbook fails CI, it is never skipped), and the summary is written."""

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


def test_a_stage_whose_files_are_missing_fails_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    stages = [Stage("ok", py("pass")),
              Stage("later", py(f"open({str(marker)!r}, 'w')"), needs=["no/such/file.yml"]),
              Stage("after", py("pass")),
              Stage("down", py("pass"), always=True)]
    assert pipeline.run(stages, title="t", env_extra={}) is False
    assert [s.status for s in stages] == [
        "passed", "FAILED (missing no/such/file.yml)", "not run", "passed"]
    assert not marker.exists()
    summary = json.loads((tmp_path / "ci" / "summary.json").read_text())
    assert summary["stages"][1]["status"] == "FAILED (missing no/such/file.yml)"


def test_a_renamed_playbook_fails_ci_in_the_static_and_the_lab_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree as CI sees it, with deploy.yml renamed: the syntax check and both deploy stages
    fail instead of being left out."""
    root = tmp_path / "tree"
    (root / "playbooks").mkdir(parents=True)
    for name in ("provision.yml", "harden.yml", "site-deploy.yml"):
        (root / "playbooks" / name).write_text("---\n")
    monkeypatch.setattr(pipeline, "ROOT", root)
    stages = {s.name: s for s in pipeline.static_stages() + pipeline.lab_stages("lab9")}
    for name in ("ansible-syntax", "deploy", "deploy again (changed=0, daemon kept)"):
        assert stages[name].missing() == ["playbooks/deploy.yml"], name
    assert stages["harden"].missing() == []
    assert "playbooks/site-deploy.yml" in " ".join(stages["ansible-syntax"].argv)


def test_failing_teardown_fails_the_run() -> None:
    stages = [Stage("ok", py("pass")),
              Stage("down", py("import sys; sys.exit(1)"), always=True)]
    assert pipeline.run(stages, title="t", env_extra={}) is False


def test_a_background_stage_runs_beside_the_next_stages_and_is_joined_before_its_until(
    tmp_path: Path,
) -> None:
    """Ordering by files, not by time: `bg` waits for `two` to have run, so it can only pass
    if `two` ran beside it; `three` checks that `bg` had finished before it started."""
    seen, done = tmp_path / "two-ran", tmp_path / "bg-done"
    wait_two = (f"import pathlib, time\np = pathlib.Path({str(seen)!r})\n"
                "for _ in range(600):\n    if p.exists(): break\n    time.sleep(0.05)\n"
                f"assert p.exists()\npathlib.Path({str(done)!r}).write_text('x')")
    stages = [
        Stage("bg", py(wait_two), until="three"),
        Stage("two", py(f"open({str(seen)!r}, 'w').write('x')")),
        Stage("three", py(f"import os, sys; sys.exit(0 if os.path.exists({str(done)!r}) else 3)")),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is True
    assert [s.status for s in stages] == ["passed", "passed", "passed"]


def test_a_failed_background_stage_fails_the_run_at_its_join(tmp_path: Path) -> None:
    marker = tmp_path / "teardown-ran"
    stages = [
        Stage("bg", py("import sys; print('unit test failed'); sys.exit(1)"), until="three"),
        Stage("two", py("print('ok')")),
        Stage("three", py("print('never')")),
        Stage("down", py(f"open({str(marker)!r}, 'w').write('x')"), always=True),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is False
    assert [s.status for s in stages] == ["FAILED (exit 1)", "passed", "not run", "passed"]
    assert marker.exists()
    assert "unit test failed" in (tmp_path / "ci" / "bg.log").read_text()


def test_a_background_stage_is_joined_even_when_the_run_stops_before_its_until(
    tmp_path: Path,
) -> None:
    stages = [
        Stage("bg", py("print('fine')"), until="three"),
        Stage("two", py("import sys; sys.exit(2)")),
        Stage("three", py("print('never')")),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is False
    assert [s.status for s in stages] == ["passed", "FAILED (exit 2)", "not run"]


def _argv(stage: Stage) -> str:
    return " ".join(stage.argv)


def test_make_lab_is_the_main_job_on_the_lab_inventory() -> None:
    """`invoke up` (`make lab`, the README's first command): lab.up then provision, harden,
    deploy, verify, each on ansible.cfg's default inventory (inventory/lab), no other -i."""
    stages = pipeline.main_job_stages("lab4")
    assert [s.name for s in stages] == ["lab.up", "provision", "harden", "deploy", "verify"]
    assert stages[0].argv[-2:] == ["--instance", "lab4"]
    for s in stages[1:]:
        assert s.argv[-1] == s.name and "-i" not in s.argv, s.argv


def test_ci_proves_the_pipeline_once_through_the_site_inventory() -> None:
    """Every play, verify and the lab tests take the rendered production-style inventory and
    its vault; inventory/lab gets its preflight on the fresh VM before lab.site takes it over."""
    stages = pipeline.lab_stages("lab4")
    names = [s.name for s in stages]
    site = pipeline.site_inventory("lab4")
    order = ["lab.up", "lab.site", "provision", "harden", "harden again", "deploy",
             "deploy again", "verify", "lab tests", "harden --check", "lab.down"]
    found = [next(i for i, n in enumerate(names) if n.startswith(o)) for o in order]
    assert found == sorted(found), names
    preflight = next(s for s in stages if "inventory/lab" in s.name)
    assert names.index(preflight.name) < names.index("lab.site (jump host, password sudo, vault)")
    assert "-i" not in preflight.argv and "preflight" in preflight.argv
    after_site = stages[names.index("lab.site (jump host, password sudo, vault)") + 1:]
    for s in after_site:
        if s.always:
            continue
        assert site in s.argv, f"{s.name} does not use the site inventory: {_argv(s)}"
        assert any(a.endswith("vault-pass") for a in s.argv), s.name
    assert sum(n.startswith("provision") for n in names) == 1, "the pipeline runs twice"


def test_a_stage_named_with_a_slash_logs_to_a_file_of_reports_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage name such as "... (inventory/lab)" once crashed the run before its teardown."""
    monkeypatch.setattr(pipeline, "CI_DIR", tmp_path / "ci")
    stages = [Stage("check (inventory/lab)", py("print('ran')")),
              Stage("down", py("pass"), always=True)]
    assert pipeline.run(stages, title="t", env_extra={}) is True
    assert stages[0].log is not None and stages[0].log.parent == tmp_path / "ci"
    assert stages[0].log.read_text() == "ran\n"


def test_a_stage_that_cannot_start_fails_and_the_teardown_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "CI_DIR", tmp_path / "ci")
    stages = [Stage("missing binary", [str(tmp_path / "no-such-program")]),
              Stage("down", py("pass"), always=True)]
    assert pipeline.run(stages, title="t", env_extra={}) is False
    assert stages[0].status.startswith("FAILED (cannot start")
    assert stages[1].status == "passed"
