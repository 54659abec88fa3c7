"""The pipeline runner: a failing stage stops the run, teardown still runs, a stage whose files
are missing fails (a renamed playbook fails CI, it is never skipped), and the summary is written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from toolkit import pipeline
from toolkit.pipeline import Stage
from toolkit.runner.ansible_run import ROOT


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


def _parking_lane(gate: Path, park: Path, log: Path) -> list[str]:
    """A lane: a first step, then parked at `gate` (the pipeline's own wait_gate), then a
    second step; each step appends its name to `log` with the time it ran at."""
    return py("import subprocess, sys, time\n"
              f"log = open({str(log)!r}, 'a')\n"
              "log.write(f'lane-before {time.monotonic()}\\n'); log.flush()\n"
              "rc = subprocess.call([sys.executable, '-m', 'toolkit.pipeline', 'wait-gate',"
              f" '--gate', {str(gate)!r}, '--park', {str(park)!r}, '--what', 'verify',"
              " '--timeout', '60'])\n"
              "if rc: sys.exit(rc)\n"
              "log.write(f'lane-after {time.monotonic()}\\n')\n")


def _step(name: str, log: Path, code: str = "") -> list[str]:
    return py(f"import time\n{code}\nopen({str(log)!r}, 'a').write(f'{name} {{time.monotonic()}}\\n')")


def test_an_alone_stage_waits_for_the_lanes_to_park_or_end_and_then_lets_them_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify runs alone: it starts only after the parking lane parked and the other lane
    ended (`sleep` makes the other lane the slow one), and the parked lane's second step
    comes only after verify."""
    monkeypatch.setattr(pipeline, "PARK_POLL", 0.05)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    log, gate, park = tmp_path / "order", tmp_path / "gates" / "verify", tmp_path / "parked"
    stages = [
        Stage("lane", _parking_lane(gate, park, log), until="last", park=park),
        Stage("other lane", _step("other-lane", log, "time.sleep(1.5)"), until="last"),
        Stage("verify", _step("verify", log), alone=True, gate=gate),
        Stage("last", _step("last", log)),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is True
    order = [line.split()[0] for line in log.read_text().splitlines()]
    assert order.index("verify") > order.index("lane-before")
    assert order.index("verify") > order.index("other-lane"), "verify ran beside a lane"
    assert order.index("lane-after") > order.index("verify"), "the lane did not wait"
    assert gate.read_text().strip() == pipeline.GATE_OPEN
    assert "parked" in (tmp_path / "ci" / "lane.log").read_text()


def test_a_failure_before_the_gate_closes_it_and_the_parked_lane_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No lane waits for a verify that will not run: deploy fails, the gate says why, the lane
    stops (its teardown is its own), the run ends instead of hanging."""
    monkeypatch.setattr(pipeline, "PARK_POLL", 0.05)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    log, gate, park = tmp_path / "order", tmp_path / "gates" / "verify", tmp_path / "parked"
    stages = [
        Stage("lane", _parking_lane(gate, park, log), until="last", park=park),
        Stage("deploy", py("import sys; sys.exit(3)")),
        Stage("verify", _step("verify", log), alone=True, gate=gate),
        Stage("last", _step("last", log)),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is False
    assert [s.status for s in stages] == ["FAILED (exit 1)", "FAILED (exit 3)", "not run",
                                          "not run"]
    assert gate.read_text().strip() == "stage deploy failed"
    assert "lane-after" not in log.read_text()
    assert "will not run its verify (stage deploy failed)" in (tmp_path / "ci" / "lane.log"
                                                              ).read_text()


def test_a_stale_gate_from_an_earlier_run_is_removed_before_the_lanes_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "PARK_POLL", 0.05)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    log, gate, park = tmp_path / "order", tmp_path / "gates" / "verify", tmp_path / "parked"
    gate.parent.mkdir()
    gate.write_text("open\n")
    park.write_text("1\n")
    stages = [
        Stage("lane", _parking_lane(gate, park, log), until="last", park=park),
        Stage("verify", _step("verify", log), alone=True, gate=gate),
        Stage("last", _step("last", log)),
    ]
    assert pipeline.run(stages, title="t", env_extra={}) is True
    order = [line.split()[0] for line in log.read_text().splitlines()]
    assert order.index("lane-after") > order.index("verify") > order.index("lane-before")


def test_wait_gate_gives_up_after_its_timeout(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "PARK_POLL", 0.05)
    park = tmp_path / "parked"
    assert pipeline.wait_gate(tmp_path / "never", park, "verify", 0.2) == 1
    assert park.exists(), "a lane that waits says so"


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


def test_a_release_lane_runs_make_labs_path_on_its_own_instance_and_release() -> None:
    """Debian 12 beside Debian 13: a fresh VM of the lane's release, provision -> harden ->
    harden again (changed=0) -> deploy -> verify through inventory/lab, then down."""
    stages = pipeline.release_lane_stages("lab8", "bookworm")
    names = [s.name for s in stages]
    assert names == ["lab.down (before)", "lab.up", "provision", "harden",
                     "harden again (changed=0)", "deploy", "verify", "lab.down",
                     "nothing left behind"]
    up = stages[1]
    assert up.argv[-4:] == ["--instance", "lab8", "--release", "bookworm"]
    assert "--expect-unchanged" in stages[4].argv
    for s in stages[2:7]:
        assert "-i" not in s.argv, s.argv  # inventory/lab, the instance from SIGNLAB_INSTANCE
    assert [s.always for s in stages[-2:]] == [True, True]


def test_the_lanes_summary_is_folded_into_the_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lane = tmp_path / "ci" / "bookworm"
    lane.mkdir(parents=True)
    (lane / "summary.json").write_text(json.dumps({"stages": [
        {"stage": "provision", "status": "passed", "seconds": 61.0},
        {"stage": "verify", "status": "FAILED (exit 1)", "seconds": 80.0}]}))
    st = Stage("Debian 12 (bookworm): lane on lab8", ["true"], sub_summary=lane / "summary.json")
    st.status, st.log = "FAILED (exit 1)", tmp_path / "x.log"
    pipeline.summary([st], title="t", total=1.0)
    out = capsys.readouterr().out
    assert "Debian 12 (bookworm): lane on lab8" in out and "verify" in out and "FAILED" in out
    rows = json.loads((tmp_path / "ci" / "summary.json").read_text())["stages"]
    assert [r["stage"] for r in rows[0]["stages"]] == ["provision", "verify"]


def test_the_summary_states_verify_the_lab_tests_and_the_total(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25's figures: every verify (the pipeline's and a lane's), each half of the lab
    tests and the longer one (they run at once), the total; a stage that did not run is none."""
    lane = tmp_path / "ci" / "trixie-lab-tests"
    lane.mkdir(parents=True)
    (lane / "summary.json").write_text(json.dumps({"stages": [
        {"stage": "deploy", "status": "passed", "seconds": 100.0, "started": 900.0},
        {"stage": "lab tests (second half)", "status": "passed", "seconds": 540.4,
         "started": 1200.0}]}))
    verify = Stage("Debian 13 (trixie): verify", ["true"])
    verify.status, verify.seconds = "passed", 85.2
    first = Stage("Debian 13 (trixie): lab tests (first half)", ["true"])
    first.status, first.seconds, first.started = "passed", 520.0, 1190.0
    never = Stage("Debian 12 (bookworm): verify", ["true"])  # status "pending": not run
    lab5 = Stage("Debian 13 (trixie): lab tests (second half), lane on lab5", ["true"],
                 sub_summary=lane / "summary.json")
    lab5.status, lab5.seconds = "passed", 1400.0
    pipeline.summary([verify, first, never, lab5], title="t", total=1620.0)
    figs = json.loads((tmp_path / "ci" / "summary.json").read_text())["figures"]
    assert figs["verify_seconds"] == {"Debian 13 (trixie): verify": 85.2}
    assert figs["lab_tests_seconds"] == {
        "Debian 13 (trixie): lab tests (first half)": 520.0,
        "Debian 13 (trixie): lab tests (second half), lane on lab5 / lab tests (second half)":
            540.4}
    assert figs["lab_tests_longest_seconds"] == 540.4 and figs["total_seconds"] == 1620.0
    assert figs["lab_tests_span_seconds"] == 550.4  # 1190 -> 1740.4
    out = capsys.readouterr().out
    assert "figure: verify: 85s" in out and "the longest part: 540s" in out
    assert "to the last one's end: 550s" in out


def test_ci_runs_debian_13_in_full_and_debian_12_in_a_lane_beside_it() -> None:
    stages = pipeline.ci_stages("lab9", ["trixie", "bookworm"])
    names = [s.name for s in stages]
    lane = next(s for s in stages if s.name.startswith("Debian 12 (bookworm): lane"))
    assert lane.argv[-4:] == ["--release", "bookworm", "--instance", "lab6"]
    assert lane.argv[:3] == ["nice", "-n", str(pipeline.LANE_NICENESS)], "the pipeline goes first"
    up = names.index("Debian 13 (trixie): lab.up")
    assert names.index(lane.name) == up + 1, "the lane starts once the first VM is up"
    assert lane.until == "Debian 13 (trixie): harden --check (changed=0)"
    assert lane.until in names[names.index(lane.name):]
    assert stages[up].argv[-2:] == ["--release", "trixie"]
    unit = next(s for s in stages if s.name == "unit+signer tests")
    assert unit.until == "Debian 13 (trixie): verify", "verify cites the unit tests' record"
    # every lab stage of the first release is named by it; the lab tests run on it only, in
    # two halves: the pipeline's VM and a lane of the same release beside it
    assert any(n == "Debian 13 (trixie): lab tests (first half)" for n in names)
    second = next(s for s in stages if "lab tests (second half)" in s.name)
    assert second.name.startswith("Debian 13 (trixie)") and second.until == lane.until
    assert second.argv[-9:-4] == ["--release", "trixie", "--instance", "lab5", "--lab-tests"]
    # verify runs alone: the lab tests' lane parks at its gate, the release lane ends first
    verify = next(s for s in stages if s.name == "Debian 13 (trixie): verify")
    assert verify.alone and verify.gate is not None
    assert second.argv[-4:] == ["--gate", str(verify.gate), "--park", str(second.park)]
    assert second.park is not None and lane.park is None
    assert names.index(second.name) == up + 2
    assert not any("bookworm" in n and "lab tests" in n for n in names)


def test_ci_with_one_release_has_only_the_lab_tests_lane() -> None:
    stages = pipeline.ci_stages("lab9", ["bookworm"])
    [lane] = [s for s in stages if s.sub_summary]
    assert "--lab-tests" in lane.argv and "lab6" in lane.argv, lane.argv
    assert any(s.name == "Debian 12 (bookworm): lab tests (first half)" for s in stages)


def test_the_lab_tests_halves_are_every_module_once() -> None:
    """The first half is tests/lab without the second's modules, the second exactly those:
    together every module runs, none twice, and a renamed second-half module fails its stage."""
    first = next(s for s in pipeline.lab_stages("lab9", half="first")
                 if s.name.startswith("lab tests"))
    second = next(s for s in pipeline.lab_tests_lane_stages("lab5", "trixie")
                  if s.name.startswith("lab tests (second"))
    modules = {str(p.relative_to(ROOT))
               for p in (ROOT / "tests" / "lab").glob("test_*.py")}
    early = next(s for s in pipeline.lab_tests_lane_stages("lab5", "trixie")
                 if s.name.startswith("lab tests (early"))
    ignored = {a.removeprefix("--ignore=") for a in first.argv if a.startswith("--ignore=")}
    ran_second = {a for a in second.argv if a.startswith("tests/lab/")}
    ran_early = {a for a in early.argv if a.startswith("tests/lab/")}
    assert ran_second == set(pipeline.LAB_TESTS_SECOND_HALF)
    assert ran_early == set(pipeline.LAB_TESTS_EARLY) and not ran_early & ran_second
    assert "tests/lab" in first.argv and ignored == ran_second | ran_early
    assert ran_second | ran_early <= modules and modules - ran_second - ran_early, \
        "the first half would run nothing"
    assert second.needs == pipeline.LAB_TESTS_SECOND_HALF
    assert early.needs == pipeline.LAB_TESTS_EARLY
    whole = next(s for s in pipeline.lab_stages("lab9") if s.name.startswith("lab tests"))
    assert not any(a.startswith("--ignore") for a in whole.argv) and "tests/lab" in whole.argv


def test_the_lab_tests_lane_deploys_through_the_site_and_runs_the_second_half() -> None:
    stages = pipeline.lab_tests_lane_stages("lab5", "trixie")
    names = [s.name for s in stages]
    assert names == ["lab.down (before)", "lab.up", "lab.site (jump host, password sudo, vault)",
                     "provision", "harden", "deploy", "lab tests (early part)",
                     "lab tests (second half)", "lab.down", "nothing left behind"]
    gated = pipeline.lab_tests_lane_stages("lab5", "trixie", Path("/g/verify"), Path("/p"))
    assert [s.name for s in gated][6:9] == ["lab tests (early part)",
                                            "parked until the pipeline's verify has run",
                                            "lab tests (second half)"]
    assert gated[7].argv[-7:] == ["wait-gate", "--gate", "/g/verify", "--park", "/p",
                                  "--what", "verify"]
    assert stages[1].argv[-4:] == ["--instance", "lab5", "--release", "trixie"]
    site = pipeline.site_inventory("lab5")
    for s in stages[3:8]:
        assert site in s.argv, f"{s.name} does not use the site inventory: {_argv(s)}"
    assert pipeline.lane_dir("trixie", lab_tests=True) != pipeline.lane_dir("trixie")


def test_no_unit_test_makes_the_instances_the_ci_lanes_run_on() -> None:
    """The unit tests run beside the lanes and make real namespaces and bridges: an instance
    name they use would tear down a lane's network (seen: lab8)."""
    # one lane per release after the first, and the lab tests' second half
    lanes = {f"lab{pipeline.LANE_FIRST_INDEX - n}" for n in range(len(pipeline.RELEASES))}
    used = set()
    for path in (Path(__file__).parent).glob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        used |= set(re.findall(r"Instance\(\s*[\"'](lab[0-9])[\"']", path.read_text()))
        used |= set(re.findall(r"name = [\"'](lab[0-9])[\"']", path.read_text()))
    assert used, "the scan found no instance at all: it no longer reads the tests"
    assert not lanes & used, f"unit tests use {sorted(lanes & used)}, a CI lane's instance"


def test_the_lab_life_cycle_test_makes_an_instance_no_part_of_ci_uses() -> None:
    """It runs in the lab tests' second half, which may start while the unit tests still make
    lab7 and lab8 and while the pipeline and the lanes run on lab9, lab6, lab5."""
    from tests.lab.test_lab_lifecycle import LIFECYCLE_INSTANCE

    ci = {"lab9", "lab7", "lab8", *(f"lab{pipeline.LANE_FIRST_INDEX - n}"
                                    for n in range(len(pipeline.RELEASES)))}
    for path in (ROOT / "tests" / "unit").glob("test_*.py"):
        ci |= set(re.findall(r"Instance\(\s*[\"'](lab[0-9])[\"']", path.read_text()))
    assert LIFECYCLE_INSTANCE not in ci, (LIFECYCLE_INSTANCE, sorted(ci))
