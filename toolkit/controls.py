"""After a play: which controls are in place on each host, and which are not.

The signhost_events callback (callback_plugins/) writes one JSON line per task result. Each
control in the threat-model registry names where it is implemented (`implemented_in: role +
tag`), so a run's results answer, per host and per control:

- applied      every role (and tag) that implements it ran to its end on the host;
- failed       the run stopped inside one of its roles: the role's earlier tasks may have
               changed the host, its later ones did not run (ssh and firewall changes that
               were not confirmed roll themselves back on the host: SSH-07, NET-04);
- not reached  its role comes after the failure: nothing of it was applied in this run;
- not run      the run did not select it (--tags, --skip-tags) or the host was not in it.

Role order comes from the play's role list (the `play` event), so roles after the failure
are known even though no task of theirs ran. A check-mode run applies nothing, whatever
it reports: callers say so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import registry

APPLIED, FAILED, NOT_REACHED, NOT_RUN = "applied", "failed", "not reached", "not run"
_RANK = {APPLIED: 0, NOT_RUN: 1, NOT_REACHED: 2, FAILED: 3}
_BAD = ("failed", "unreachable")


@dataclass
class HostControls:
    host: str
    failed_at: dict[str, Any] | None  # the first failed task: role, task, msg
    roles: dict[str, str]  # role -> applied / failed / not reached / not run
    controls: dict[str, str] = field(default_factory=dict)  # control id -> status

    def by_status(self, status: str) -> list[str]:
        return sorted(c for c, s in self.controls.items() if s == status)


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


def host_status(events: list[dict[str, Any]], reg: registry.Registry) -> list[HostControls]:
    order = _role_order(events)
    results = [e for e in events if e.get("event") == "result"]
    hosts = sorted({e["host"] for e in results})
    out: list[HostControls] = []
    for host in hosts:
        mine = [e for e in results if e["host"] == host]
        failed_at = next((e for e in mine if e["status"] in _BAD), None)
        # Tasks skipped by a `when` ran (the role decided there was nothing to do); tasks left
        # out by --tags/--skip-tags produce no event at all.
        # Tasks tagged only `always` (argument validation) run whatever --tags says: they do
        # not make a role "ran".
        ran_roles = {
            e["role"] for e in mine if e.get("role") and set(e.get("tags", [])) - {"always"}
        }
        ran_tags: dict[str, set[str]] = {}
        for e in mine:
            if e.get("role"):
                ran_tags.setdefault(e["role"], set()).update(e.get("tags", []))
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
        hc = HostControls(host=host, failed_at=failed_at, roles=roles)
        for ctl in reg.controls.values():
            if ctl.kind != "technical":
                continue
            statuses = []
            for impl in ctl.implemented_in:
                role = str(impl.get("role") or "")
                if role not in roles:
                    continue
                status: str = roles[role]
                tag = impl.get("tag")
                if status == APPLIED and tag and tag not in ran_tags.get(role, set()):
                    status = NOT_RUN
                statuses.append(status)
            if statuses:
                hc.controls[ctl.id] = max(statuses, key=_RANK.__getitem__)
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
                {"host": h.host, "failed_at": h.failed_at, "roles": h.roles, "controls": h.controls}
                for h in hosts
            ],
            indent=2,
            sort_keys=True,
        )
        + "\n",
        encoding="utf-8",
    )
