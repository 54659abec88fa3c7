"""The threat-model consistency check: each rule fires on a small registry built for it.

The last test checks the real registry (threat-model/); it fails, listing every missing link,
until every control family named in threats.yml is defined and tested.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from toolkit import registry

THREATS = """
threats:
  - id: T-01
    title: Low threat with one control
    stride: [S]
    likelihood: 2
    impact: 2
    controls: [NET-01]
  - id: T-02
    title: High threat with two controls
    stride: [T, E]
    likelihood: 4
    impact: 4
    controls: [NET-01, ORG-01]
    residual: {accepted: true, likelihood: 1, impact: 4, rationale: two walls, owner: CISO}
"""

CONTROLS = """
controls:
  - id: NET-01
    title: Inbound default drop
    kind: technical
    tests: [tests/posture/test_net.py::test_intruder_gets_nothing]
    threats: [T-01, T-02]
  - id: ORG-01
    title: Key ceremony
    kind: procedure
    procedure: Read the minutes.
    threats: [T-02]
"""

TEST_FILE = """
import pytest

@pytest.mark.control("NET-01")
def test_intruder_gets_nothing(host):
    pass
"""


def make(
    tmp_path: Path,
    threats: str = THREATS,
    controls: str = CONTROLS,
    tests: dict[str, str] | None = None,
) -> list[str]:
    tm = tmp_path / "threat-model"
    (tm / "controls").mkdir(parents=True, exist_ok=True)
    (tm / "threats.yml").write_text(textwrap.dedent(threats))
    (tm / "controls" / "x.yml").write_text(textwrap.dedent(controls))
    posture = tmp_path / "tests" / "posture"
    posture.mkdir(parents=True, exist_ok=True)
    for name, body in (tests if tests is not None else {"test_net.py": TEST_FILE}).items():
        (posture / name).write_text(textwrap.dedent(body))
    reg = registry.load(tm)
    return registry.check(reg, registry.collect_tests(tmp_path / "tests"))


def fired(problems: list[str], *needles: str) -> bool:
    return any(all(n in p for n in needles) for p in problems)


def test_a_consistent_registry_has_no_problems(tmp_path: Path) -> None:
    assert make(tmp_path) == []


def test_threat_without_control_or_accepted_residual_is_reported(tmp_path: Path) -> None:
    threats = (
        THREATS
        + """
  - id: T-03
    title: Nobody owns this
    stride: [D]
    likelihood: 2
    impact: 2
    controls: []
"""
    )
    assert fired(make(tmp_path, threats=threats), "T-03", "no control and no accepted residual")


def test_threat_with_accepted_residual_and_no_control_is_fine(tmp_path: Path) -> None:
    threats = (
        THREATS
        + """
  - id: T-03
    title: Accepted as is
    stride: [D]
    likelihood: 1
    impact: 2
    controls: []
    residual: {accepted: true, rationale: cheap to recover, owner: Ops lead}
"""
    )
    assert make(tmp_path, threats=threats) == []


def test_accepted_residual_needs_rationale_and_owner(tmp_path: Path) -> None:
    threats = THREATS.replace("rationale: two walls, owner: CISO", "rationale: ''")
    assert fired(make(tmp_path, threats=threats), "T-02", "needs a rationale and an owner")


def test_technical_control_without_test_is_reported(tmp_path: Path) -> None:
    controls = (
        CONTROLS
        + """
  - id: NET-02
    title: Outbound allow-list
    kind: technical
    threats: [T-01]
"""
    )
    threats = THREATS.replace("controls: [NET-01]\n", "controls: [NET-01, NET-02]\n", 1)
    assert fired(make(tmp_path, threats=threats, controls=controls), "NET-02", "without a test")


def test_a_marker_alone_counts_as_the_controls_test(tmp_path: Path) -> None:
    controls = CONTROLS.replace(
        "    tests: [tests/posture/test_net.py::test_intruder_gets_nothing]\n", ""
    )
    assert make(tmp_path, controls=controls) == []


def test_procedure_without_audit_text_is_reported(tmp_path: Path) -> None:
    controls = CONTROLS.replace("    procedure: Read the minutes.\n", "")
    assert fired(make(tmp_path, controls=controls), "ORG-01", "procedure without audit text")


def test_marker_naming_an_unknown_control_is_reported(tmp_path: Path) -> None:
    tests = {
        "test_net.py": TEST_FILE,
        "test_typo.py": """
            import pytest

            @pytest.mark.control("NET-99")
            def test_something(host):
                pass
        """,
    }
    problems = make(tmp_path, tests=tests)
    assert fired(problems, "test_typo.py::test_something", "unknown control NET-99")


def test_markers_on_modules_classes_and_params_are_read(tmp_path: Path) -> None:
    tests = {
        "test_net.py": """
            import pytest
            from pytest import mark

            pytestmark = [pytest.mark.control("NET-01")]

            def test_intruder_gets_nothing(host):
                pass

            @mark.control("BAD-01")
            class TestGroup:
                pytestmark = pytest.mark.control("BAD-02")

                def test_in_class(self):
                    pass

            @pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.control("BAD-03"))])
            def test_param(x):
                pass
        """
    }
    refs = {r.nodeid: r.controls for r in registry.collect_tests(_write(tmp_path, tests))}
    assert refs["tests/posture/test_net.py::test_intruder_gets_nothing"] == ("NET-01",)
    assert refs["tests/posture/test_net.py::TestGroup::test_in_class"] == (
        "NET-01",
        "BAD-01",
        "BAD-02",
    )
    assert refs["tests/posture/test_net.py::test_param"] == ("NET-01", "BAD-03")


def _write(tmp_path: Path, tests: dict[str, str]) -> Path:
    posture = tmp_path / "tests" / "posture"
    posture.mkdir(parents=True)
    for name, body in tests.items():
        (posture / name).write_text(textwrap.dedent(body))
    return tmp_path / "tests"


def test_high_risk_threat_on_a_single_control_is_reported(tmp_path: Path) -> None:
    threats = THREATS.replace("controls: [NET-01, ORG-01]", "controls: [NET-01]")
    controls = CONTROLS.replace("threats: [T-02]", "threats: []")
    problems = make(tmp_path, threats=threats, controls=controls)
    assert fired(problems, "T-02", "high risk (4x4=16)", "needs at least two")


def test_control_naming_an_unknown_threat_is_reported(tmp_path: Path) -> None:
    controls = CONTROLS.replace("threats: [T-02]", "threats: [T-02, T-77]")
    assert fired(make(tmp_path, controls=controls), "ORG-01", "T-77", "does not define")


def test_control_claiming_a_threat_that_does_not_list_it_is_reported(tmp_path: Path) -> None:
    controls = CONTROLS.replace("threats: [T-02]", "threats: [T-01, T-02]")
    assert fired(make(tmp_path, controls=controls), "ORG-01", "lists threat T-01", "does not list")


def test_threat_naming_an_undefined_control_is_reported(tmp_path: Path) -> None:
    threats = THREATS.replace("controls: [NET-01, ORG-01]", "controls: [NET-01, ORG-01, SSH-09]")
    assert fired(make(tmp_path, threats=threats), "SSH-09", "T-02", "no controls/*.yml defines")


def test_listed_test_that_does_not_exist_is_reported(tmp_path: Path) -> None:
    controls = CONTROLS.replace("test_intruder_gets_nothing]", "test_renamed]")
    assert fired(make(tmp_path, controls=controls), "NET-01", "test_renamed", "does not exist")


def test_posture_test_without_a_marker_is_reported(tmp_path: Path) -> None:
    tests = {"test_net.py": TEST_FILE + "\ndef test_orphan(host):\n    pass\n"}
    assert fired(make(tmp_path, tests=tests), "test_orphan", "without a control marker")


def test_control_defined_twice_is_reported(tmp_path: Path) -> None:
    make(tmp_path)
    (tmp_path / "threat-model" / "controls" / "y.yml").write_text(
        "controls:\n  - {id: NET-01, title: again, kind: technical}\n"
    )
    reg = registry.load(tmp_path / "threat-model")
    assert fired(reg.problems, "NET-01", "already defined in controls/x.yml")


def test_ratings_outside_the_scale_are_reported(tmp_path: Path) -> None:
    threats = THREATS.replace("likelihood: 2\n", "likelihood: 7\n", 1).replace("[S]", "[X]")
    problems = make(tmp_path, threats=threats)
    assert fired(problems, "T-01", "likelihood must be an integer 1-5")
    assert fired(problems, "T-01", "unknown STRIDE category 'X'")


def test_retired_threats_are_ignored(tmp_path: Path) -> None:
    threats = (
        THREATS
        + """
  - id: T-03
    title: No longer applies
    stride: [D]
    likelihood: 5
    impact: 5
    controls: []
    retired: true
"""
    )
    assert make(tmp_path, threats=threats) == []


def test_readme_tables_are_generated_and_checked(tmp_path: Path) -> None:
    make(tmp_path)
    reg = registry.load(tmp_path / "threat-model")
    readme = tmp_path / "threat-model" / "README.md"
    begin, end = registry._markers("threats")
    rbegin, rend = registry._markers("residuals")
    readme.write_text(f"# x\n{begin}stale\n{end}\n\n{rbegin}{rend}\n")
    assert fired(registry.sync_tables(reg, readme), "'threats' table is out of date")
    assert registry.sync_tables(reg, readme, write=True) == []
    assert registry.sync_tables(reg, readme) == []
    text = readme.read_text()
    assert (
        "| T-02 | High threat with two controls | TE | 4 | 4 | **16** high | NET-01, ORG-01 |"
        in text
    )
    assert "| T-02 | 16 | **1\u00d74=4** low | CISO | two walls |" in text


def test_risk_bands() -> None:
    assert [registry.band(r) for r in (1, 5, 6, 11, 12, 19, 20, 25)] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "high",
        "critical",
        "critical",
    ]


def test_the_real_registry_is_consistent() -> None:
    """threat-model/ as committed: fails with the full list until every control is in place."""
    reg = registry.load()
    problems = registry.check(reg, registry.collect_tests())
    problems += registry.sync_tables(reg, registry.THREAT_MODEL / "README.md")
    if problems:
        pytest.fail(
            f"{len(problems)} threat-model problem(s) (same as `invoke threat-model.check`):\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )
