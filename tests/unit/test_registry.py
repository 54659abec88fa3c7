"""The threat-model consistency check: each rule fires on a small project built for it.

A project here is a threat model, a role with tasks, a playbook and a posture test, in a
temporary directory; each test breaks one link. The last test checks the real registry
(threat-model/) with the real roles, playbooks and tests.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from toolkit.controls import check as control_check
from toolkit.controls import registry, tables

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
  - id: ORG-01
    title: Key ceremony
    kind: procedure
    procedure: Read the minutes.
    owner: PKI owner
"""

TEST_FILE = """
import pytest

@pytest.mark.control("NET-01")
def test_intruder_gets_nothing(host):
    pass
"""

ROLES = {
    "net/tasks/main.yml": """
        - name: NET-01 | The inbound ruleset
          ansible.builtin.import_tasks: rules.yml
          tags: [net]
    """,
    "net/tasks/rules.yml": """
        - name: NET-01 | Install the ruleset
          ansible.builtin.copy: {dest: /etc/x.nft, content: x, mode: "0600"}
          register: net_ruleset
          tags: [NET-01]

        - name: NET-01 | Load it when it changed
          ansible.builtin.command: nft -f /etc/x.nft
          when: net_ruleset is changed
          changed_when: true
          tags: [NET-01]
    """,
}

PLAYBOOK = """
- name: Site
  hosts: all
  roles:
    - role: net
"""


def project(
    tmp_path: Path,
    threats: str = THREATS,
    controls: str = CONTROLS,
    tests: dict[str, str] | None = None,
    roles: dict[str, str] | None = None,
    playbook: str = PLAYBOOK,
) -> registry.Registry:
    tm = tmp_path / "threat-model"
    (tm / "controls").mkdir(parents=True, exist_ok=True)
    (tm / "threats.yml").write_text(textwrap.dedent(threats))
    (tm / "controls" / "x.yml").write_text(textwrap.dedent(controls))
    posture = tmp_path / "tests" / "posture"
    posture.mkdir(parents=True, exist_ok=True)
    for name, body in (tests if tests is not None else {"test_net.py": TEST_FILE}).items():
        (posture / name).write_text(textwrap.dedent(body))
    for name, body in (ROLES if roles is None else roles).items():
        path = tmp_path / "roles" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("---\n" + textwrap.dedent(body).lstrip("\n"))
    (tmp_path / "playbooks").mkdir(exist_ok=True)
    (tmp_path / "playbooks" / "site.yml").write_text("---\n" + textwrap.dedent(playbook))
    return registry.load(tm)


def make(tmp_path: Path, **kw: str | dict[str, str]) -> list[str]:
    return control_check.check(project(tmp_path, **kw))  # type: ignore[arg-type]


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
    controls = CONTROLS + "  - {id: NET-02, title: Outbound allow-list, kind: technical}\n"
    threats = THREATS.replace("controls: [NET-01]\n", "controls: [NET-01, NET-02]\n", 1)
    roles = dict(ROLES)
    roles["net/tasks/rules.yml"] = ROLES["net/tasks/rules.yml"].replace(
        "tags: [NET-01]", "tags: [NET-01, NET-02]"
    )
    problems = make(tmp_path, threats=threats, controls=controls, roles=roles)
    assert fired(problems, "NET-02", "without a test")
    assert not fired(problems, "NET-02", "without a task")


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
    problems = make(tmp_path, threats=threats)
    assert fired(problems, "T-02", "high risk (4x4=16)", "needs at least two")


@pytest.mark.parametrize(
    ("copy", "key"),
    [
        ("    threats: [T-01, T-02]\n", "threats"),
        ("    tests: [tests/posture/test_net.py::test_intruder_gets_nothing]\n", "tests"),
        ("    implemented_in: [{role: net, tag: net}]\n", "implemented_in"),
    ],
    ids=["threats", "tests", "implemented_in"],
)
def test_a_copy_of_a_derived_link_is_refused(tmp_path: Path, copy: str, key: str) -> None:
    """Threats, tests and tasks of a control come from threats.yml, markers and tags."""
    controls = CONTROLS.replace("    kind: technical\n", "    kind: technical\n" + copy, 1)
    assert fired(make(tmp_path, controls=controls), "controls/x.yml NET-01", f"unknown key {key!r}")


@pytest.mark.parametrize(
    ("typo", "key", "hint"),
    [
        ("    aplies_to: both\n", "aplies_to", "did you mean 'applies_to'"),
        ("    procedur: Read it.\n", "procedur", "did you mean 'procedure'"),
    ],
    ids=["aplies_to", "procedur"],
)
def test_a_typo_in_a_key_names_the_file_the_control_and_the_key(
    tmp_path: Path, typo: str, key: str, hint: str
) -> None:
    controls = CONTROLS.replace("    procedure: Read the minutes.\n",
                                "    procedure: Read the minutes.\n" + typo)
    assert fired(make(tmp_path, controls=controls), "controls/x.yml ORG-01", repr(key), hint)


def test_a_misspelt_kind_key_is_named_and_kind_is_required(tmp_path: Path) -> None:
    controls = CONTROLS.replace("    kind: technical\n", "    knd: technical\n")
    problems = make(tmp_path, controls=controls)
    assert fired(problems, "controls/x.yml NET-01", "unknown key 'knd'", "did you mean 'kind'")
    assert fired(problems, "controls/x.yml NET-01", "kind: missing")


def test_values_outside_the_schema_are_reported(tmp_path: Path) -> None:
    controls = CONTROLS.replace("kind: technical", "kind: technicl").replace(
        "    procedure: Read the minutes.\n", "    procedure: Read the minutes.\n"
        "    applies_to: everywhere\n")
    problems = make(tmp_path, controls=controls)
    assert fired(problems, "NET-01: kind: 'technicl' is not one of")
    assert fired(problems, "ORG-01: applies_to: 'everywhere' is not one of")


def test_a_threats_file_with_an_unknown_key_is_reported(tmp_path: Path) -> None:
    threats = THREATS.replace("    stride: [S]\n", "    stride: [S]\n    likelyhood: 3\n", 1)
    assert fired(make(tmp_path, threats=threats), "threats.yml T-01", "unknown key 'likelyhood'",
                 "did you mean 'likelihood'")


def test_threat_naming_an_undefined_control_is_reported(tmp_path: Path) -> None:
    threats = THREATS.replace("controls: [NET-01, ORG-01]", "controls: [NET-01, ORG-01, SSH-09]")
    assert fired(make(tmp_path, threats=threats), "SSH-09", "T-02", "no controls/*.yml defines")


def test_posture_test_without_a_marker_is_reported(tmp_path: Path) -> None:
    tests = {"test_net.py": TEST_FILE + "\ndef test_orphan(host):\n    pass\n"}
    assert fired(make(tmp_path, tests=tests), "test_orphan", "without a control marker")


def test_control_defined_twice_is_reported(tmp_path: Path) -> None:
    project(tmp_path)
    (tmp_path / "threat-model" / "controls" / "y.yml").write_text(
        "controls:\n  - {id: NET-01, title: again, kind: technical}\n"
    )
    reg = registry.load(tmp_path / "threat-model")
    assert fired(reg.problems, "NET-01", "already defined in controls/x.yml")


def test_ratings_outside_the_scale_are_reported(tmp_path: Path) -> None:
    threats = THREATS.replace("likelihood: 2\n", "likelihood: 7\n", 1).replace("[S]", "[X]")
    problems = make(tmp_path, threats=threats)
    assert fired(problems, "threats.yml T-01: likelihood: 7 is greater than the maximum of 5")
    assert fired(problems, "threats.yml T-01: stride.0: 'X' is not one of")


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
    reg = project(tmp_path)
    readme = tmp_path / "threat-model" / "README.md"
    begin, end = tables._markers("threats")
    rbegin, rend = tables._markers("residuals")
    readme.write_text(f"# x\n{begin}stale\n{end}\n\n{rbegin}{rend}\n")
    assert fired(tables.sync_tables(reg, readme), "'threats' table is out of date")
    assert tables.sync_tables(reg, readme, write=True) == []
    assert tables.sync_tables(reg, readme) == []
    text = readme.read_text()
    assert (
        "| T-02 | High threat with two controls | TE | 4 | 4 | **16** high | NET-01, ORG-01 |"
        in text
    )
    assert "| T-02 | 16 | **1\u00d74=4** low | CISO | two walls |" in text


# --- control ids as tags ---------------------------------------------------------------------


def _rules(**replace: str) -> dict[str, str]:
    """ROLES with replacements in rules.yml (its text as written to the file)."""
    roles = dict(ROLES)
    text = textwrap.dedent(roles["net/tasks/rules.yml"])
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    roles["net/tasks/rules.yml"] = text
    return roles


def test_the_links_are_derived_from_threats_tags_and_markers(tmp_path: Path) -> None:
    reg = project(tmp_path)
    net = reg.controls["NET-01"]
    assert net.threats == ("T-01", "T-02")
    assert net.tests == ("tests/posture/test_net.py::test_intruder_gets_nothing",)
    assert [(t.file, t.name) for t in net.tasks] == [
        ("roles/net/tasks/rules.yml", "NET-01 | Install the ruleset"),
        ("roles/net/tasks/rules.yml", "NET-01 | Load it when it changed"),
    ]
    [where] = net.implemented_in
    assert where["role"] == "net" and where["tag"] == "NET-01"
    assert where["playbooks"] == ["site.yml"] and len(where["tasks"]) == 2
    assert reg.controls["ORG-01"].implemented_in == ({"owner": "PKI owner"},)


def test_a_task_name_citing_an_id_it_is_not_tagged_with_is_reported(tmp_path: Path) -> None:
    roles = _rules(**{"- name: NET-01 | Load it": "- name: NET-01/02 | Load it"})
    problems = make(tmp_path, roles=roles)
    assert fired(problems, "task roles/net/tasks/rules.yml:7", "cites NET-02", "not tagged")


def test_an_import_cites_what_the_tasks_it_imports_are_tagged_with(tmp_path: Path) -> None:
    roles = dict(ROLES, **{"net/tasks/main.yml": ROLES["net/tasks/main.yml"].replace(
        "NET-01 | The inbound", "NET-01..03 | The inbound")})
    problems = make(tmp_path, roles=roles)
    assert fired(problems, "task roles/net/tasks/main.yml:2", "cites NET-02, NET-03")
    assert not fired(problems, "main.yml:2", "NET-01,")


def test_a_tag_that_names_no_control_is_reported(tmp_path: Path) -> None:
    problems = make(tmp_path, roles=_rules(**{"tags: [NET-01]\n\n": "tags: [NET-01, NET-09]\n\n"}))
    assert fired(problems, "task roles/net/tasks/rules.yml:2", "tagged NET-09", "no controls/")


def test_a_technical_control_that_no_task_implements_is_reported(tmp_path: Path) -> None:
    roles = _rules(**{"tags: [NET-01]": "tags: [net-rules]", "NET-01 | ": ""})
    roles["net/tasks/main.yml"] = ROLES["net/tasks/main.yml"].replace("NET-01 | ", "")
    problems = make(tmp_path, roles=roles)
    assert fired(problems, "control NET-01", "without a task tagged NET-01")


def test_code_or_an_outside_implementation_stands_in_for_tasks(tmp_path: Path) -> None:
    (tmp_path / "signer").mkdir()
    (tmp_path / "signer" / "policy.py").write_text("")
    roles = {"net/tasks/main.yml": "- name: Nothing here\n  ansible.builtin.meta: noop\n"}
    code = CONTROLS.replace("    kind: technical\n", "    kind: technical\n    code:\n"
                            "      - {module: signer.policy, where: check_sign}\n")
    assert make(tmp_path, controls=code, roles=roles) == []
    gone = code.replace("signer.policy", "signer.gone")
    assert fired(make(tmp_path, controls=gone, roles=roles),
                 "NET-01", "code: module signer.gone does not exist")
    outside = CONTROLS.replace("    kind: technical\n", "    kind: technical\n"
                               "    implemented_outside: the installer sets it up\n")
    assert make(tmp_path, controls=outside, roles=roles) == []
    # ... but not when a task implements it after all: one of the two is out of date
    assert fired(make(tmp_path, controls=outside), "NET-01", "implemented_outside, but tasks")


def test_a_task_whose_input_another_tag_leaves_out_is_reported(tmp_path: Path) -> None:
    """--tags NET-02 would run the load without the install that registers net_ruleset."""
    controls = CONTROLS + "  - {id: NET-02, title: Outbound, kind: technical}\n"
    threats = THREATS.replace("controls: [NET-01]\n", "controls: [NET-01, NET-02]\n", 1)
    tests = {"test_net.py": TEST_FILE.replace('"NET-01"', '"NET-01", "NET-02"')}
    roles = _rules(**{"changed_when: true\n  tags: [NET-01]": "changed_when: true\n"
                      "  tags: [NET-01, NET-02]"})
    problems = make(tmp_path, controls=controls, threats=threats, tests=tests, roles=roles)
    assert fired(problems, "rules.yml:7", "uses net_ruleset, registered by", "rules.yml:2",
                 "not tagged NET-02")
    fixed = _rules(**{"tags: [NET-01]": "tags: [NET-01, NET-02]"})
    assert make(tmp_path, controls=controls, threats=threats, tests=tests, roles=fixed) == []


def test_a_dynamic_include_must_carry_the_tags_of_what_it_includes(tmp_path: Path) -> None:
    roles = dict(ROLES, **{"net/tasks/main.yml": """
        - name: NET-01 | The inbound ruleset
          ansible.builtin.include_tasks: rules.yml
          tags: [net]
    """})
    problems = make(tmp_path, roles=roles)
    assert fired(problems, "main.yml:2", "cites NET-01, but it is not tagged so")
    assert fired(problems, "main.yml:2", "includes tasks tagged NET-01", "--tags NET-01")


def test_a_tagged_task_that_no_playbook_runs_is_reported(tmp_path: Path) -> None:
    roles = dict(ROLES, **{"net/tasks/spare.yml": """
        - name: NET-01 | Left over
          ansible.builtin.meta: noop
          tags: [NET-01]
    """})
    assert fired(make(tmp_path, roles=roles), "spare.yml:2", "no playbook runs it")


def test_the_control_table_of_control_ids_is_generated_and_checked(tmp_path: Path) -> None:
    reg = project(tmp_path)
    doc = tmp_path / "threat-model" / "CONTROL_IDS.md"
    begin, end = tables._markers("controls")
    doc.write_text(f"# ids\n{begin}{end}\n")
    assert fired(tables.sync_tables(reg, doc), "'controls' table is out of date")
    assert tables.sync_tables(reg, doc, write=True) == []
    text = doc.read_text()
    assert "| NET-01 | controls/x.yml | technical | both | Inbound default drop | T-01, T-02 | " \
           "roles: net |" in text
    assert "| ORG-01 | controls/x.yml | procedure | both | Key ceremony | T-02 | people: PKI owner |" \
           in text


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
    """threat-model/, roles/, playbooks/ and tests/ as committed (same as the check task)."""
    reg = registry.load()
    problems = control_check.check(reg)
    problems += tables.sync_docs(reg)
    if problems:
        pytest.fail(
            f"{len(problems)} threat-model problem(s) (same as `invoke threat-model.check`):\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )
