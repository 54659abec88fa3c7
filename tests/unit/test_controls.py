"""Which controls a run applied: a real ansible-playbook (local connection) through the real
signhost_events callback, with a play whose second role fails half way."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from toolkit import ansible_run, controls, registry

ROLES = {
    # role -> tasks (name, tags, fails?)
    "first": [("FIRST-01 | write a marker", ["first", "first-a"], False)],
    "second": [
        ("SECOND-01 | ok before the failure", ["second", "second-a"], False),
        ("SECOND-02 | this one fails", ["second", "second-b"], True),
        ("SECOND-03 | never runs", ["second", "second-c"], False),
    ],
    "third": [
        ("Validate arguments (runs whatever --tags says)", ["always"], False),
        ("THIRD-01 | never runs either", ["third"], False),
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
        - name: "FIRST-01 | a change that needs the handler"
          ansible.builtin.command: "true"
          changed_when: true
          notify: Apply the first role's change
          tags: [first, first-a]
        """))
    (tmp / "play.yml").write_text(
        textwrap.dedent("""\
        ---
        - name: Test play
          hosts: localhost
          connection: local
          gather_facts: false
          roles: [first, second, third]
        """)
    )
    return tmp / "play.yml"


def _registry() -> registry.Registry:
    def ctl(cid: str, role: str, tag: str | None) -> registry.Control:
        impl = {"role": role, "tag": tag} if tag else {"role": role}
        return registry.Control(
            id=cid, title=cid, kind="technical", source="test", implemented_in=(impl,)
        )

    reg = registry.Registry()
    for c in (
        ctl("C-FIRST", "first", "first-a"),
        ctl("C-SECOND-A", "second", "second-a"),
        ctl("C-SECOND-C", "second", "second-c"),
        ctl("C-THIRD", "third", None),
        ctl("C-ELSEWHERE", "not-in-this-play", None),
    ):
        reg.controls[c.id] = c
    reg.controls["P-1"] = registry.Control(
        id="P-1", title="a procedure", kind="procedure", source="test"
    )
    return reg


def _run(tmp_path: Path, fail: bool, tags: str | None = None) -> ansible_run.PlaybookResult:
    play = _project(tmp_path, fail)
    cmd = [str(Path(ansible_run.build_command("x.yml")[0])), str(play), "-i", "localhost,"]
    if tags:
        cmd += ["--tags", tags]
    return ansible_run.run_playbook(cmd, tmp_path / "run.log")


@pytest.mark.slow
def test_a_failed_run_says_which_controls_are_applied_and_which_are_not(tmp_path: Path) -> None:
    result = _run(tmp_path, fail=True)
    assert result.returncode != 0
    hosts = controls.host_status(controls.read_events(result.events), _registry())
    assert [h.host for h in hosts] == ["localhost"]
    hc = hosts[0]
    assert hc.roles == {"first": "applied", "second": "failed", "third": "not reached"}
    assert hc.failed_at is not None and hc.failed_at["task"].startswith("SECOND-02")
    assert hc.controls == {
        "C-FIRST": "applied",
        "C-SECOND-A": "failed",
        "C-SECOND-C": "failed",
        "C-THIRD": "not reached",
    }
    # ansible.cfg's force_handlers: the change of the first role is applied despite the failure
    assert (tmp_path / "handler.marker").exists(), "a notified handler did not run after a failure"
    text = "\n".join(controls.summary_lines(hosts))
    assert "FAILED at [second : SECOND-02 | this one fails]" in text
    assert "C-THIRD" in text and "partly hardened" in text


@pytest.mark.slow
def test_a_clean_run_applies_every_control_and_tags_select_some(tmp_path: Path) -> None:
    result = _run(tmp_path, fail=False)
    assert result.returncode == 0
    hc = controls.host_status(controls.read_events(result.events), _registry())[0]
    assert set(hc.controls.values()) == {"applied"} and len(hc.controls) == 4


@pytest.mark.slow
def test_controls_left_out_by_tags_are_not_run_not_applied(tmp_path: Path) -> None:
    result = _run(tmp_path, fail=False, tags="first,second-a")
    hc = controls.host_status(controls.read_events(result.events), _registry())[0]
    assert hc.controls == {
        "C-FIRST": "applied",
        "C-SECOND-A": "applied",
        "C-SECOND-C": "not run",
        "C-THIRD": "not run",
    }


def test_a_truncated_event_file_is_read_up_to_the_cut(tmp_path: Path) -> None:
    f = tmp_path / "e.jsonl"
    f.write_text('{"event": "play", "roles": ["a"]}\n{"event": "result", "host": "h", "sta')
    assert controls.read_events(f) == [{"event": "play", "roles": ["a"]}]


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
