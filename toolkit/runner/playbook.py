"""One play against an inventory, as every task that runs one does it: the lab is up (default
inventory), the inventory passes inventory.check, the play runs, the controls it applied are
summarised per host, and the outcome becomes the task's exit code (toolkit.exitcodes).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from invoke.exceptions import Exit

from hostaccess.connection import become_password
from toolkit import exitcodes
from toolkit.runner.ansible_run import (
    ROOT,
    PlaybookResult,
    PlayOptions,
    ansible_env,
    build_command,
    run_playbook,
    secret_args,
    secret_fd,
    venv_exe,
)
from toolkit.runner.inventory_check import checked

LOG_DIR = ROOT / "reports" / "logs"


def claim_log(stem: str, log_dir: Path | None = None) -> Path:
    """`<log_dir>/<stem>-<time>.log`, created here so that it is this run's alone: two runs of
    a play started in the same second from one checkout (CI drives three VMs at once, and its
    unit tests run plays too) get `<stem>-<time>-2.log`, ... instead of writing, and reading
    back as their own, each other's events (seen: an unreachable host's run reported the
    controls of another host's provision)."""
    log_dir = log_dir or LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    base = f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while True:
        log = log_dir / (f"{base}.log" if n == 1 else f"{base}-{n}.log")
        try:
            log.open("x").close()
            return log
        except FileExistsError:
            n += 1


def require_lab_if_default(inventory: str | None) -> None:
    """The default inventory is the lab: say so plainly when it is not up."""
    if inventory and Path(inventory).resolve() != (ROOT / "inventory" / "lab").resolve():
        return
    from lab import state

    if state.load() is None:
        raise Exit(
            f"the lab ({state.instance_name()}) is not up: run `invoke lab.up` "
            "(or pass --inventory for another host)",
            code=exitcodes.NOT_READY,
        )


def prepare(
    name: str, inventory: str | None, limit: str | None, vault_password_file: str | None
) -> None:
    """Before anything runs: the lab is up (default inventory), the inventory passes the check."""
    require_lab_if_default(inventory)
    checked(name, inventory, limit, vault_password_file)


def play(
    name: str, playbook: str, options: PlayOptions, *, prepared: bool = False
) -> PlaybookResult:
    """Run `playbook` as the task `name`: prepared (unless the caller did it), logged, summarised
    per host, its outcome the task's exit code."""
    if not prepared:
        prepare(name, options.inventory, options.limit, options.vault_password_file)
    become_pass = become_password(options.ask_become_pass)
    cmd = build_command(playbook, options)
    suffix = "-check" if options.check else ""
    log = claim_log(f"{name}{suffix}")
    mode = " (check mode)" if options.check else ""
    print(f"==> {name}{mode}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    result = run_playbook(cmd, log, become_pass=become_pass)
    took = time.monotonic() - started
    print(
        f"==> {name}: rc={result.returncode} changed={result.changed} in {took:.0f}s (log: {log})"
    )
    unreachable = set(result.unreachable)
    for host in sorted(unreachable):
        # Nothing is known about a host that did not answer: no control is claimed for it.
        print(f"==> {name}: {host}: UNREACHABLE: the run could not connect to it; "
              "nothing about its controls is known from this run", flush=True)
    if result.controls:
        from toolkit.controls import play_status

        play_status.write_json(result.controls, log.with_name(log.stem + ".controls.json"))
        reached = [hc for hc in result.controls if hc.host not in unreachable]
        if result.returncode != 0 and reached:
            print(f"==> {name}: which controls are in place now", flush=True)
            for line in play_status.summary_lines(reached, check=options.check):
                print(f"    {line}", flush=True)
        elif result.returncode == 0:
            verb = "checked" if options.check else "applied"
            for hc in result.controls:
                done, total = len(hc.by_status(play_status.APPLIED)), len(hc.controls)
                rest = f" ({total - done} not selected by this run)" if done < total else ""
                changed = f"; changed: {' '.join(hc.changed())}" if hc.changed() else ""
                print(f"==> {name}: {hc.host}: {done} of {total} controls {verb}{rest}{changed}")
    if result.returncode != 0:
        if unreachable and not result.failed:
            raise Exit(
                f"{name}: unreachable: {', '.join(sorted(unreachable))}; see {log}",
                code=exitcodes.UNREACHABLE,
            )
        raise Exit(f"{name} failed (ansible rc={result.returncode}); see {log}",
                   code=exitcodes.FAILED)
    if options.expect_unchanged and result.changed:
        raise Exit(f"{name}: expected changed=0, got changed={result.changed}; see {log}",
                   code=exitcodes.NOT_READY)
    return result


_AD_HOC_LINE = re.compile(
    r"^(?P<host>\S+) \| (?:CHANGED|SUCCESS) \| rc=0 \| \(stdout\) (?P<out>\S+)$"
)


def daemon_invocations(
    inventory: str | None,
    limit: str | None,
    become_pass: str | None = None,
    vault_password_file: str | None = None,
) -> dict[str, str]:
    """host -> systemd InvocationID of the signer daemon (changes whenever it is restarted)."""
    cmd = [
        venv_exe("ansible"),
        "signing_hosts",
        "-o",
        "-b",
        "-m",
        "ansible.builtin.command",
        "-a",
        "systemctl show -p InvocationID --value {{ signer_service | default('signerd') }}",
    ]
    if inventory:
        cmd += ["-i", inventory]
    if limit:
        cmd += ["--limit", limit]
    with secret_fd(become_pass) as fd:
        proc = subprocess.run(
            cmd + secret_args(fd, vault_password_file),
            cwd=ROOT,
            env=ansible_env(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL if fd is None else fd,
            timeout=600,
        )
    found = {m["host"]: m["out"] for m in map(_AD_HOC_LINE.match, proc.stdout.splitlines()) if m}
    if proc.returncode == 4:  # ansible: a host was unreachable
        raise Exit(
            f"deploy: unreachable while reading the signer daemon's invocation id: "
            f"{' '.join((proc.stdout + proc.stderr).split())[:400]}",  # one line, cause kept
            code=exitcodes.UNREACHABLE,
        )
    if proc.returncode != 0 or not found:
        raise Exit(
            f"deploy: cannot read the signer daemon's invocation id: "
            f"{' '.join((proc.stdout + proc.stderr).split())[-400:]}",
            code=exitcodes.FAILED,
        )
    return found
