"""Outside auditors as evidence of named controls (toolkit/controls/auditors.py): each threshold
is written once, in the control's YAML, and every control's auditor results reach the report
under that control, in both renderings.
"""

from __future__ import annotations

import html as html_mod
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_outside_auditors import LYNIS_DAT, SSH_AUDIT, SYSTEMD
from toolkit.assurance import outside_auditors, report
from toolkit.controls import auditors, registry, tables
from toolkit.controls import check as control_check
from toolkit.controls.registry import Threshold

ROOT = Path(__file__).resolve().parents[2]
TEXT = (".py", ".yml", ".yaml", ".md", ".j2", ".json", ".toml", ".cfg", ".txt", ".sh")
# Recorded outputs of real runs: figures, not thresholds.
RECORDED = "tests/unit/data/"
# The names an auditor goes by in prose and code.
ALIASES = {"lynis": r"lynis", "ssh-audit": r"ssh[-_]audit", "systemd-analyze": r"systemd[-_]analyze"}
# What reads as a bound: a comparison, or a word that introduces one.
_OP = (r"(?:<=|>=|\u2264|\u2265|<|>|\bat[ _]most\b:?|\bat[ _]least\b:?|\btargets?\b:?|"
       r"\bthresholds?\b:?|\bmax(?:imum)?\b:?|\bmin(?:imum)?\b:?|\blimit\b:?)")


def _value(limit: float) -> str:
    """2.0 -> matches 2, 2.0, 2.00; 85 -> 85, 85.0; never 285 or 2.05."""
    number = float(limit)
    base = str(int(number)) if number.is_integer() else repr(number)
    return rf"(?<![\w.]){re.escape(base)}(?:\.0+)?(?![\w.]|\.\d)"


def copy_patterns(th: Threshold) -> list[re.Pattern[str]]:
    """What a second copy of a threshold looks like on one line: the figure's name (or its
    auditor's) with the limit as a bound ("exposure <= 2.0", "target >= 85", `EXPOSURE_MAX =
    2.0`, `"exposure": 2.0`, "hardening index 85 or more")."""
    # The figure as a word of its own ("fail", not "failed"; EXPOSURE_MAX is "exposure").
    figure = (r"(?:(?<![a-z])" + re.escape(th.figure).replace("_", "[ _-]?") + r"(?![a-z])|"
              + ALIASES[th.auditor] + ")")
    value = _value(th.limit)
    return [
        re.compile(rf"{figure}\W{{0,4}}{_OP}\s*{value}", re.I),
        re.compile(rf"{figure}.*{_OP}\s*{value}", re.I),
        re.compile(rf"{_OP}\s*{value}.*{figure}", re.I),
        re.compile(rf"{figure}\w*\W{{0,3}}[:=]\s*{value}", re.I),
        re.compile(rf"{figure}.*?{value}\s+or\s+(?:more|less|fewer|better|higher|lower|above|"
                   r"below)", re.I),
    ]


def _without_threshold_blocks(rel: str, text: str) -> str:
    """The one place a threshold is written, left out: `auditors:` blocks of the controls' YAML
    and the generated tables (rendered from them)."""
    if rel.startswith("threat-model/controls/"):
        kept: list[str] = []
        block: int | None = None
        for line in text.splitlines():
            indent = len(line) - len(line.lstrip())
            if block is not None and (not line.strip() or indent > block or
                                      (line.lstrip().startswith("- ") and indent == block)):
                kept.append("")  # the line numbers stay those of the file
                continue
            block = indent if line.lstrip().startswith("auditors:") else None
            kept.append("" if block is not None else line)
        text = "\n".join(kept)
    for name in {n for names in tables.DOCS.values() for n in names}:
        begin, end = tables._markers(name)
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), "", text, flags=re.S)
    return text


def copies(root: Path, files: list[str], thresholds: list[Threshold]) -> list[str]:
    """`file:line: text (copy of CONTROL's auditor figure bound)` for each second copy."""
    out: list[str] = []
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = _without_threshold_blocks(rel, text)
        for th in thresholds:
            if not re.search(ALIASES[th.auditor], text, re.I):
                continue  # a file that never names the auditor speaks of other things
            pats = copy_patterns(th)
            lines = text.splitlines()
            for n, line in enumerate(lines, 1):
                # Prose wraps: a bound may begin on one line and end on the next.
                after = lines[n] if n < len(lines) else ""
                if any(p.search(line) for p in pats) or (
                        not any(p.search(after) for p in pats)
                        and any(p.search(f"{line} {after}") for p in pats)):
                    out.append(f"{rel}:{n}: {line.strip()[:120]} (a copy of {th.control}'s "
                               f"{th})")
    return out


def _tracked() -> list[str]:
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout
    return sorted(n for n in names.decode().split("\0")
                  if n.endswith(TEXT) and not n.startswith(RECORDED)
                  and n != "tests/unit/test_auditor_evidence.py")


def test_the_registry_states_the_auditors_thresholds() -> None:
    found = {(th.control, th.auditor, th.figure) for th in
             auditors.thresholds(registry.load_controls().values())}
    assert found == {("BASE-01", "lynis", "hardening_index"),
                     ("SSH-05", "ssh-audit", "fail"), ("SSH-05", "ssh-audit", "warn"),
                     ("SGN-06", "systemd-analyze", "exposure")}


def test_no_threshold_is_written_a_second_time_anywhere_in_the_repository() -> None:
    thresholds = auditors.thresholds(registry.load_controls().values())
    found = copies(ROOT, _tracked(), thresholds)
    assert found == [], "read it from the control (toolkit.controls.auditors):\n" + "\n".join(
        found)


@pytest.mark.parametrize("line", [
    "EXPOSURE_MAX = 2.0",
    'TARGETS = {"lynis_hardening_index": 85, "exposure": 2.0}',
    "title: signerd runs sandboxed; systemd-analyze exposure <= 2.0",
    '"strict": "fail when a yardstick misses its target (Lynis >= 85, ssh-audit 0/0, "',
    "`invoke audit` runs Lynis beside the posture suite (target: hardening index 85 or more).",
    "ok = sa['fail'] <= 0 and sa['warn'] <= 0  # ssh-audit",
    "      - {auditor: systemd-analyze, figure: exposure, at_most: 2.0}",
    "`invoke audit` also runs ssh-audit from the build network (target:\n0 fail, 0 warn).",
])
def test_a_second_copy_is_found(tmp_path: Path, line: str) -> None:
    (tmp_path / "x.py").write_text(f"# ssh-audit, lynis, systemd-analyze\n{line}\n")
    thresholds = auditors.thresholds(registry.load_controls().values())
    assert copies(tmp_path, ["x.py"], thresholds), line


@pytest.mark.parametrize("line", [
    "systemd-analyze exposure 1.9 OK",
    'assert found["figures"]["fail"] == 0, found["details"]  # ssh-audit',
    "(0 fail, 0 warn; such clients are refused) ssh-audit",
    "lynis hardening index 62, 2 warnings",
    "exposure <= 2.05 and hardening_index >= 850",
])
def test_a_figure_or_an_outcome_is_not_a_copy(tmp_path: Path, line: str) -> None:
    (tmp_path / "x.py").write_text(f"# ssh-audit, lynis, systemd-analyze\n{line}\n")
    thresholds = auditors.thresholds(registry.load_controls().values())
    assert copies(tmp_path, ["x.py"], thresholds) == [], line


def test_the_controls_yaml_is_the_one_place_and_is_left_out_of_the_scan(tmp_path: Path) -> None:
    tm = tmp_path / "threat-model" / "controls"
    tm.mkdir(parents=True)
    (tm / "x.yml").write_text(textwrap.dedent("""
        controls:
          - id: SGN-06
            title: Sandboxed
            auditors:
              - {auditor: systemd-analyze, figure: exposure, at_most: 2.0}
              - auditor: systemd-analyze
                figure: exposure
                at_most: 2.0
            kind: technical
          - id: SGN-07
            title: systemd-analyze exposure <= 2.0
    """))
    thresholds = auditors.thresholds(registry.load_controls().values())
    found = copies(tmp_path, ["threat-model/controls/x.yml"], thresholds)
    assert len(found) == 1 and found[0].startswith("threat-model/controls/x.yml:12: title:"), found


# --- the registry ---------------------------------------------------------------------------

THREATS = """
threats:
  - {id: T-01, title: t, stride: [S], likelihood: 2, impact: 2, controls: [SGN-06, SSH-05]}
"""


def _registry(tmp_path: Path, controls: str) -> registry.Registry:
    tm = tmp_path / "threat-model"
    (tm / "controls").mkdir(parents=True)
    (tm / "threats.yml").write_text(textwrap.dedent(THREATS))
    (tm / "controls" / "x.yml").write_text(textwrap.dedent(controls))
    return registry.load(tm)


def test_a_threshold_stated_by_two_controls_fails_the_check(tmp_path: Path) -> None:
    reg = _registry(tmp_path, """
        controls:
          - id: SGN-06
            title: Sandbox
            kind: technical
            auditors: [{auditor: systemd-analyze, figure: exposure, at_most: 2.5}]
          - id: SSH-05
            title: Algorithms
            kind: technical
            auditors: [{auditor: systemd-analyze, figure: exposure, at_most: 3.5}]
    """)
    problems = control_check.check(reg)
    assert [p for p in problems if "threshold" in p] == [
        "control SSH-05 (controls/x.yml): auditors: systemd-analyze exposure <= 3.5 is a second "
        "threshold for systemd-analyze exposure (the first is under SGN-06): a threshold is "
        "written once"]


def test_a_lower_and_an_upper_bound_of_one_figure_are_two_thresholds(tmp_path: Path) -> None:
    reg = _registry(tmp_path, """
        controls:
          - id: SGN-06
            title: Sandbox
            kind: technical
            auditors:
              - {auditor: lynis, figure: warnings, at_least: 1}
              - {auditor: lynis, figure: warnings, at_most: 4}
          - {id: SSH-05, title: Algorithms, kind: technical}
    """)
    assert not [p for p in control_check.check(reg) if "threshold" in p]
    assert [str(t) for t in reg.controls["SGN-06"].auditors] == [
        "lynis warnings >= 1", "lynis warnings <= 4"]


@pytest.mark.parametrize(("entry", "said"), [
    ("{auditor: nmap, figure: ports, at_most: 1}", "auditors.0.auditor: 'nmap' is not one of"),
    ("{auditor: lynis, figure: warnings}", "auditors.0: {'auditor': 'lynis', 'figure': "
                                           "'warnings'} is not valid under any of"),
    ("{auditor: lynis, figure: warnings, at_most: 1, at_least: 0}", "is valid under each of"),
    ("{auditor: lynis, figure: warnings, below: 1}", "unknown key 'below'"),
])
def test_a_threshold_the_schema_cannot_read_is_named(tmp_path: Path, entry: str,
                                                       said: str) -> None:
    reg = _registry(tmp_path, f"""
        controls:
          - {{id: SGN-06, title: Sandbox, kind: technical, auditors: [{entry}]}}
          - {{id: SSH-05, title: Algorithms, kind: technical}}
    """)
    assert [p for p in reg.problems if p.startswith("controls/x.yml SGN-06") and said in p], \
        reg.problems


def test_a_threshold_names_a_figure_its_auditor_gives() -> None:
    """A figure that the auditor's parser never gives would be judged 'no figure' forever."""
    given = {
        "lynis": outside_auditors.parse_lynis_report(LYNIS_DAT)["figures"],
        "ssh-audit": outside_auditors.parse_ssh_audit(SSH_AUDIT)["figures"],
        "systemd-analyze": (outside_auditors.parse_exposure(SYSTEMD) or {})["figures"],
    }
    assert set(given) == set(registry.AUDITORS)
    for th in auditors.thresholds(registry.load_controls().values()):
        assert isinstance(given[th.auditor].get(th.figure), int | float), th


def test_a_posture_test_reads_the_same_threshold() -> None:
    th = auditors.threshold("SGN-06", "systemd-analyze", "exposure")
    assert th.met(th.limit) and not th.met(th.limit + 0.1)
    with pytest.raises(LookupError, match=r"SSH-05: .* 0 threshold"):
        auditors.threshold("SSH-05", "systemd-analyze", "exposure")


# --- judged, and rendered under the control -------------------------------------------------


def test_a_figure_is_met_missed_or_says_why_there_is_none() -> None:
    controls = registry.load_controls().values()
    ssh = auditors.judge(controls, {"ssh-audit": {"figures": {"fail": 0}}})["SSH-05"]
    assert [(e["figure"], e["result"]) for e in ssh] == [("fail", "met"), ("warn", "no figure")]
    ssh = auditors.judge(controls, {"ssh-audit": {"figures": {"fail": 1, "warn": 0}}})["SSH-05"]
    assert [e["result"] for e in ssh] == ["NOT met", "met"]
    judged = auditors.judge(controls, {"lynis": {"error": "not installed"}})
    assert judged["BASE-01"][0]["result"] == "error"
    assert "not installed" in judged["BASE-01"][0]["text"]
    assert judged["SGN-06"][0]["result"] == "not audited"


def _figures(miss: str | None = None) -> dict[str, Any]:
    """A figure for every threshold of the registry: on its bound (met), or past it for the
    auditor `miss`."""
    out: dict[str, Any] = {}
    for th in auditors.thresholds(registry.load_controls().values()):
        step = (1 if th.bound == "at_most" else -1) if th.auditor == miss else 0
        figures = out.setdefault(th.auditor, {"figures": {}, "ran_at": "2026-12-06T12:00:00Z"})
        figures["figures"][th.figure] = th.limit + step
    return out


def _row(text: str, cid: str, html: bool) -> str:
    """The control's row of the Controls table."""
    if html:
        m = re.search(rf'<tr id="{cid}">.*?</tr>', text, re.S)
    else:
        m = re.search(rf'^\| <a id="{cid.lower()}"></a>{cid} \|.*$', text, re.M)
    assert m, f"{cid}: no row"
    return m.group(0)


def test_every_controls_auditor_evidence_is_rendered_under_it() -> None:
    reg = registry.load()
    m = report.build(reg, registry.collect_tests(), {"tests": []}, host="h", kind="production",
                     target="ssh://h", auditors=_figures())
    md, page = report.markdown(m), report.html(m)
    thresholds = auditors.thresholds(reg.controls.values())
    assert thresholds
    for th in thresholds:
        entry = next(e for e in m["controls"][th.control]["auditors"]
                     if e["figure"] == th.figure)
        assert entry["result"] == "met" and entry["threshold"] == th.text
        for text, html in ((md, False), (page, True)):
            row = html_mod.unescape(_row(text, th.control, html))
            assert f"{th.auditor} {th.figure} {th.limit} (threshold {th.text}: met)" in row, row
        # and in the auditors' section, linked to the control
        assert f"[{th.control}](#{th.control.lower()})" in md.split("## Independent auditors")[1]
    others = [c for c in m["controls"].values() if c["id"] not in {t.control for t in thresholds}]
    assert others and all(c["auditors"] == [] for c in others)


def test_a_missed_threshold_is_shown_and_warned_but_the_tests_decide_the_status() -> None:
    reg = registry.load()
    refs = registry.collect_tests()
    run = {"tests": [{"nodeid": "tests/posture/test_signer.py::test_signer_unit_sandbox_property",
                      "outcome": "passed", "duration": 1.0, "controls": ["SGN-06"],
                      "message": ""}]}
    kw: dict[str, Any] = {"host": "h", "kind": "production", "target": "ssh://h"}
    good = report.build(reg, refs, run, auditors=_figures(), **kw)
    bad = report.build(reg, refs, run, auditors=_figures(miss="systemd-analyze"), **kw)
    assert good["controls"]["SGN-06"]["status"] == bad["controls"]["SGN-06"]["status"] == "passed"
    [e] = bad["controls"]["SGN-06"]["auditors"]
    assert e["result"] == "NOT met"
    assert [w for w in bad["warnings"] if w.startswith("SGN-06: systemd-analyze exposure")]
    assert not [w for w in good["warnings"] if "outside auditor" in w]
    assert "NOT met" in _row(report.markdown(bad), "SGN-06", html=False)
    assert "NOT met" in _row(report.html(bad), "SGN-06", html=True)
