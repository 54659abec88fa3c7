"""`invoke provision`, `invoke harden`, `invoke deploy`, `invoke lock-deps`: the plays, against
any inventory (run by toolkit.runner.playbook), and the signer's locked dependencies."""

from __future__ import annotations

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from hostaccess.connection import become_password
from toolkit import exitcodes
from toolkit.runner import playbook, wheelhouse
from toolkit.runner.ansible_run import ROOT, PlayOptions

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


_PLAY_HELP = _HELP | {"expect_unchanged": "fail unless the run reports changed=0"}
_INCREMENTABLE = ["verbose"]


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
    options = PlayOptions(inventory=inventory, limit=limit, check=check, diff=diff, tags=tags,
                          skip_tags=skip_tags, verbose=verbose,
                          vault_password_file=vault_password_file,
                          expect_unchanged=expect_unchanged, ask_become_pass=ask_become_pass)
    playbook.play("provision", "provision.yml", options)


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
    """Harden: ssh, firewall (nftables), usb (USBGuard), kernel, auditd. Lockout-safe."""
    options = PlayOptions(inventory=inventory, limit=limit, check=check, diff=diff, tags=tags,
                          skip_tags=skip_tags, verbose=verbose,
                          vault_password_file=vault_password_file,
                          expect_unchanged=expect_unchanged, ask_become_pass=ask_become_pass)
    playbook.play("harden", "harden.yml", options)


@task(help=_PLAY_HELP | {
    "accept_aide_changes": "BASE-07: paths (comma-separated, or 'all') that differ from the AIDE "
                           "baseline under the deployed paths, that deploy did not make, and that "
                           "you have looked at and accept for this run (logged on the host); "
                           "without it such a difference stops the deploy before it changes "
                           "anything"},
      incrementable=["verbose"])
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
    accept_aide_changes: str | None = None,
) -> None:
    """Token and signer service: SoftHSM2/PKCS#11, keys on the token, signerd, gateway accounts.

    With --expect-unchanged the run must also leave the daemon alone: its systemd invocation id
    is read before and after, and a restart fails the task like a change would.

    Before it changes anything, deploy compares the deployed paths with the AIDE baseline: a
    difference it did not make stops it with the list of paths (nothing is re-baselined), until
    the operator accepts them with --accept-aide-changes.
    """
    accepted = [p.strip() for p in (accept_aide_changes or "").split(",") if p.strip()]
    if accept_aide_changes is not None and not accepted:
        raise Exit("deploy: --accept-aide-changes needs the paths deploy listed, or 'all'",
                   code=exitcodes.BAD_INPUT)
    playbook.prepare("deploy", inventory, limit, vault_password_file)
    try:
        # The signer's wheels are built on the controller from the hash lock (the host needs no
        # PyPI); a wheelhouse that does not match the lock is refused before any host is touched.
        wheelhouse.build()
    except wheelhouse.WheelhouseError as e:
        raise Exit(f"deploy: {e}", code=exitcodes.FAILED) from None
    watch = expect_unchanged and not check
    secrets = (become_password(ask_become_pass), vault_password_file)
    before = playbook.daemon_invocations(inventory, limit, *secrets) if watch else {}
    options = PlayOptions(inventory=inventory, limit=limit, check=check, diff=diff, tags=tags,
                          skip_tags=skip_tags, verbose=verbose,
                          vault_password_file=vault_password_file,
                          extra_vars={"base_aide_accept_changes": accepted} if accepted else None,
                          expect_unchanged=expect_unchanged, ask_become_pass=ask_become_pass)
    playbook.play("deploy", "deploy.yml", options, prepared=True)
    if watch:
        after = playbook.daemon_invocations(inventory, limit, *secrets)
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


@task(
    help={
        "upgrade": "move every pin to the newest release the ranges in pyproject.toml allow",
        "package": "move only this project's pin (repeatable)",
        "target": "update only this host's lock: "
                  + ", ".join(f"{t.name} or {t.python}" for t in wheelhouse.TARGETS),
    },
    iterable=["package"],
)
def lock_deps(c: Context, upgrade: bool = False, package: list[str] | None = None,
              target: str | None = None) -> None:
    """Update the signing hosts' locked dependencies (requirements/signer-host-py3XX.lock).

    Resolves pyproject.toml's run-time dependencies for each supported host (Debian 12: CPython
    3.11, Debian 13: CPython 3.13; x86_64 Linux) with `uv pip compile --generate-hashes`, one
    lock per host Python, keeping the current pins unless told to upgrade.
    """
    try:
        targets = (wheelhouse.target_named(target),) if target else wheelhouse.TARGETS
    except wheelhouse.WheelhouseError as e:
        raise Exit(f"lock-deps: --target: {e}", code=exitcodes.BAD_INPUT) from None
    try:
        wheelhouse.lock(upgrade=upgrade, packages=tuple(package or ()), targets=targets)
    except wheelhouse.WheelhouseError as e:
        raise Exit(f"lock-deps: {e}", code=1) from None
    for t in targets:
        pins = wheelhouse.read_lock(t.lock)
        print(f"==> lock-deps: {t.lock.relative_to(ROOT)}: "
              + ", ".join(f"{p.name}=={p.version}" for p in pins.values()))
