"""`invoke provision`, `invoke harden`, `invoke deploy`: the plays, against any inventory."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from toolkit import exitcodes
from toolkit.runner import wheelhouse
from toolkit.runner.ansible_run import (
    ROOT,
    PlaybookResult,
    ansible_env,
    become_password,
    build_command,
    run_playbook,
    secret_args,
    secret_fd,
    venv_exe,
)
from toolkit.tasks.inventory import checked

LOG_DIR = ROOT / "reports" / "logs"

_HELP = {
    "inventory": "inventory path (default: inventory/lab, the local lab VM)",
    "limit": "only these hosts (Ansible --limit pattern)",
    "check": "dry run: report what would change, change nothing",
    "diff": "show the changes made to files",
    "tags": "only tasks with these tags: control ids (SSH-05,NET-02) or roles' (ssh,firewall)",
    "skip_tags": "skip tasks with these tags",
    "verbose": "Ansible verbosity (repeat: -v -v)",
    "ask_become_pass": "ask for the sudo password once (it reaches Ansible through a pipe)",
    "vault_password_file": "vault password file (default: $ANSIBLE_VAULT_PASSWORD_FILE)",
}


def _require_lab_if_default(inventory: str | None) -> None:
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
    _require_lab_if_default(inventory)
    checked(name, inventory, limit, vault_password_file)


def play(
    name: str,
    playbook: str,
    *,
    inventory: str | None,
    limit: str | None,
    check: bool,
    diff: bool,
    tags: str | None,
    skip_tags: str | None,
    verbose: int,
    expect_unchanged: bool = False,
    ask_become_pass: bool = False,
    vault_password_file: str | None = None,
    prepared: bool = False,
) -> PlaybookResult:
    if not prepared:
        prepare(name, inventory, limit, vault_password_file)
    become_pass = become_password(ask_become_pass)
    cmd = build_command(
        playbook,
        inventory=inventory,
        limit=limit,
        check=check,
        diff=diff,
        tags=tags,
        skip_tags=skip_tags,
        verbose=verbose,
        vault_password_file=vault_password_file,
    )
    suffix = "-check" if check else ""
    log = LOG_DIR / f"{name}{suffix}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    print(f"==> {name}{' (check mode)' if check else ''}: {' '.join(cmd[1:])}", flush=True)
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
        from toolkit.runner import controls

        controls.write_json(result.controls, log.with_name(log.stem + ".controls.json"))
        reached = [hc for hc in result.controls if hc.host not in unreachable]
        if result.returncode != 0 and reached:
            print(f"==> {name}: which controls are in place now", flush=True)
            for line in controls.summary_lines(reached, check=check):
                print(f"    {line}", flush=True)
        elif result.returncode == 0:
            verb = "checked" if check else "applied"
            for hc in result.controls:
                done, total = len(hc.by_status(controls.APPLIED)), len(hc.controls)
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
    if expect_unchanged and result.changed:
        raise Exit(f"{name}: expected changed=0, got changed={result.changed}; see {log}",
                   code=exitcodes.NOT_READY)
    return result


_PLAY_HELP = _HELP | {"expect_unchanged": "fail unless the run reports changed=0"}
_INCREMENTABLE = ["verbose"]


def _opts(
    inventory: str | None,
    limit: str | None,
    check: bool,
    diff: bool,
    tags: str | None,
    skip_tags: str | None,
    verbose: int,
    expect_unchanged: bool,
    ask_become_pass: bool,
    vault_password_file: str | None,
) -> dict[str, Any]:
    return {
        "ask_become_pass": ask_become_pass,
        "vault_password_file": vault_password_file,
        "inventory": inventory,
        "limit": limit,
        "check": check,
        "diff": diff,
        "tags": tags,
        "skip_tags": skip_tags,
        "verbose": verbose,
        "expect_unchanged": expect_unchanged,
    }


@task(help=_PLAY_HELP, incrementable=["verbose"])
def provision(
    c: Context,
    inventory: str | None = None,
    limit: str | None = None,
    check: bool = False,
    diff: bool = False,
    tags: str | None = None,
    skip_tags: str | None = None,
    verbose: int = 0,
    expect_unchanged: bool = False,
    ask_become_pass: bool = False,
    vault_password_file: str | None = None,
) -> None:
    """Base system of a signing host: packages, services, time, updates, journald, admins, AIDE."""
    play(
        "provision",
        "provision.yml",
        **_opts(inventory, limit, check, diff, tags, skip_tags, verbose, expect_unchanged,
              ask_become_pass, vault_password_file),
    )


@task(help=_PLAY_HELP, incrementable=["verbose"])
def harden(
    c: Context,
    inventory: str | None = None,
    limit: str | None = None,
    check: bool = False,
    diff: bool = False,
    tags: str | None = None,
    skip_tags: str | None = None,
    verbose: int = 0,
    expect_unchanged: bool = False,
    ask_become_pass: bool = False,
    vault_password_file: str | None = None,
) -> None:
    """Harden: ssh, firewall (nftables), usb (USBGuard), kernel, auditing. Lockout-safe."""
    play(
        "harden",
        "harden.yml",
        **_opts(inventory, limit, check, diff, tags, skip_tags, verbose, expect_unchanged,
              ask_become_pass, vault_password_file),
    )


@task(help=_PLAY_HELP, incrementable=["verbose"])
def deploy(
    c: Context,
    inventory: str | None = None,
    limit: str | None = None,
    check: bool = False,
    diff: bool = False,
    tags: str | None = None,
    skip_tags: str | None = None,
    verbose: int = 0,
    expect_unchanged: bool = False,
    ask_become_pass: bool = False,
    vault_password_file: str | None = None,
) -> None:
    """Token and signer service: SoftHSM2/PKCS#11, keys on the token, signerd, gateway accounts.

    With --expect-unchanged the run must also leave the daemon alone: its systemd invocation id
    is read before and after, and a restart fails the task like a change would.
    """
    prepare("deploy", inventory, limit, vault_password_file)
    try:
        # The signer's wheels are built on the controller from the hash lock (the host needs no
        # PyPI); a wheelhouse that does not match the lock is refused before any host is touched.
        wheelhouse.build()
    except wheelhouse.WheelhouseError as e:
        raise Exit(f"deploy: {e}", code=exitcodes.FAILED) from None
    watch = expect_unchanged and not check
    secrets = (become_password(ask_become_pass), vault_password_file)
    before = _daemon_invocations(inventory, limit, *secrets) if watch else {}
    play(
        "deploy",
        "deploy.yml",
        prepared=True,
        **_opts(inventory, limit, check, diff, tags, skip_tags, verbose, expect_unchanged,
              ask_become_pass, vault_password_file),
    )
    if watch:
        after = _daemon_invocations(inventory, limit, *secrets)
        restarted = sorted(h for h, inv in before.items() if after.get(h) != inv)
        if restarted:
            raise Exit(
                f"deploy: the signer daemon was restarted on {', '.join(restarted)} "
                "although nothing changed",
                code=exitcodes.NOT_READY,
            )
        print(
            f"==> deploy: the signer daemon kept running on {', '.join(sorted(before))} "
            "(same systemd invocation id before and after)"
        )


_AD_HOC_LINE = re.compile(
    r"^(?P<host>\S+) \| (?:CHANGED|SUCCESS) \| rc=0 \| \(stdout\) (?P<out>\S+)$"
)


def _daemon_invocations(
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


@task(
    help={
        "upgrade": "move every pin to the newest release the ranges in pyproject.toml allow",
        "package": "move only this project's pin (repeatable)",
    },
    iterable=["package"],
)
def lock_deps(c: Context, upgrade: bool = False, package: list[str] | None = None) -> None:
    """Update the signing host's locked dependencies (requirements/signer-host.lock).

    Resolves pyproject.toml's run-time dependencies for the host (CPython 3.11, x86_64 Linux)
    with `uv pip compile --generate-hashes`, keeping the current pins unless told to upgrade.
    """
    try:
        wheelhouse.lock(upgrade=upgrade, packages=tuple(package or ()))
    except wheelhouse.WheelhouseError as e:
        raise Exit(f"lock-deps: {e}", code=1) from None
    pins = wheelhouse.read_lock()
    print(f"==> lock-deps: {wheelhouse.LOCK.relative_to(ROOT)}: "
          + ", ".join(f"{p.name}=={p.version}" for p in pins.values()))
