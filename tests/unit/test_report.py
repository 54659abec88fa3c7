"""The posture report, from a fake pytest result set: statuses, threat roll-up, exit decision."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from toolkit import registry, report

THREATS = """
threats:
  - id: T-01
    title: Remote login
    stride: [S, E]
    likelihood: 4
    impact: 5
    controls: [NET-01, SSH-01, PHY-03]
    residual: {accepted: true, likelihood: 1, impact: 5, rationale: filtered, owner: Ops lead}
  - id: T-02
    title: Stolen token
    stride: [I]
    likelihood: 2
    impact: 4
    controls: [ORG-01, USB-01]
  - id: T-03
    title: Intruder on the segment
    stride: [S]
    likelihood: 3
    impact: 4
    controls: [NET-02, LAB-01, GHOST-01]
"""

CONTROLS = """
controls:
  - {id: NET-01, title: Inbound drop, kind: technical,
     tests: [tests/posture/test_net.py::test_intruder_is_dropped]}
  - {id: SSH-01, title: Keys only, kind: technical}
  - {id: PHY-03, title: Secure boot, kind: technical, waiver_lab: the lab VM boots without UEFI,
     tests: [tests/posture/test_phy.py::test_secure_boot]}
  - {id: ORG-01, title: Key ceremony, kind: procedure, procedure: Read the minutes.}
  - {id: USB-01, title: No storage, kind: technical}
  - {id: NET-02, title: Outbound drop, kind: technical}
  - {id: LAB-01, title: Production only thing, kind: technical, applies_to: production}
"""


def result(nodeid: str, outcome: str, controls: list[str], message: str = "") -> dict[str, Any]:
    return {
        "nodeid": f"tests/posture/{nodeid}",
        "outcome": outcome,
        "duration": 0.1,
        "controls": controls,
        "lab_only": None,
        "message": message,
    }


@pytest.fixture
def reg(tmp_path: Path) -> registry.Registry:
    tm = tmp_path / "threat-model"
    (tm / "controls").mkdir(parents=True)
    (tm / "threats.yml").write_text(textwrap.dedent(THREATS))
    (tm / "controls" / "all.yml").write_text(textwrap.dedent(CONTROLS))
    return registry.load(tm)


REFS = [
    registry.TestRef("tests/posture/test_net.py::test_intruder_is_dropped", ("NET-01",), 1),
    registry.TestRef("tests/posture/test_ssh.py::test_password_refused", ("SSH-01",), 1),
    registry.TestRef("tests/posture/test_ssh.py::test_kbd_interactive_refused", ("SSH-01",), 1),
    registry.TestRef("tests/lab/test_usb.py::test_stick_is_blocked", ("USB-01",), 1),
]


def run(*tests: dict[str, Any]) -> dict[str, Any]:
    return {"tests": list(tests), "duration": 3.0, "exitstatus": 0, "collect_errors": []}


def build(reg: registry.Registry, r: dict[str, Any], kind: str = "lab", **kw: Any) -> dict:
    return report.build(reg, REFS, r, host="signhost", kind=kind, target="ssh://signhost", **kw)


def test_statuses_on_the_lab(reg: registry.Registry) -> None:
    m = build(
        reg,
        run(
            result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"]),
            result("test_ssh.py::test_password_refused", "passed", ["SSH-01"]),
            result("test_ssh.py::test_kbd_interactive_refused[v4]", "failed", ["SSH-01"], "rc 0"),
        ),
    )
    st = {cid: c["status"] for cid, c in m["controls"].items()}
    assert st == {
        "GHOST-01": "undefined",
        "LAB-01": "n/a",
        "NET-01": "passed",
        "NET-02": "untested",
        "ORG-01": "procedure",
        "PHY-03": "waived",
        "SSH-01": "failed",
        "USB-01": "not run",
    }
    assert (
        "test_ssh.py::test_kbd_interactive_refused[v4]: rc 0" in m["controls"]["SSH-01"]["reason"]
    )
    assert m["controls"]["PHY-03"]["reason"] == "the lab VM boots without UEFI"
    assert "tests/lab/test_usb.py::test_stick_is_blocked" in m["controls"]["USB-01"]["reason"]
    assert not m["ok"]
    assert "1 applicable control(s) failed" in m["problems"]
    assert any("not defined" in w for w in m["warnings"])
    threats = {t["id"]: t for t in m["threats"]}
    assert threats["T-01"]["status"] == "at risk"
    assert [t["id"] for t in m["threats"]] == ["T-01", "T-03", "T-02"]  # highest risk first
    assert threats["T-01"]["residual"]["risk"] == 5


def test_all_passing_run_is_ok_and_threat_covered(reg: registry.Registry) -> None:
    m = build(
        reg,
        run(
            result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"]),
            result("test_ssh.py::test_password_refused", "passed", ["SSH-01"]),
        ),
    )
    assert m["ok"], m["problems"]
    t1 = next(t for t in m["threats"] if t["id"] == "T-01")
    assert t1["status"] == "covered with waivers"  # PHY-03 is waived in the lab
    assert m["summary"]["controls"]["passed"] == 2


def test_production_host_runs_the_waived_control_and_skips_lab_only_tests(
    reg: registry.Registry,
) -> None:
    m = build(
        reg,
        run(
            result("test_phy.py::test_secure_boot", "passed", ["PHY-03"]),
            result(
                "test_net.py::test_intruder_is_dropped",
                "skipped",
                ["NET-01"],
                "lab only: needs the intruder namespace",
            ),
        ),
        kind="production",
    )
    c = m["controls"]
    assert c["PHY-03"]["status"] == "passed"
    assert c["LAB-01"]["status"] == "untested"  # applies to production, nobody tests it
    assert c["NET-01"]["status"] == "skipped"
    assert c["NET-01"]["reason"] == "lab only: needs the intruder namespace"
    assert m["ok"]


def test_keyword_selection_marks_the_rest_not_run(reg: registry.Registry) -> None:
    m = build(
        reg,
        run(result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"])),
        keyword="net",
    )
    assert m["controls"]["SSH-01"]["status"] == "not run"
    assert "deselected by -k 'net'" in m["controls"]["SSH-01"]["reason"]
    assert m["ok"]


def test_an_unreachable_host_or_empty_run_fails(reg: registry.Registry) -> None:
    m = build(reg, {"tests": [], "error": "run stopped: cannot reach ssh://signhost"})
    assert not m["ok"]
    assert m["problems"] == ["run stopped: cannot reach ssh://signhost"]
    assert not build(reg, run())["ok"]


def test_errors_and_unmapped_failures_fail_the_run(reg: registry.Registry) -> None:
    m = build(
        reg,
        run(
            result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"]),
            result("test_misc.py::test_something", "error", [], "fixture 'lab' failed"),
        ),
    )
    assert not m["ok"]
    assert [u["nodeid"] for u in m["unmapped_tests"]] == [
        "tests/posture/test_misc.py::test_something"
    ]


def test_renderings_carry_the_same_facts(reg: registry.Registry, tmp_path: Path) -> None:
    m = build(
        reg,
        run(
            result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"]),
            result("test_ssh.py::test_password_refused", "failed", ["SSH-01"], "<b>rc 0</b>"),
        ),
        auditors={
            "lynis": {
                "figures": {"hardening_index": 87, "warnings": 0},
                "ran_at": "2026-11-23T12:00:00Z",
            }
        },
    )
    paths = report.write(m, tmp_path / "out")
    assert [p.name for p in paths] == ["signhost.json", "signhost.md", "signhost.html"]
    assert json.loads(paths[0].read_text())["summary"]["controls"]["failed"] == 1
    md = paths[1].read_text()
    assert md.startswith("# Posture report: signhost (lab)\n\n**FAIL**")
    assert "| SSH-01 | Keys only | **FAIL** | FAIL `test_password_refused` |" not in md
    assert "| SSH-01 | Keys only | **FAIL** | **FAIL** `test_ssh.py::test_password_refused` |" in md
    assert "| PHY-03 | waived | the lab VM boots without UEFI |" in md
    assert "hardening_index: 87" in md
    page = paths[2].read_text()
    assert "&lt;b&gt;rc 0&lt;/b&gt;" in page and "<b>rc 0</b>" not in page
    assert "hardening_index: 87" in page


def test_a_control_missing_from_the_registry_is_judged_by_its_tests(
    reg: registry.Registry,
) -> None:
    m = build(reg, run(result("test_x.py::test_ghost", "failed", ["GHOST-01"], "boom")))
    ghost = m["controls"]["GHOST-01"]
    assert ghost["status"] == "failed" and ghost["registered"] is False
    assert ghost["reason"].startswith("not defined in controls/*.yml; test_x.py::test_ghost: boom")
    assert "1 applicable control(s) failed" in m["problems"]
