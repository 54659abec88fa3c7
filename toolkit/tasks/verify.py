"""`invoke verify`, `invoke verify.check-signature`, `invoke audit`, `invoke threat-model.check`.

Thin: options are parsed here, the work is in toolkit.assurance (registry, verify, report,
report_signing, outside_auditors).
"""

from __future__ import annotations

from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from toolkit import exitcodes
from toolkit.controls import check as control_check
from toolkit.controls import registry, tables


def _prepare(
    name: str, inventory: str | None, limit: str | None, vault_password_file: str | None
) -> None:
    """The lab is up (default inventory) and the inventory passes inventory.check."""
    from toolkit.runner.playbook import prepare

    prepare(name, inventory, limit, vault_password_file)


def _positive_int(name: str, option: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise Exit(f"{name}: --{option} wants a whole number >= 1, got {value!r}",
                   code=exitcodes.BAD_INPUT)
    return n


# --- threat-model.check ---------------------------------------------------------------------


@task(
    name="check",
    help={
        "write_tables": "rewrite the generated tables of threat-model/README.md and CONTROL_IDS.md",
        "quiet": "print only problems, no summary",
    },
)
def check(c: Context, write_tables: bool = False, quiet: bool = False) -> None:
    """Consistency of threats -> controls -> tasks (tags) -> tests (markers); prints every
    missing link, fails if any."""
    reg = registry.load()
    problems = control_check.check(reg)
    problems += tables.sync_docs(reg, write=write_tables)
    if not quiet:
        print(control_check.summary(reg))
    if write_tables:
        print("threat-model/README.md, CONTROL_IDS.md: generated tables written")
    if not problems:
        print("threat model: consistent")
        return
    for name, lines in control_check.group_problems(problems).items():
        print(f"\n{name} ({len(lines)}):")
        for line in lines:
            print(f"  - {line}")
    raise Exit(f"\nthreat model: {len(problems)} problem(s)", code=1)


@task(
    help={
        "inventory": "Ansible inventory (default: the running lab, inventory/lab)",
        "limit": "only these hosts (comma-separated names or shell patterns)",
        "keyword": "only tests matching this pytest -k expression",
        "report_dir": "where the reports go: <host>/<time>/ per run, <host>/latest "
        "(default: reports/verify)",
        "workers": "parallel pytest workers per host (needs pytest-xdist; default 1)",
        "vault_password_file": "Ansible vault password file (or $ANSIBLE_VAULT_PASSWORD_FILE)",
        "ask_become_pass": "prompt for the sudo password (when the inventory has none)",
        "sign_key": "sign each report with this SSH key of yours (ssh-keygen -Y sign; default: "
        "the inventory's verify_report_signing_key, else unsigned)",
        "diff": "print what changed since each host's previous run",
        "ci_evidence": "a JUnit file of CI's tests of this toolkit commit (`invoke ci` writes "
        "reports/ci/*.junit.xml); repeatable. Without one, the controls only the toolkit's own "
        "tests can prove are reported 'claimed', not 'in CI'",
    },
    iterable=["ci_evidence"],
    name="run",
    default=True,
)
def verify(
    c: Context,
    inventory: str | None = None,
    limit: str | None = None,
    keyword: str | None = None,
    report_dir: str | None = None,
    workers: str = "1",
    vault_password_file: str | None = None,
    ask_become_pass: bool = False,
    sign_key: str | None = None,
    diff: bool = False,
    ci_evidence: list[str] | None = None,
) -> None:
    """Posture tests on every host of the inventory; reports per host: threats, controls, tests."""
    from toolkit.assurance import verify as verify_mod

    # A string on the command line: invoke's own int conversion ends in a traceback.
    n_workers = _positive_int("verify", "workers", str(workers))
    _prepare("verify", inventory, limit, vault_password_file)

    try:
        code = verify_mod.verify(
            inventory=inventory,
            limit=limit,
            keyword=keyword,
            report_dir=Path(report_dir) if report_dir else None,
            workers=n_workers,
            vault_password_file=vault_password_file,
            ask_become_pass=ask_become_pass,
            sign_key=sign_key,
            diff=diff,
            ci_evidence=[Path(p) for p in ci_evidence or []],
        )
    except verify_mod.VerifyError as exc:
        raise Exit(f"verify: {exc}", code=exitcodes.BAD_INPUT) from exc
    if code == verify_mod.UNREACHABLE_EXIT:
        raise Exit("verify: a host could not be reached (see above)", code=code)
    if code:
        raise Exit("verify: FAILED (see the report above)", code=code)


@task(
    help={
        "report": "a run directory, a file in it, or a host's directory (its latest run)",
        "allowed_signers": "ssh-keygen allowed-signers file: the operators whose reports you "
        "accept (principal, key)",
    },
    name="check-signature",
)
def check_signature(c: Context, report: str, allowed_signers: str | None = None) -> None:
    """Who signed a report, and that no file of it changed since (ssh-keygen -Y verify)."""
    from toolkit.assurance import report_signing

    if not allowed_signers:
        raise Exit("verify.check-signature: --allowed-signers FILE is required",
                   code=exitcodes.BAD_INPUT)
    try:
        ok = report_signing.check(Path(report), Path(allowed_signers))
    except report_signing.BadInput as exc:
        raise Exit(f"verify.check-signature: {exc}", code=exitcodes.BAD_INPUT) from exc
    except report_signing.NotVerified as exc:
        raise Exit(f"verify.check-signature: NOT VERIFIED: {exc}", code=exitcodes.FAILED) from exc
    print(f"{ok.directory}: good signature by {', '.join(ok.principals)} ({ok.key}); "
          f"{len(ok.files)} file(s) unchanged: {', '.join(ok.files)}")


@task(
    help={
        "inventory": "Ansible inventory (default: the running lab)",
        "limit": "only these hosts",
        "report_dir": "where the reports are (default: reports/verify)",
        "only": "comma-separated subset of: lynis,ssh-audit,systemd",
        "fresh": "run Lynis even when the host is unchanged since its cached result",
        "strict": "fail when a figure misses the threshold of the control it is evidence for "
        "(`auditors:` in threat-model/controls/*.yml)",
        "vault_password_file": "Ansible vault password file (or $ANSIBLE_VAULT_PASSWORD_FILE)",
        "ask_become_pass": "prompt for the sudo password (when the inventory has none)",
    }
)
def audit(
    c: Context,
    inventory: str | None = None,
    limit: str | None = None,
    report_dir: str | None = None,
    only: str | None = None,
    fresh: bool = False,
    strict: bool = False,
    vault_password_file: str | None = None,
    ask_become_pass: bool = False,
) -> None:
    """Outside auditors (Lynis, ssh-audit, systemd-analyze security) as evidence of their
    controls, into the next report."""
    from toolkit.assurance import outside_auditors

    chosen = [s.strip() for s in only.split(",")] if only else None
    known = ("lynis", "ssh-audit", "systemd")
    unknown = [s for s in chosen or [] if s not in known]
    if unknown:
        raise Exit(f"audit: --only {', '.join(unknown)}: unknown; choose from {', '.join(known)}",
                   code=exitcodes.BAD_INPUT)
    _prepare("audit", inventory, limit, vault_password_file)

    try:
        code = outside_auditors.audit(
            inventory=inventory,
            limit=limit,
            report_dir=Path(report_dir) if report_dir else None,
            only=chosen,
            fresh=fresh,
            strict=strict,
            vault_password_file=vault_password_file,
            ask_become_pass=ask_become_pass,
        )
    except outside_auditors.AuditError as exc:
        raise Exit(f"audit: {exc}", code=exitcodes.BAD_INPUT) from exc
    if code == exitcodes.UNREACHABLE:
        raise Exit("audit: a host could not be reached (see above)", code=code)
    if code:
        raise Exit("audit: an auditor could not run or missed its target (see above)", code=code)


threat_model_ns = Collection("threat-model")
threat_model_ns.add_task(check)

# `invoke verify` runs the posture tests (the collection's default task);
# `invoke verify.check-signature` checks a report someone hands you.
verify_ns = Collection("verify")
verify_ns.add_task(verify)
verify_ns.add_task(check_signature)

__all__ = ["Path", "audit", "check", "check_signature", "threat_model_ns", "verify", "verify_ns"]
