"""Where a play spends its time, from the events file each run writes (callback_plugins/).

Each run of `invoke provision|harden|deploy` leaves `reports/logs/<play>-<time>.events.jsonl`
with one `task` event when a task starts and one `result` event per host when it ends. A
task's time is from its start to the next task's start (or the end of the run), so it counts
what Ansible spends on it: templating, the round trips to the host and the module itself.

`invoke timings` (toolkit/tasks/timings.py) prints, for the latest runs of each play, the
total, the slowest tasks and the time per role; with two runs of the same play (a first run and
the idempotence run after it) it prints the ratio second/first, the figure issue 14 asks to
bring down.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.controls.play_status import read_events
from toolkit.runner.ansible_run import ROOT

LOG_DIR = ROOT / "reports" / "logs"


@dataclass
class TaskTime:
    role: str
    name: str
    seconds: float
    results: int  # results seen (loop items count one each)
    changed: int


def task_times(events: list[dict[str, Any]]) -> tuple[list[TaskTime], float]:
    """Per-task durations, in run order, and the run's total (first event to last)."""
    if not events:
        return [], 0.0
    times: list[TaskTime] = []
    current: TaskTime | None = None
    started = 0.0
    for e in events:
        kind = e.get("event")
        if kind in ("task", "end", "play"):
            if current is not None:
                current.seconds = round(float(e["t"]) - started, 3)
                times.append(current)
                current = None
            if kind == "task":
                current = TaskTime(e.get("role") or "-", e.get("task") or "?", 0.0, 0, 0)
                started = float(e["t"])
        elif kind == "result" and current is not None:
            current.results += 1
            current.changed += e.get("status") == "changed"
    if current is not None:  # a killed run: the last task ran until the last event
        current.seconds = round(float(events[-1]["t"]) - started, 3)
        times.append(current)
    return times, round(float(events[-1]["t"]) - float(events[0]["t"]), 3)


def by_role(times: list[TaskTime]) -> dict[str, float]:
    roles: dict[str, float] = defaultdict(float)
    for t in times:
        roles[t.role] += t.seconds
    return dict(sorted(roles.items(), key=lambda kv: -kv[1]))


def runs(play: str, log_dir: Path = LOG_DIR) -> list[Path]:
    """The events files of one play, oldest first (check-mode runs have their own suffix)."""
    pattern = re.compile(rf"^{re.escape(play)}-\d{{8}}T\d{{6}}(?:-\d+)?\.events\.jsonl$")
    return sorted(p for p in log_dir.glob("*.events.jsonl") if pattern.match(p.name))


def render(path: Path, top: int) -> str:
    times, total = task_times(read_events(path))
    lines = [f"{path.name}: {total:.0f}s in {len(times)} tasks"]
    for role, secs in by_role(times).items():
        lines.append(f"    role {role:<12} {secs:7.1f}s")
    lines.append("  slowest tasks:")
    for t in sorted(times, key=lambda t: -t.seconds)[:top]:
        lines.append(f"    {t.seconds:7.1f}s  {t.role:<10} {t.name}"
                     + (f"  ({t.results} results)" if t.results > 1 else ""))
    return "\n".join(lines)


def plays_recorded(directory: Path = LOG_DIR) -> list[str]:
    """The plays with at least one events file in `directory`."""
    return sorted({re.sub(r"-\d{8}T\d{6}(?:-\d+)?\.events\.jsonl$", "", p.name)
                   for p in directory.glob("*.events.jsonl")})


def report(play: str, top: int, directory: Path = LOG_DIR) -> str:
    """The last two runs of a play, and their ratio second/first when there are two."""
    found = runs(play, directory)
    if not found:
        return f"{play}: no runs recorded in {directory}"
    last = found[-2:]
    out = [render(p, top) for p in last]
    if len(last) == 2:
        first = task_times(read_events(last[0]))[1]
        second = task_times(read_events(last[1]))[1]
        if first > 0:
            out.append(f"==> {play}: second run / first run = {second:.0f}s / {first:.0f}s"
                       f" = {second / first:.2f}\n")
    return "\n".join(out)
