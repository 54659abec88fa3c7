"""Which controls a run applied: a real ansible-playbook (local connection) through the real
signhost_events callback, with a play whose second role fails half way. Controls are the
control-id tags of the tasks (toolkit/controls/task_tags.py reads them as the registry does)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from toolkit.controls import play_status, registry, task_tags
from toolkit.runner import ansible_run

ROLES = {
    # role -> tasks (name, tags, fails?). SPN-01 spans two roles; SEC-01 has a task on each
    # side of the failure.
    "first": [("FIR-01 | write a marker", ["first", "FIR-01", "SPN-01"], False)],
    "second": [
        ("SEC-01 | ok before the failure", ["second", "SEC-01"], False),
        ("SEC-02 | this one fails", ["second", "SEC-02"], True),
        ("SEC-01/03 | never runs", ["second", "SEC-01", "SEC-03"], False),
    ],
    "third": [
        ("Validate arguments (runs whatever --tags says)", ["always"], False),
        ("THI-01 | never runs either", ["third", "THI-01", "SPN-01"], False),
    ],
}


def _project(tmp: Path, fail: bool) -> Path:
    for role, tasks in ROLES.items():
        d = tmp / "roles" / role / "tasks"
        d.mkdir(parents=True)
        body = ""
        for name, tags, fails in tasks:
            cmd = "/bin/false" if fails and fail else f"touch {tmp}/{role}.marker"
            body += textwrap.dedent(f"""\
                - name: "{name}"
                  ansible.builtin.command: {cmd}
                  changed_when: false
                  tags: {tags}
                """)
        (d / "main.yml").write_text("---\n" + body)
    handlers = tmp / "roles" / "first" / "handlers"
    handlers.mkdir()
    (handlers / "main.yml").write_text(textwrap.dedent("""\
        ---
        - name: Apply the first role's change
          ansible.builtin.command: touch {tmp}/handler.marker
          changed_when: true
        """).format(tmp=tmp))
    first = tmp / "roles" / "first" / "tasks" / "main.yml"
    first.write_text(first.read_text() + textwrap.dedent("""\
        - name: "FIR-01 | a change that needs the handler"
          ansible.builtin.command: "true"
          changed_when: true
          notify: Apply the first role's change
          tags: [first, FIR-01]
        """))
    (tmp / "playbooks").mkdir()
    (tmp / "playbooks" / "roles").symlink_to("../roles")  # where Ansible looks first
    (tmp / "playbooks" / "play.yml").write_text(
        textwrap.dedent("""\
        ---
        - name: Test play
          hosts: localhost
          connection: local
          gather_facts: false
          roles: [first, second, third]
        """)
    )
    return tmp / "playbooks" / "play.yml"


def _run(tmp_path: Path, fail: bool, tags: str | None = None) -> list[play_status.HostControls]:
    play = _project(tmp_path, fail)
    cmd = [str(Path(ansible_run.build_command("x.yml", ansible_run.PlayOptions())[0])), str(play), "-i", "localhost,"]
    if tags:
        cmd += ["--tags", tags]
    result = ansible_run.run_playbook(cmd, tmp_path / "run.log")
    assert result.events is not None
    reg = registry.Registry(tasks=task_tags.load(tmp_path))
    return play_status.host_status(play_status.read_events(result.events), reg)


@pytest.mark.slow
def test_a_failed_run_says_which_controls_are_applied_and_which_are_not(tmp_path: Path) -> None:
    hosts = _run(tmp_path, fail=True)
    assert [h.host for h in hosts] == ["localhost"]
    hc = hosts[0]
    assert hc.roles == {"first": "applied", "second": "failed", "third": "not reached"}
    assert hc.failed_at is not None and hc.failed_at["task"].startswith("SEC-02")
    assert hc.controls == {
        "FIR-01": "applied",
        "SEC-01": "failed",  # one task ran before the failure, one did not
        "SEC-02": "failed",
        "SEC-03": "not reached",
        "SPN-01": "not reached",  # its first-role task ran, its third-role task did not
        "THI-01": "not reached",
    }
    assert hc.results["FIR-01"] == {"changed": 1, "ok": 1}
    assert hc.results["SEC-02"] == {"failed": 1}
    assert hc.changed() == ["FIR-01"]
    # ansible.cfg's force_handlers: the change of the first role is applied despite the failure
    assert (tmp_path / "handler.marker").exists(), "a notified handler did not run after a failure"
    text = "\n".join(play_status.summary_lines(hosts))
    assert "FAILED at [second : SEC-02 | this one fails]" in text
    assert "THI-01" in text and "partly hardened" in text
    assert "changed the host            controls: FIR-01" in text


@pytest.mark.slow
def test_a_clean_run_applies_every_control(tmp_path: Path) -> None:
    hc = _run(tmp_path, fail=False)[0]
    assert set(hc.controls.values()) == {"applied"} and len(hc.controls) == 6


@pytest.mark.slow
def test_tags_select_controls_and_a_failure_does_not_make_the_rest_unreached(
    tmp_path: Path,
) -> None:
    """--tags FIR-01,SEC-02: what it left out is "not run", before and after the failure."""
    hc = _run(tmp_path, fail=True, tags="FIR-01,SEC-02")[0]
    assert hc.controls == {
        "FIR-01": "applied",
        "SEC-01": "not run",
        "SEC-02": "failed",
        "SEC-03": "not run",
        "SPN-01": "not run",  # its first-role task ran; its third-role task was not selected
        "THI-01": "not run",
    }


def test_control_status_from_events_alone() -> None:
    """The judgement without a run: a templated task name still locates the failure."""
    tasks = task_tags.Project(tasks=[
        task_tags.TaskRef("r/a.yml", 1, "ABC-01 | install {{ x }}", "a", frozenset({"ABC-01"}),
                          "task", "p.yml", 0),
        task_tags.TaskRef("r/a.yml", 5, "ABC-02 | check", "a", frozenset({"ABC-02"}), "task",
                          "p.yml", 1),
        task_tags.TaskRef("r/a.yml", 9, "ABC-01 | reload", "a", frozenset({"ABC-01"}), "task",
                          "p.yml", 2),
    ])
    events = [
        {"event": "play", "playbook": "p.yml", "roles": ["a"], "only_tags": ["all"]},
        {"event": "result", "host": "h", "role": "a", "task": "ABC-01 | install now",
         "status": "changed", "tags": ["ABC-01"]},
        {"event": "result", "host": "h", "role": "a", "task": "ABC-02 | check",
         "status": "failed", "tags": ["ABC-02"]},
    ]
    [hc] = play_status.host_status(events, registry.Registry(tasks=tasks))
    assert hc.controls == {"ABC-01": "failed", "ABC-02": "failed"}
    assert hc.results == {"ABC-01": {"changed": 1}, "ABC-02": {"failed": 1}}
    events[2]["status"] = "ok"
    [hc] = play_status.host_status(events, registry.Registry(tasks=tasks))
    assert hc.controls == {"ABC-01": "not run", "ABC-02": "applied"}


def test_a_truncated_event_file_is_read_up_to_the_cut(tmp_path: Path) -> None:
    f = tmp_path / "e.jsonl"
    f.write_text('{"event": "play", "roles": ["a"]}\n{"event": "result", "host": "h", "sta')
    assert play_status.read_events(f) == [{"event": "play", "roles": ["a"]}]


def test_every_play_stops_at_the_first_failure_without_skipping_handlers() -> None:
    """any_errors_fatal makes Ansible skip notified handlers after a failure (a sysctl written
    but never applied); the plays use max_fail_percentage: 0 and ansible.cfg force_handlers."""
    import configparser

    import yaml

    cfg = configparser.ConfigParser()
    cfg.read(ansible_run.ROOT / "ansible.cfg")
    assert cfg.getboolean("defaults", "force_handlers")
    assert not cfg.has_option("defaults", "any_errors_fatal")
    for book in sorted((ansible_run.ROOT / "playbooks").glob("*.yml")):
        for play in yaml.safe_load(book.read_text()):
            assert "any_errors_fatal" not in play, book.name
            assert play.get("max_fail_percentage") == 0, f"{book.name}: {play.get('name')}"
