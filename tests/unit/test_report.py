"""The posture report, from a fake pytest result set: statuses, threat roll-up, exit decision,
and the renderings of the one model (Markdown, HTML, JUnit XML)."""

from __future__ import annotations

import copy
import html as html_mod
import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from toolkit.assurance import report
from toolkit.controls import ci_record, registry

DATA = Path(__file__).resolve().parent / "data"

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
  - id: T-04
    title: Inbound scan
    stride: [I]
    likelihood: 1
    impact: 3
    controls: [NET-01]
    residual: {accepted: false, likelihood: 1, impact: 1, rationale: dropped, owner: Ops lead}
  - id: T-05
    title: Custodian bribed
    stride: [E]
    likelihood: 1
    impact: 2
    controls: [ORG-01]
  - id: T-06
    title: Meteor
    stride: [D]
    likelihood: 1
    impact: 1
    controls: []
    residual: {accepted: true, rationale: nothing to do, owner: CISO}
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


def ci_evidence(outcome: str = "passed", usable: bool = True) -> ci_record.Evidence:
    """A CI record of this toolkit commit in which the USB test had `outcome`."""
    return ci_record.Evidence(
        sources=[{"file": "reports/ci/lab-tests.junit.xml", "commit": "c0ffee" * 6 + "c0ff",
                  "dirty": False, "tests": 1, "failed": int(outcome == "failed")}],
        outcomes={"tests/lab/test_usb.py::test_stick_is_blocked": outcome},
        usable=usable, why="" if usable else "the CI record is of commit 0123, not this one")


def run(*tests: dict[str, Any]) -> dict[str, Any]:
    return {"tests": list(tests), "duration": 3.0, "exitstatus": 0, "collect_errors": []}


def _find(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path)
    assert found is not None, path
    return found


def build(reg: registry.Registry, r: dict[str, Any], kind: str = "lab", **kw: Any) -> dict[str, Any]:
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
        # Only tests/lab names it: CI proves it, but no CI record was given to show it.
        "USB-01": "claimed",
    }
    assert m["controls"]["USB-01"]["where"] == ["in CI (lab VM)"]
    assert m["controls"]["NET-01"]["where"] == ["on this host"]
    assert m["controls"]["ORG-01"]["where"] == ["by procedure"]
    assert (
        "test_ssh.py::test_kbd_interactive_refused[v4]: rc 0" in m["controls"]["SSH-01"]["reason"]
    )
    assert m["controls"]["PHY-03"]["reason"] == "the lab VM boots without UEFI"
    assert "test_usb.py::test_stick_is_blocked" in m["controls"]["USB-01"]["reason"]
    assert "no CI record was given" in m["controls"]["USB-01"]["reason"]
    assert any("1 control(s) rest on the toolkit's CI tests" in w for w in m["warnings"])
    assert not m["ok"]
    assert "1 applicable control(s) failed" in m["problems"]
    assert any("not defined" in w for w in m["warnings"])
    threats = {t["id"]: t for t in m["threats"]}
    assert threats["T-01"]["status"] == "at risk"
    assert threats["T-01"]["note"].startswith("SSH-01 failed")
    # highest risk first
    assert [t["id"] for t in m["threats"]] == ["T-01", "T-03", "T-02", "T-04", "T-05", "T-06"]
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
    assert [p.name for p in paths] == ["signhost.json", "signhost.md", "signhost.html",
                                       "signhost.junit.xml"]
    assert json.loads(paths[0].read_text())["summary"]["controls"]["failed"] == 1
    md = paths[1].read_text()
    assert md.startswith("# Posture report: signhost (lab host)\n\n\U0001f534 **FAIL**")
    assert re.search(r"\| <a id=\"ssh-01\"></a>SSH-01 \| Keys only \| \S+ \*\*failed\*\* \| "
                     r"on this host \| \S+ failed `test_ssh.py::test_password_refused`: "
                     r"&lt;b>rc 0&lt;/b> \|", md), md
    assert "<b>" not in md
    assert re.search(r"\| \[PHY-03\]\(#phy-03\) Secure boot \| \S+ \*\*waived\*\* \| "
                     r"the lab VM boots without UEFI \|", md)
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


# --- threat statuses that say what they mean ---------------------------------------------------


def test_threat_statuses_and_residual_risk_conditional_on_the_controls(
    reg: registry.Registry,
) -> None:
    m = build(
        reg,
        run(
            result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"]),
            result("test_ssh.py::test_password_refused", "failed", ["SSH-01"], "rc 0"),
        ),
        kind="production", ci=ci_evidence(),
    )
    t = {x["id"]: x for x in m["threats"]}
    # A failed control: the residual risk does not hold, the inherent risk applies here.
    assert t["T-01"]["status"] == "at risk"
    assert t["T-01"]["residual"]["holds"] == "no"
    assert "does not hold: SSH-01" in t["T-01"]["residual"]["condition"]
    assert t["T-01"]["risk_here"] == {"risk": 20, "band": "critical", "basis": "inherent"}
    # Technical controls proven (here: in CI) and the rest procedures: the best a run can say.
    assert t["T-02"]["status"] == "covered + procedures"
    assert t["T-02"]["note"].startswith("complete as far as a run can attest")
    assert "ORG-01" in t["T-02"]["note"] and "USB-01" in t["T-02"]["note"]
    # Every technical control passed, no procedure: covered; its residual holds here.
    assert t["T-04"]["status"] == "covered"
    assert t["T-04"]["residual"]["holds"] == "yes"
    assert t["T-04"]["risk_here"] == {"risk": 1, "band": "low", "basis": "residual"}
    assert t["T-04"]["residual"]["accepted"] is False
    assert t["T-05"]["status"] == "procedures only"
    assert t["T-06"]["status"] == "accepted"
    assert m["summary"]["threats"]["total"] == 6
    md, page = report.markdown(m), report.html(m)
    for text in (md, page):
        assert "Not accepted" in text  # T-04's residual was never accepted
        assert "complete as far as a run can attest" in text


def test_a_threat_with_a_skipped_control_is_incomplete(reg: registry.Registry) -> None:
    m = build(
        reg,
        run(
            result("test_net.py::test_intruder_is_dropped", "skipped", ["NET-01"], "no vantage"),
            result("test_ssh.py::test_password_refused", "passed", ["SSH-01"]),
        ),
        kind="production",
    )
    t4 = next(x for x in m["threats"] if x["id"] == "T-04")
    assert t4["status"] == "incomplete"
    assert t4["residual"]["holds"] == "unknown"
    assert "NET-01 not evidenced here" in t4["residual"]["condition"]


def test_every_status_has_a_colour_and_the_page_styles_it() -> None:
    page = (report.TEMPLATES / "report.html.j2").read_text()
    statuses = [*report.CONTROL_STATUSES, *report.THREAT_STATUSES, *report.TEST_STATUSES,
                *report.VERDICTS]
    for status in statuses:
        colour = report.colour(status)
        assert colour in report.COLOUR_EMOJI, status
        assert f".c-{colour}" in page, (status, colour)


# --- one model, the same sections in every rendering -------------------------------------------


def _headings_md(md: str) -> list[str]:
    out = []
    for line in md.splitlines():
        match = re.match(r"(#{2,3}) (.*)", line)
        if match:
            text = html_mod.unescape(match.group(2).replace("\\|", "|"))
            out.append(f"h{len(match.group(1))} {text}")
    return out


def _headings_html(page: str) -> list[str]:
    return [f"h{level} {html_mod.unescape(re.sub(r'<[^>]+>', '', text))}"
            for level, text in re.findall(r"<h([23])[^>]*>(.*?)</h\1>", page, re.S)]


def _everything(reg: registry.Registry) -> dict[str, Any]:
    """A model with every optional section: failures, unmapped tests, collection errors,
    auditors, a previous run, procedures."""
    first = build(reg, run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"])))
    first["run"] = "20261130T120000Z"
    return build(
        reg,
        {**run(result("test_ssh.py::test_password_refused", "failed", ["SSH-01"], "a|b"),
               result("test_misc.py::test_x", "passed", [])),
         "collect_errors": [{"nodeid": "tests/posture/test_bad.py", "message": "SyntaxError"}]},
        auditors={"lynis": {"figures": {"hardening_index": 80, "warnings": 2},
                            "details": ["W1 <x>"]}},
        previous=first,
    )


def test_markdown_and_html_have_the_same_sections(reg: registry.Registry) -> None:
    full = _everything(reg)
    bare = build(reg, run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"])))
    for m in (full, bare):
        md, page = _headings_md(report.markdown(m)), _headings_html(report.html(m))
        assert md == page
        assert [h for h in md if h.startswith("h2 ")] == [
            f"h2 {heading}" for _, heading in report.sections(m)]
    full_h2 = [h for h in _headings_md(report.markdown(full)) if h.startswith("h2")]
    assert "h2 Tests that name no known control" in full_h2
    assert "h2 Collection errors" in full_h2
    assert "h3 T-01 Remote login" in _headings_html(report.html(full))
    assert "h3 ORG-01 Key ceremony" in _headings_html(report.html(full))
    assert "h3 Needs attention" in _headings_html(report.html(full))


def test_a_heading_only_one_rendering_has_fails_the_parity_check(
    reg: registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above would notice a template that drifts from the other."""
    m = _everything(reg)
    md = (report.TEMPLATES / "report.md.j2").read_text()
    (tmp_path / "report.md.j2").write_text(md.replace("### Needs attention", "### Attention"))
    (tmp_path / "report.html.j2").write_text((report.TEMPLATES / "report.html.j2").read_text())
    monkeypatch.setattr(report, "TEMPLATES", tmp_path)
    monkeypatch.setattr(report, "_ENV", None)
    assert _headings_md(report.markdown(m)) != _headings_html(report.html(m))


def test_provenance_and_signature_state_are_in_both_renderings(reg: registry.Registry) -> None:
    prov = {"toolkit": {"version": "0.1.0", "commit": "0123456789abcdef" * 2 + "01234567",
                        "dirty": True},
            "inventory": "/srv/inv", "inventory_host": "sign1",
            "operator": {"user": "alice", "controller": "ws1"}}
    facts = {"os": "Debian GNU/Linux 12 (bookworm)", "kernel": "Linux 6.1.0-28-amd64",
             "boot_id": "6c1f2a0e-93b4-4e0c-9a57-0d3c4b1e8f21", "hostname": "sign1",
             "clock": "2026-12-01T17:00:02Z"}
    m = build(reg, {**run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"])),
                    "host_facts": facts}, provenance=prov)
    assert m["schema_version"] == report.SCHEMA_VERSION
    m["signature"] = {"signed": False, "reason": "no signing key given"}
    for text in (report.markdown(m), html_mod.unescape(report.html(m))):
        for fact in (*facts.values(), "0123456789ab", "uncommitted changes", "/srv/inv",
                     "alice on ws1", "NOT signed: no signing key given"):
            assert fact in text, fact
    m["signature"] = {"signed": True, "key": "SHA256:abc (ED25519)", "namespace":
                      "signhost-report", "file": "SHA256SUMS.sig"}
    assert "signed by the operator's key SHA256:abc (ED25519)" in html_mod.unescape(
        report.html(m))


def test_unreadable_host_facts_are_a_warning_not_a_failure(reg: registry.Registry) -> None:
    m = build(reg, {**run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"])),
                    "host_facts": {"error": "exit 127: sh: uname: not found"}})
    assert m["ok"]
    assert "host facts could not be read: exit 127: sh: uname: not found" in m["warnings"]
    assert "could not be read" in report.html(m)


# --- history --------------------------------------------------------------------------------


def test_changes_since_the_previous_run(reg: registry.Registry) -> None:
    passing = run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"]))
    prev = build(reg, {**passing, "host_facts": {"boot_id": "a", "kernel": "k1"}})
    prev["run"] = "20261130T120000Z"
    assert build(reg, passing)["changes"] == {"previous": None, "items": []}
    assert report.change_lines(build(reg, passing)) == [
        "signhost: first report on this host, nothing to compare"]
    failing = run(result("test_ssh.py::test_password_refused", "failed", ["SSH-01"], "rc 0"))
    m = build(reg, {**failing, "host_facts": {"boot_id": "b", "kernel": "k1"}}, previous=prev)
    items = {(i["what"], i["id"]): (i["before"], i["after"]) for i in m["changes"]["items"]}
    assert items[("verdict", "signhost")] == ("PASS", "FAIL")
    assert items[("control", "SSH-01")] == ("passed", "failed")
    assert items[("threat", "T-01")] == ("incomplete", "at risk")  # NET-01 did not run
    assert items[("test", "test_ssh.py::test_password_refused")] == ("passed", "failed")
    assert items[("host", "boot id")] == ("a", "b")
    assert ("host", "kernel") not in items  # unchanged
    assert m["changes"]["previous"]["run"] == "20261130T120000Z"
    lines = report.change_lines(m)
    assert lines[0] == f"signhost: {len(items)} change(s) since 20261130T120000Z (PASS)"
    assert "  control SSH-01: passed -> failed" in lines
    for text in (report.markdown(m), report.html(m)):
        assert "Since the previous run (20261130T120000Z" in text
    same = build(reg, {**failing, "host_facts": {"boot_id": "b", "kernel": "k1"}}, previous=m)
    assert same["changes"]["items"] == []
    assert "Nothing changed since the previous run" in report.markdown(same)


def test_a_schema_1_report_is_a_previous_run_too(reg: registry.Registry) -> None:
    old = build(reg, run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"])))
    for key in ("schema_version", "verdict", "provenance", "changes", "procedures"):
        old.pop(key)
    m = build(reg, run(result("test_ssh.py::test_password_refused", "failed", ["SSH-01"])),
              previous=old)
    assert ("verdict", "PASS", "FAIL") in [(i["what"], i["before"], i["after"])
                                           for i in m["changes"]["items"]]


# --- JUnit XML ------------------------------------------------------------------------------


def test_junit_xml_for_ci(reg: registry.Registry) -> None:
    m = build(reg, run(
        result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"]),
        result("test_ssh.py::test_password_refused[a]", "failed", ["SSH-01"], "rc 0\nmore"),
        result("test_ssh.py::test_kbd_interactive_refused", "skipped", ["SSH-01"], "n/a here"),
        result("test_misc.py::test_x", "error", [], "fixture <boom>"),
    ))
    root = ET.fromstring(report.junit(m))
    tests, controls = root.findall("testsuite")
    props = {p.get("name"): p.get("value") for p in _find(tests, "properties")}
    assert props["schema_version"] == str(report.SCHEMA_VERSION)
    assert props["verdict"] == "FAIL"
    assert (tests.get("tests"), tests.get("failures"), tests.get("errors"),
            tests.get("skipped")) == ("4", "1", "1", "1")
    case = _find(tests, "testcase[@name='test_password_refused[a]']")
    assert case.get("classname") == "tests.posture.test_ssh"
    assert _find(case, "failure").get("message") == "rc 0"
    assert [p.get("value") for p in _find(case, "properties")] == ["SSH-01"]
    assert _find(tests, "testcase[@name='test_x']/error").get("message") == "fixture <boom>"
    failed = [c.get("name") for c in controls if c.find("failure") is not None]
    assert failed == ["GHOST-01 (not in threat-model/controls/)", "SSH-01 Keys only"]
    assert controls.get("tests") == str(len(m["controls"]))


def test_junit_of_a_run_that_tested_nothing_is_not_green(reg: registry.Registry) -> None:
    m = build(reg, {"tests": [], "error": "pytest exited 3 before writing results"})
    tests = _find(ET.fromstring(report.junit(m)), "testsuite")
    assert tests.get("errors") == "1"
    assert "pytest exited 3" in str(_find(tests, "testcase/error").get("message"))


# --- a realistic run ------------------------------------------------------------------------


def sample_model(previous: bool = True) -> dict[str, Any]:
    """The real registry and test index with a recorded lab run (tests/unit/data): passing,
    failing, skipped, waived, CI-proven and procedural controls; for the screenshot too."""
    reg = registry.load()
    refs = registry.collect_tests()
    recorded = json.loads((DATA / "verify-run-lab.json").read_text())
    prov = {"toolkit": {"version": "0.1.0", "commit": "8af4d44c" + "0" * 32, "dirty": False},
            "inventory": "inventory/lab", "inventory_host": "signhost",
            "operator": {"user": "ops", "controller": "ws-ops-01"}}
    kw: dict[str, Any] = {"host": "signhost", "kind": "lab", "target": "ssh://signhost",
                          "provenance": prov}
    prev = None
    if previous:
        before = copy.deepcopy(recorded)
        for t in before["tests"]:
            if "weak_algorithms" in t["nodeid"]:
                t["outcome"], t["message"] = "passed", ""
        before["host_facts"]["boot_id"] = "0d5e7c11-2b1a-4f65-8e3d-77aa01c2d9b4"
        prev = report.build(reg, refs, before, generated="2026-11-30T09:12:44Z", **kw)
        prev["run"] = "20261130T091244Z"
    return report.build(reg, refs, recorded, previous=prev, generated="2026-12-01T17:03:35Z",
                        **kw)


def test_a_recorded_lab_run_renders_consistently() -> None:
    m = sample_model()
    assert m["verdict"] == "FAIL"
    assert {c["status"] for c in m["controls"].values()} >= {"passed", "failed", "procedure"}
    assert all(t["status"] in report.THREAT_STATUSES for t in m["threats"])
    md, page = report.markdown(m), report.html(m)
    assert _headings_md(md) == _headings_html(page)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert m["provenance"]["host_facts"]["boot_id"] in page
    assert ("control", "SSH-05") in [(i["what"], i["id"]) for i in m["changes"]["items"]]
    ET.fromstring(report.junit(m))


def test_a_residual_that_rests_on_production_procedures_does_not_hold_in_the_lab(
    tmp_path: Path,
) -> None:
    tm = tmp_path / "tm"
    (tm / "controls").mkdir(parents=True)
    (tm / "threats.yml").write_text(textwrap.dedent("""
        threats:
          - {id: T-01, title: Key copied, stride: [I], likelihood: 4, impact: 5,
             controls: [TOK-01, ORG-01],
             residual: {accepted: true, likelihood: 1, impact: 5, rationale: r, owner: o}}
    """))
    (tm / "controls" / "all.yml").write_text(textwrap.dedent("""
        controls:
          - {id: TOK-01, title: Resident keys, kind: technical}
          - {id: ORG-01, title: Key ceremony, kind: procedure, applies_to: production,
             procedure: Read the minutes.}
    """))
    reg = registry.load(tm)
    passing = run(result("test_tok.py::test_resident", "passed", ["TOK-01"]))
    prod = build(reg, passing, kind="production")["threats"][0]
    lab = build(reg, passing, kind="lab")["threats"][0]
    assert prod["status"] == lab["status"] == "covered + procedures"
    assert prod["risk_here"]["basis"] == "residual"
    assert lab["residual"]["holds"] == "not here"
    assert "ORG-01 not for this kind of host" in lab["residual"]["condition"]
    assert lab["risk_here"] == {"risk": 20, "band": "critical",
                                "basis": "inherent: its procedures are not carried out here"}
    assert "ORG-01 (production only)" in lab["note"]


@pytest.mark.parametrize(("clock", "warned"), [
    ("2026-12-01T17:00:30Z", False),  # within the run
    ("2026-12-01T16:57:00Z", False),  # 3 min behind: tolerated
    ("2026-12-01T16:50:00Z", True),
    ("2026-12-01T17:20:00Z", True),
])
def test_a_host_clock_far_from_the_controllers_is_a_warning(
    reg: registry.Registry, clock: str, warned: bool
) -> None:
    m = build(reg, {**run(result("test_ssh.py::test_password_refused", "passed", ["SSH-01"])),
                    "host_facts": {"clock": clock}},
              provenance={"started": "2026-12-01T17:00:00Z"})
    skew = [w for w in m["warnings"] if "clock" in w]
    assert bool(skew) is warned, skew
    assert m["ok"]


def test_html_anchors_are_unique_and_every_link_lands(reg: registry.Registry) -> None:
    page = report.html(_everything(reg))
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for target in set(re.findall(r'href="#([^"]+)"', page)):
        assert target in ids, target


def test_the_control_table_says_where_each_control_is_implemented() -> None:
    """The chain risk -> control -> task -> test -> report: the registry derives where a control
    lives from the tags and `code:`; the report shows it beside the proof."""
    m = sample_model(previous=False)
    ssh05 = m["controls"]["SSH-05"]
    assert ssh05["implemented_in"] == ["role ssh (tag SSH-05)"]
    assert "signer.policy" in m["controls"]["SGN-03"]["implemented_in"]
    assert m["controls"]["ORG-01"]["implemented_in"] == []  # procedures: see Procedures
    org01 = next(p for p in m["procedures"] if p["id"] == "ORG-01")
    for text in (report.markdown(m), html_mod.unescape(report.html(m))):
        assert "in role ssh (tag SSH-05)" in text
        if org01["evidence"]:
            assert f"Evidence: {org01['evidence']}" in text.replace("\\|", "|")


# --- "in CI" only with CI's record of this toolkit commit ------------------------------------


def _usb(reg: registry.Registry, ci: ci_record.Evidence | None) -> tuple[dict[str, Any],
                                                                         dict[str, Any]]:
    m = build(reg, run(result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"])),
              kind="production", ci=ci)
    return m["controls"]["USB-01"], {x["id"]: x for x in m["threats"]}["T-02"]


def test_a_control_proven_only_in_ci_needs_the_record_of_this_commit(
    reg: registry.Registry,
) -> None:
    usb, t02 = _usb(reg, ci_evidence())
    assert usb["status"] == "in CI"
    assert "1 of 1 test(s) of the toolkit passed in CI" in usb["reason"]
    assert "lab-tests.junit.xml (commit c0ffeec0ffee" in usb["reason"]
    assert t02["status"] == "covered + procedures"
    # Without a record, or with one of another commit: a claim, and the threat is incomplete.
    for ci in (None, ci_evidence(usable=False)):
        usb, t02 = _usb(reg, ci)
        assert usb["status"] == "claimed", usb
        assert t02["status"] == "incomplete" and "USB-01" in t02["note"]
    assert "not this one" in _usb(reg, ci_evidence(usable=False))[0]["reason"]
    # A CI test of the control failed at this commit: the control failed, and the run fails.
    usb, t02 = _usb(reg, ci_evidence("failed"))
    assert usb["status"] == "failed" and t02["status"] == "at risk"
    # Skipped in CI proves nothing.
    assert _usb(reg, ci_evidence("skipped"))[0]["status"] == "claimed"


def test_the_report_names_the_ci_record(reg: registry.Registry) -> None:
    m = build(reg, run(result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"])),
              ci=ci_evidence())
    assert m["provenance"]["ci_record"]["usable"] is True
    assert "lab-tests.junit.xml (commit c0ffeec0ffee, 1 tests, 0 failed)" in report.markdown(m)
    m = build(reg, run(result("test_net.py::test_intruder_is_dropped", "passed", ["NET-01"])))
    assert "none usable: no CI record was given" in report.markdown(m)
