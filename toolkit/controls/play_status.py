"""After a play: which controls are in place on each host, and which are not.

The signhost_events callback (callback_plugins/) writes one JSON line per task result, with
the task's effective tags. Every task that implements a control carries the control's id as a
tag (threat-model/CONTROL_IDS.md), so a run's results answer, per host and per control id:

- applied      every task of the playbook tagged with the id ran (ok, changed, or skipped by
               its own `when`), none failed;
- failed       a task tagged with it failed, or the run stopped between its tasks: the earlier
               ones may have changed the host, the later ones did not run (ssh and firewall
               changes that were not confirmed roll themselves back on the host: SSH-07,
               NET-04);
- not reached  the run stopped before any of its selected tasks ran;
- not run      the run did not select all of its tasks (--tags, --skip-tags), or the host
               was not in it.

The tasks a playbook has, in order, come from toolkit/controls/task_tags.py (what the registry
derives where a control lives from); which of them --tags selected, from the tags the play
event carries. A control implemented in two roles (SSH-07: the preflight's checks and the ssh role's
roll-back) is judged per role and the worse status wins, so a run that stops before the ssh
role says SSH-07 was not reached, whatever the preflight did. Per control, the results of its
tasks are counted too (ok, changed, failed, skipped). A check-mode run applies nothing,
whatever it reports: callers say so.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.controls.registry import Registry, id_key
from toolkit.controls.task_tags import TaskRef, selected

APPLIED, FAILED, NOT_REACHED, NOT_RUN = "applied", "failed", "not reached", "not run"
_RANK = {APPLIED: 0, NOT_RUN: 1, NOT_REACHED: 2, FAILED: 3}
_BAD = ("failed", "unreachable")


@dataclass
class HostControls:
    host: str
    failed_at: dict[str, Any] | None  # the first failed task: role, task, msg
    roles: dict[str, str]  # role -> applied / failed / not reached / not run
    controls: dict[str, str] = field(default_factory=dict)  # control id -> status
    # control id -> how its tasks' results came out: {"ok": 3, "changed": 1, "skipped": 2}
    results: dict[str, dict[str, int]] = field(default_factory=dict)

    def by_status(self, status: str) -> list[str]:
        return sorted((c for c, s in self.controls.items() if s == status), key=id_key)

    def changed(self) -> list[str]:
        """The controls whose tasks changed something on the host in this run."""
        return sorted((c for c, r in self.results.items() if r.get("changed")),
                      key=id_key)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return out


def _role_order(events: Iterable[dict[str, Any]]) -> list[str]:
    order: list[str] = []
    for e in events:
        if e.get("event") == "play":
            order += [r for r in e.get("roles", []) if r not in order]
    return order


def _role_status(mine: list[dict[str, Any]], order: list[str],
                 failed_at: dict[str, Any] | None) -> dict[str, str]:
    """Per role of the play: applied, failed, not reached, not run."""
    # Tasks skipped by a `when` ran (the role decided there was nothing to do); tasks left
    # out by --tags/--skip-tags produce no event at all. Tasks tagged only `always` (argument
    # validation) run whatever --tags says: they do not make a role "ran".
    ran_roles = {
        e["role"] for e in mine if e.get("role") and set(e.get("tags", [])) - {"always"}
    }
    fail_role = failed_at.get("role") if failed_at else None
    fail_idx = order.index(fail_role) if fail_role in order else None
    roles: dict[str, str] = {}
    for i, role in enumerate(order):
        if fail_idx is not None and i == fail_idx:
            roles[role] = FAILED
        elif fail_idx is not None and i > fail_idx:
            roles[role] = NOT_REACHED
        elif role in ran_roles:
            roles[role] = APPLIED
        elif failed_at is not None and fail_idx is None:
            roles[role] = NOT_REACHED  # a play-level task failed before the role ran
        else:
            roles[role] = NOT_RUN
    return roles


def _name_pattern(name: str) -> re.Pattern[str]:
    """A task name as written matches the name a result reports (templated or not)."""
    parts = re.split(r"\{\{.*?\}\}", name)
    return re.compile(".*".join(re.escape(p) for p in parts) + "$", re.DOTALL)


def _failure_point(mine: list[dict[str, Any]], tasks: list[TaskRef]) -> float | None:
    """Where in the playbook's task order this host's run stopped (None: it did not)."""
    cursor = -0.5
    for e in mine:
        here = next(
            (t.index for t in tasks if t.runs and t.index > cursor and t.role == e.get("role")
             and _name_pattern(t.name or "").match(str(e.get("task") or ""))),
            None,
        )
        if e.get("status") in _BAD:
            return float(here) if here is not None else cursor + 0.5
        if here is not None:
            cursor = here
    return None


def _control_status(cid: str, tasks: list[TaskRef], mine: list[dict[str, Any]],
                    stop: float | None, only: list[str], skip: list[str]) -> str:
    statuses: list[str] = []
    for role in dict.fromkeys(t.role for t in tasks):
        expected = [t for t in tasks if t.role == role]
        chosen = [t for t in expected if selected(t.tags, only, skip)]
        results = [e for e in mine if e.get("role") == role and cid in e.get("tags", [])]
        if any(e.get("status") in _BAD for e in results):
            statuses.append(FAILED)
        elif stop is None or not [t for t in chosen if t.index > stop]:
            statuses.append(APPLIED if len(results) >= len(expected) else NOT_RUN)
        else:  # the run stopped before some of its selected tasks
            statuses.append(FAILED if results else NOT_REACHED)
    return max(statuses, key=_RANK.__getitem__)


def host_status(events: list[dict[str, Any]], reg: Registry) -> list[HostControls]:
    plays = [e for e in events if e.get("event") == "play"]
    order = _role_order(plays)
    playbook = next((p["playbook"] for p in plays if p.get("playbook")), None)
    only = list(plays[0].get("only_tags") or ["all"]) if plays else ["all"]
    skip = list(plays[0].get("skip_tags") or []) if plays else []
    if playbook:
        tasks = reg.tasks.of_playbook(playbook)
    else:  # events of an older callback: the tasks of the roles that played, in role order
        seen: set[tuple[str, int]] = set()
        tasks = []
        for role in order:
            for t in reg.tasks.tasks:
                if t.role == role and (t.file, t.line) not in seen:
                    seen.add((t.file, t.line))
                    tasks.append(t)
    # What a control expects of this playbook: its tasks that produce a result, in order (a
    # block's rescue runs only when the block failed).
    leaves = [t for t in tasks if t.runs and t.section != "rescue"]
    ids = sorted({c for t in leaves for c in t.controls}, key=id_key)
    results = [e for e in events if e.get("event") == "result"]
    out: list[HostControls] = []
    for host in sorted({e["host"] for e in results}):
        mine = [e for e in results if e["host"] == host]
        failed_at = next((e for e in mine if e["status"] in _BAD), None)
        hc = HostControls(host=host, failed_at=failed_at,
                          roles=_role_status(mine, order, failed_at))
        stop = _failure_point(mine, tasks) if failed_at else None
        for cid in ids:
            hc.controls[cid] = _control_status(
                cid, [t for t in leaves if cid in t.controls], mine, stop, only, skip)
            counts = Counter(str(e.get("status")) for e in mine if cid in e.get("tags", []))
            hc.results[cid] = dict(sorted(counts.items()))
        out.append(hc)
    return out


def summary_lines(hosts: list[HostControls], *, check: bool = False) -> list[str]:
    """What the operator reads after the run (always after a failure)."""
    lines: list[str] = []
    for hc in hosts:
        head = f"{hc.host}: "
        if hc.failed_at:
            where = f"{hc.failed_at.get('role') or 'play'} : {hc.failed_at.get('task')}"
            head += f"FAILED at [{where}]"
            if hc.failed_at.get("msg"):
                head += f" ({hc.failed_at['msg'].splitlines()[0][:160]})"
        else:
            head += "completed"
        if check:
            head += " (check mode: nothing was applied)"
        lines.append(head)
        for status in (APPLIED, FAILED, NOT_REACHED, NOT_RUN):
            ids = hc.by_status(status)
            roles = [r for r, s in hc.roles.items() if s == status]
            if not ids and not roles:
                continue
            label = {
                APPLIED: "applied",
                FAILED: "FAILED (partly applied)",
                NOT_REACHED: "NOT applied (not reached)",
                NOT_RUN: "not run (not selected)",
            }
            lines.append(f"  {label[status]:27} roles: {', '.join(roles) or '-'}")
            if ids:
                lines.append(f"  {'':27} controls: {' '.join(ids)}")
        if hc.changed():
            lines.append(f"  {'changed the host':27} controls: {' '.join(hc.changed())}")
        if FAILED in (hc.roles.get("ssh"), hc.roles.get("firewall")):
            lines.append(
                "  an unconfirmed ssh/firewall change rolls itself back on the host "
                "(SSH-07, NET-04): see `journalctl -t signhost-rollback` there"
            )
        if hc.failed_at:
            lines.append(
                "  the host is only partly hardened: fix the cause and run the same "
                "task again (every role is idempotent)"
            )
    return lines


def write_json(hosts: list[HostControls], path: Path) -> None:
    path.write_text(
        json.dumps(
            [
                {"host": h.host, "failed_at": h.failed_at, "roles": h.roles,
                 "controls": h.controls, "results": h.results}
                for h in hosts
            ],
            indent=2,
            sort_keys=True,
        )
        + "\n",
        encoding="utf-8",
    )
