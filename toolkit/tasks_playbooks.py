"""`invoke provision`, `invoke harden`, `invoke deploy`: the plays, against any inventory."""

from __future__ import annotations

import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from toolkit.ansible_run import ROOT, PlaybookResult, build_command, run_playbook

LOG_DIR = ROOT / "reports" / "logs"

_HELP = {
    "inventory": "inventory path (default: inventory/lab, the local lab VM)",
    "limit": "only these hosts (Ansible --limit pattern)",
    "check": "dry run: report what would change, change nothing",
    "diff": "show the changes made to files",
    "tags": "only tasks with these tags (e.g. a control id family: ssh,firewall)",
    "skip_tags": "skip tasks with these tags",
    "verbose": "Ansible verbosity (repeat: -v -v)",
}


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
) -> PlaybookResult:
    cmd = build_command(
        playbook,
        inventory=inventory,
        limit=limit,
        check=check,
        diff=diff,
        tags=tags,
        skip_tags=skip_tags,
        verbose=verbose,
    )
    suffix = "-check" if check else ""
    log = LOG_DIR / f"{name}{suffix}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    print(f"==> {name}{' (check mode)' if check else ''}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    result = run_playbook(cmd, log)
    took = time.monotonic() - started
    print(f"==> {name}: rc={result.returncode} changed={result.changed} in {took:.0f}s (log: {log})")
    if result.returncode != 0:
        raise Exit(f"{name} failed (rc={result.returncode}); see {log}", code=result.returncode or 1)
    if expect_unchanged and result.changed:
        raise Exit(f"{name}: expected changed=0, got changed={result.changed}; see {log}", code=3)
    return result


@task(help=_HELP | {"expect_unchanged": "fail unless the run reports changed=0"}, incrementable=["verbose"])
def provision(
    c, inventory=None, limit=None, check=False, diff=False, tags=None, skip_tags=None, verbose=0,
    expect_unchanged=False,
):
    """Base system of a signing host: packages, services, time, updates, journald, admins, AIDE."""
    play("provision", "provision.yml", inventory=inventory, limit=limit, check=check, diff=diff,
         tags=tags, skip_tags=skip_tags, verbose=verbose, expect_unchanged=expect_unchanged)


@task(help=_HELP | {"expect_unchanged": "fail unless the run reports changed=0"}, incrementable=["verbose"])
def harden(
    c, inventory=None, limit=None, check=False, diff=False, tags=None, skip_tags=None, verbose=0,
    expect_unchanged=False,
):
    """Harden: ssh, firewall (nftables), usb (USBGuard), kernel, auditing. Lockout-safe."""
    play("harden", "harden.yml", inventory=inventory, limit=limit, check=check, diff=diff,
         tags=tags, skip_tags=skip_tags, verbose=verbose, expect_unchanged=expect_unchanged)


@task(help=_HELP | {"expect_unchanged": "fail unless the run reports changed=0"}, incrementable=["verbose"])
def deploy(
    c, inventory=None, limit=None, check=False, diff=False, tags=None, skip_tags=None, verbose=0,
    expect_unchanged=False,
):
    """Token and signer service: SoftHSM2/PKCS#11, keys on the token, signerd, gateway accounts."""
    pre = ROOT / "toolkit" / "wheelhouse.py"
    if pre.exists():
        from toolkit import wheelhouse  # built on the controller: the host needs no PyPI

        wheelhouse.build()
    play("deploy", "deploy.yml", inventory=inventory, limit=limit, check=check, diff=diff,
         tags=tags, skip_tags=skip_tags, verbose=verbose, expect_unchanged=expect_unchanged)


__all__ = ["Path", "deploy", "harden", "provision"]
