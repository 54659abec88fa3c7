"""invoke timings: per-task durations from the events the callback writes during a real play."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from toolkit.controls.play_status import read_events
from toolkit.runner import timings
from toolkit.runner.ansible_run import ROOT


def _write(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_task_time_runs_from_its_start_to_the_next_start(tmp_path: Path) -> None:
    ev = [
        {"event": "play", "t": 100.0, "roles": ["ssh"]},
        {"event": "task", "t": 100.5, "role": "ssh", "task": "A"},
        {"event": "result", "t": 101.0, "status": "ok", "host": "h"},
        {"event": "result", "t": 102.0, "status": "changed", "host": "h"},
        {"event": "task", "t": 103.5, "role": "firewall", "task": "B"},
        {"event": "result", "t": 104.0, "status": "ok", "host": "h"},
        {"event": "end", "t": 110.0},
    ]
    times, total = timings.task_times(read_events(_write(tmp_path / "x.events.jsonl", ev)))
    assert [(t.name, t.seconds, t.results, t.changed) for t in times] == [
        ("A", 3.0, 2, 1), ("B", 6.5, 1, 0)]
    assert total == 10.0
    assert timings.by_role(times) == {"firewall": 6.5, "ssh": 3.0}


def test_runs_of_a_play_exclude_its_check_mode_runs(tmp_path: Path) -> None:
    for name in ("harden-20261201T100000", "harden-check-20261201T100500",
                 "harden-20261201T101000", "deploy-20261201T100000"):
        _write(tmp_path / f"{name}.events.jsonl", [])
    assert [p.name for p in timings.runs("harden", tmp_path)] == [
        "harden-20261201T100000.events.jsonl", "harden-20261201T101000.events.jsonl"]


def test_the_callback_records_task_starts_in_a_real_play(tmp_path: Path) -> None:
    play = tmp_path / "p.yml"
    play.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - name: first\n      ansible.builtin.command: sleep 0.3\n      changed_when: false\n"
        "    - name: second\n      ansible.builtin.debug: {msg: hi}\n")
    events = tmp_path / "run.events.jsonl"
    env = dict(os.environ, SIGNHOST_EVENTS=str(events), ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    subprocess.run([str(ROOT / ".venv/bin/ansible-playbook"), "-i", "localhost,", "-c", "local",
                    str(play)], check=True, env=env, cwd=ROOT, capture_output=True)
    times, _ = timings.task_times(read_events(events))
    assert [t.name for t in times] == ["first", "second"]
    assert times[0].results == 1
    assert times[0].seconds > 0


def test_two_runs_started_in_the_same_second_get_a_log_each(tmp_path: Path) -> None:
    """CI drives three VMs from one checkout and its unit tests run plays too: two runs of
    `provision` in the same second once shared one events file, and the unreachable host's
    run reported the other host's controls as its own."""
    from toolkit.runner.playbook import claim_log

    logs = [claim_log("provision", tmp_path) for _ in range(3)]
    assert len(set(logs)) == 3 and all(p.exists() for p in logs), logs
    for p in logs:  # the events files beside them, as run_playbook names them
        p.with_name(p.stem + ".events.jsonl").write_text("")
    assert timings.runs("provision", tmp_path) == sorted(
        p.with_name(p.stem + ".events.jsonl") for p in logs)
    assert timings.plays_recorded(tmp_path) == ["provision"]
