"""Run a playbook against an inventory and read back what it changed.

The recap is parsed (not a JSON callback) so that the operator keeps Ansible's normal,
readable output while the pipeline still gets the per-host counts it gates on
(idempotence: a second run must report changed=0).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolkit.controls import HostControls

ROOT = Path(__file__).resolve().parent.parent
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)"
)


@dataclass(frozen=True)
class HostRecap:
    host: str
    ok: int
    changed: int
    unreachable: int
    failed: int


@dataclass(frozen=True)
class PlaybookResult:
    returncode: int
    recap: tuple[HostRecap, ...]
    log: Path
    # Per host: which controls this run applied, which failed or were not reached
    # (toolkit/controls.py, from the signhost_events callback).
    controls: list[HostControls] = field(default_factory=list)
    events: Path | None = None

    @property
    def changed(self) -> int:
        return sum(r.changed for r in self.recap)


def parse_recap(text: str) -> tuple[HostRecap, ...]:
    out: list[HostRecap] = []
    in_recap = False
    for line in text.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap, out = True, []
            continue
        m = RECAP.match(line.strip()) if in_recap else None
        if m:
            out.append(
                HostRecap(
                    host=m["host"],
                    ok=int(m["ok"]),
                    changed=int(m["changed"]),
                    unreachable=int(m["unreachable"]),
                    failed=int(m["failed"]),
                )
            )
    return tuple(out)


def venv_exe(name: str) -> str:
    """A tool from the project's virtual environment, else from PATH."""
    exe = ROOT / ".venv" / "bin" / name
    return str(exe) if exe.exists() else name


def ansible_env(**extra: str) -> dict[str, str]:
    """The environment every Ansible command of the toolkit runs with (the project's config)."""
    return dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), **extra)


def build_command(
    playbook: str,
    *,
    inventory: str | None = None,
    limit: str | None = None,
    check: bool = False,
    diff: bool = False,
    tags: str | None = None,
    skip_tags: str | None = None,
    extra_vars: dict[str, str] | None = None,
    verbose: int = 0,
) -> list[str]:
    cmd = [venv_exe("ansible-playbook"), str(ROOT / "playbooks" / playbook)]
    if inventory:
        cmd += ["-i", inventory]
    if limit:
        cmd += ["--limit", limit]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    if tags:
        cmd += ["--tags", tags]
    if skip_tags:
        cmd += ["--skip-tags", skip_tags]
    for k, v in (extra_vars or {}).items():
        cmd += ["-e", f"{k}={v}"]
    if verbose:
        cmd.append("-" + "v" * verbose)
    return cmd


def run_playbook(cmd: list[str], log: Path) -> PlaybookResult:
    """Run ansible-playbook, streaming its output to the terminal and to `log`.

    Task results also go, as JSON lines, to `<log>.events.jsonl` (callback_plugins/), from
    which the result says which controls are in place on each host.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    events = log.with_name(log.stem + ".events.jsonl")
    events.unlink(missing_ok=True)
    env = ansible_env(ANSIBLE_FORCE_COLOR="0", SIGNHOST_EVENTS=str(events))
    with (
        log.open("w") as fh,
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        chunks: list[str] = []
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            fh.write(line)
            chunks.append(line)
        rc = proc.wait()
    return PlaybookResult(
        returncode=rc,
        recap=parse_recap("".join(chunks)),
        log=log,
        controls=_controls(events),
        events=events,
    )


def _controls(events: Path) -> list[HostControls]:
    from toolkit import controls, registry

    try:
        return controls.host_status(controls.read_events(events), registry.load())
    except (OSError, ValueError, KeyError) as exc:  # the summary must never hide the run's result
        print(f"(could not work out which controls were applied: {exc})", file=sys.stderr)
        return []
