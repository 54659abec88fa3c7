"""Control ids as Ansible tags: citations in names, Ansible's tag selection, and the YAML walk
(checked against `ansible-playbook --list-tasks` on the real playbooks)."""

from __future__ import annotations

import itertools
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from toolkit.controls import task_tags
from toolkit.runner import ansible_run


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("SSH-05 | Remove weak moduli", ("SSH-05",)),
        ("SSH-01..04 | Install sshd_config", ("SSH-01", "SSH-02", "SSH-03", "SSH-04")),
        ("KRN-01/02 | Sysctls", ("KRN-01", "KRN-02")),
        ("BASE-01, NET-05 | Purge", ("BASE-01", "NET-05")),
        ("SSH-07, NET-04 | Roll-back helper (see AUD-01..02)", ("SSH-07", "NET-04", "AUD-01",
                                                              "AUD-02")),
        ("Hash with SHA-512, sign with RSA-3072 and P-256", ()),
        ("Token packages", ()),
    ],
)
def test_ids_cited_in_a_task_name(name: str, ids: tuple[str, ...]) -> None:
    assert task_tags.cited(name) == ids


def test_tag_selection_is_ansibles() -> None:
    """toolkit's selected() against ansible.playbook.taggable on every small combination."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.playbook.task import Task

    words = ["always", "never", "all", "tagged", "untagged", "SSH-05", "ssh"]
    tag_sets = [set(c) for n in range(3) for c in itertools.combinations(words[:2] + words[5:], n)]
    # 12 skip sets reach every rule of --skip-tags (all, always, tagged, a plain tag)
    selections = [set(c) for n in range(3) for c in itertools.combinations(words, n)]
    loader = DataLoader()
    for tags, only, skip in itertools.product(tag_sets, selections, selections[:12]):
        task = Task()
        task._loader = loader
        task.tags = sorted(tags)
        want = task.evaluate_tags(only or {"all"}, skip, {})
        got = task_tags.selected(tags, only or {"all"}, skip)
        assert got == want, (tags, only, skip)


ROLE = {
    "main.yml": """
        - name: Imported, passes its tags down
          ansible.builtin.import_tasks: inner.yml
          tags: [r, r-inner]
        - name: Included, passes only apply's tags down
          ansible.builtin.include_tasks:
            file: dyn.yml
            apply: {tags: [applied]}
          tags: [XYZ-02, own]
        - name: A block
          tags: [XYZ-03]
          block:
            - name: XYZ-03 | in the block
              ansible.builtin.set_fact: {r_fact: 1}
          rescue:
            - name: XYZ-03 | rescue
              ansible.builtin.meta: noop
          always:
            - name: XYZ-03 | always
              ansible.builtin.debug: {msg: "{{ r_fact }}"}
    """,
    "inner.yml": """
        - name: XYZ-01 | inner
          ansible.builtin.command: "true"
          register: r_inner
          changed_when: false
          tags: [XYZ-01]
    """,
    "dyn.yml": """
        - name: XYZ-02 | dynamic
          ansible.builtin.meta: noop
          tags: [XYZ-02]
    """,
    "extra.yml": """
        - name: XYZ-04 | from tasks_from
          ansible.builtin.meta: noop
          tags: [XYZ-04]
    """,
}
PLAY = """
- name: Play
  hosts: all
  tags: [p]
  roles:
    - role: r
      tags: [role-tag]
  post_tasks:
    - name: XYZ-04 | the role's extra tasks
      ansible.builtin.include_role:
        name: r
        tasks_from: extra
        apply: {tags: [post]}
      tags: [XYZ-04, post]
"""


def test_the_walk_composes_tags_as_ansible_does(tmp_path: Path) -> None:
    tasks_dir = tmp_path / "roles" / "r" / "tasks"
    tasks_dir.mkdir(parents=True)
    for name, body in ROLE.items():
        (tasks_dir / name).write_text("---\n" + textwrap.dedent(body).lstrip("\n"))
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks" / "site.yml").write_text("---\n" + textwrap.dedent(PLAY))
    proj = task_tags.load(tmp_path)
    assert proj.problems == []
    by = {t.name: t for t in proj.of_playbook("site.yml")}
    base = {"p", "role-tag"}
    assert by["XYZ-01 | inner"].tags == base | {"r", "r-inner", "XYZ-01"}
    assert by["XYZ-01 | inner"].registers == ("r_inner",)
    assert by["XYZ-01 | inner"].where == "roles/r/tasks/inner.yml:2"
    include = by["Included, passes only apply's tags down"]
    assert include.kind == "include" and include.inner == {"XYZ-02"}
    assert by["XYZ-02 | dynamic"].tags == base | {"applied", "XYZ-02"}  # not "own"
    assert by["XYZ-02 | dynamic"].dynamic
    assert by["XYZ-03 | in the block"].registers == ("r_fact",)
    assert by["XYZ-03 | rescue"].section == "rescue"
    assert by["XYZ-03 | always"].section == "always"
    assert by["XYZ-03 | always"].tags == base | {"XYZ-03"}
    assert by["XYZ-04 | from tasks_from"].tags == {"p", "post", "XYZ-04"}
    assert by["XYZ-04 | from tasks_from"].role == "r"
    assert by["XYZ-04 | the role's extra tasks"].role is None
    order = [t.name for t in proj.of_playbook("site.yml")]
    assert order.index("Imported, passes its tags down") < order.index("XYZ-01 | inner")
    assert order[-1] == "XYZ-04 | from tasks_from"
    assert [t.name for t in proj.implementing("XYZ-04")] == [
        "XYZ-04 | the role's extra tasks", "XYZ-04 | from tasks_from"]
    assert task_tags.check(proj, {"XYZ-01", "XYZ-02", "XYZ-03", "XYZ-04"}, ()) == []


SHARED = """
- name: Probe, retried on its own result
  ansible.builtin.command: "true"
  register: shared_probe
  until: shared_probe.rc == 0
  changed_when: false
- name: Uses the probe of this import
  ansible.builtin.debug: {msg: "{{ shared_probe.rc }}"}
"""
SHARED_PLAY = """
- name: Play
  hosts: all
  tasks:
    - name: XYZ-01 | the first change, guarded
      ansible.builtin.import_tasks: ../shared.yml
      tags: [XYZ-01]
    - name: XYZ-02 | the second change, guarded by the same file
      ansible.builtin.import_tasks: ../shared.yml
      tags: [XYZ-02]
    - name: XYZ-03 | a task that needs the probe but not its tag
      ansible.builtin.debug: {msg: "{{ shared_probe.rc }}"}
      tags: [XYZ-03]
"""


def test_a_file_imported_under_two_tags_uses_its_own_registers(tmp_path: Path) -> None:
    """The roll-back sequence is one file imported by ssh and firewall: each import's probe
    reads its own result, which --tags of either control selects; a task outside that reads
    the probe without carrying its tags is still reported."""
    (tmp_path / "shared.yml").write_text("---\n" + textwrap.dedent(SHARED).lstrip("\n"))
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks" / "site.yml").write_text("---\n" + textwrap.dedent(SHARED_PLAY))
    proj = task_tags.load(tmp_path)
    assert proj.problems == []
    problems = task_tags.check(proj, {"XYZ-01", "XYZ-02", "XYZ-03"}, ())
    assert len(problems) == 1, problems
    assert problems[0].startswith("task playbooks/site.yml:")
    assert "uses shared_probe" in problems[0] and "not tagged XYZ-03" in problems[0]


_LISTED = re.compile(r"^\s{6}(?:(?P<role>\S+) : )?(?P<name>.*?)\tTAGS: \[(?P<tags>.*)\]$")


@pytest.mark.slow
def test_the_walk_agrees_with_ansible_playbook_list_tasks() -> None:
    """Every task Ansible lists for the real playbooks, with the same tags, and no other
    (Ansible leaves out what only runs later: always/rescue sections, dynamic includes)."""
    books = sorted(p.name for p in (ansible_run.ROOT / "playbooks").glob("*.yml"))
    out = subprocess.run(
        [ansible_run.venv_exe("ansible-playbook"), "--list-tasks", "-i", "localhost,",
         *(f"playbooks/{b}" for b in books)],
        cwd=ansible_run.ROOT, env=ansible_run.ansible_env(), capture_output=True, text=True,
        check=True, timeout=120,
    ).stdout
    listed: list[tuple[str | None, str, frozenset[str]]] = []
    for line in out.splitlines():
        m = _LISTED.match(line)
        if m and not m["name"].startswith("Validating arguments against arg spec"):
            tags = frozenset(t.strip() for t in m["tags"].split(",") if t.strip())
            listed.append((m["role"], m["name"], tags))
    proj = task_tags.load(ansible_run.ROOT)
    mine = [
        (t.role, t.name, t.tags)
        for book in books
        for t in proj.of_playbook(book)
        if t.runs and t.section == "block" and not t.dynamic
    ]
    assert listed, out
    assert mine == listed
