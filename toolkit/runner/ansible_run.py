"""Run a playbook against an inventory and read back what it changed.

The recap is parsed (not a JSON callback) so that the operator keeps Ansible's normal,
readable output while the pipeline still gets the per-host counts it gates on
(idempotence: a second run must report changed=0).

A sudo password reaches Ansible on its standard input, a pipe (`--become-password-file -`;
Ansible resolves a /dev/fd/N path to a name it cannot open): never argv, never the
environment (both are visible in /proc and recorded by auditd and sudo), never a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.controls.play_status import HostControls

ROOT = Path(__file__).resolve().parents[2]
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
    # (toolkit/controls/play_status.py, from the signhost_events callback).
    controls: list[HostControls] = field(default_factory=list)
    events: Path | None = None

    @property
    def changed(self) -> int:
        return sum(r.changed for r in self.recap)

    @property
    def unreachable(self) -> list[str]:
        """Hosts the run could not reach (they are neither changed nor failed: unknown)."""
        return [r.host for r in self.recap if r.unreachable]

    @property
    def failed(self) -> list[str]:
        return [r.host for r in self.recap if r.failed]


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


@contextmanager
def secret_fd(secret: str | None) -> Iterator[int | None]:
    """The read end of a pipe that holds `secret`, for one child's standard input.

    The secret is written before the child starts (it is far below a pipe's buffer) and the
    write end closed, so the child reads it once and sees end of file.
    """
    if secret is None:
        yield None
        return
    r, w = os.pipe()
    try:
        os.write(w, secret.encode() + b"\n")
        os.close(w)
        yield r
    finally:
        os.close(r)


def secret_args(become_fd: int | None, vault_password_file: str | None) -> list[str]:
    """Ansible options for the become password (on stdin) and the vault password file."""
    args: list[str] = []
    if become_fd is not None:
        args += ["--become-password-file", "-"]
    if vault_password_file:
        args += ["--vault-password-file", vault_password_file]
    return args


@dataclass(frozen=True)
class PlayOptions:
    """How one play runs: built once from a task's options, handed down as it is.

    All but the last two are ansible-playbook's own options. `expect_unchanged` is the task's
    gate on the recap (a second run must report changed=0); `ask_become_pass` says whether the
    sudo password is typed (hostaccess.connection.become_password), never where it goes.
    """

    inventory: str | None = None
    limit: str | None = None
    check: bool = False
    diff: bool = False
    tags: str | None = None
    skip_tags: str | None = None
    verbose: int = 0
    vault_password_file: str | None = None
    extra_vars: Mapping[str, Any] | None = None
    expect_unchanged: bool = False
    ask_become_pass: bool = False


def build_command(playbook: str, options: PlayOptions) -> list[str]:
    """The ansible-playbook command line for `playbook` (under playbooks/) with `options`."""
    o = options
    cmd = [venv_exe("ansible-playbook"), str(ROOT / "playbooks" / playbook)]
    if o.inventory:
        cmd += ["-i", o.inventory]
    if o.limit:
        cmd += ["--limit", o.limit]
    if o.check:
        cmd.append("--check")
    if o.diff:
        cmd.append("--diff")
    if o.tags:
        cmd += ["--tags", o.tags]
    if o.skip_tags:
        cmd += ["--skip-tags", o.skip_tags]
    for k, v in (o.extra_vars or {}).items():
        # A list or a mapping as JSON: `k=v` would hand the role a string.
        cmd += ["-e", f"{k}={v}" if isinstance(v, str) else json.dumps({k: v})]
    if o.vault_password_file:
        cmd += ["--vault-password-file", o.vault_password_file]
    if o.verbose:
        cmd.append("-" + "v" * o.verbose)
    return cmd


def run_playbook(cmd: list[str], log: Path, become_pass: str | None = None) -> PlaybookResult:
    """Run ansible-playbook, streaming its output to the terminal and to `log`.

    Task results also go, as JSON lines, to `<log>.events.jsonl` (callback_plugins/), from
    which the result says which controls are in place on each host. `become_pass`, when
    given, reaches Ansible through a pipe (see secret_fd), not through `cmd`.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    events = log.with_name(log.stem + ".events.jsonl")
    events.unlink(missing_ok=True)
    env = ansible_env(ANSIBLE_FORCE_COLOR="0", SIGNHOST_EVENTS=str(events))
    with (
        secret_fd(become_pass) as fd,
        log.open("w") as fh,
        subprocess.Popen(
            cmd + secret_args(fd, None),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL if fd is None else fd,
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
    from toolkit.controls import play_status, registry

    try:
        return play_status.host_status(play_status.read_events(events), registry.load())
    except (OSError, ValueError, KeyError) as exc:  # the summary must never hide the run's result
        print(f"(could not work out which controls were applied: {exc})", file=sys.stderr)
        return []
