"""`invoke audit`: outside auditors, each the evidence of named controls beside our own posture
tests (the thresholds are the controls', in threat-model/controls/*.yml: `auditors:`).

- **Lynis** (`lynis audit system --quick` on the host): hardening index, warnings, tests done
  (BASE-01).
  It takes minutes (about ten on a TCG lab VM), so its result is cached per host and reused while
  the host's fingerprint (installed packages + metadata of /etc) is unchanged; `--fresh` forces a
  new run. Lynis must be installed on the host (the lab image has it; on production install the
  Debian package for the audit, or accept "not installed" in the report).
- **ssh-audit** (PyPI `ssh-audit`, a dev dependency): from the build network namespace against
  the VM's lab address in the lab - the view a build server has - and from the controller against
  the host's SSH address otherwise. Counts of `fail` and `warn` lines and CVEs (SSH-05).
- **systemd-analyze security** for the signer's unit: the exposure score (0 best, 10 worst)
  (SGN-06).

Figures go to `reports/verify/<host>/auditors.json`; the next `invoke verify` puts them in its
report, each under its control (a past run's report is never rewritten: it may be signed, and
it is history). toolkit/controls/auditors.py judges them against the thresholds.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from toolkit.assurance import verify
from toolkit.assurance.verify import Target
from toolkit.controls import auditors, registry

UNIT = "signerd.service"
LYNIS_REPORT = "/var/tmp/signverify-lynis-report.dat"
FINGERPRINT = (
    "{ dpkg-query -W -f='${Package} ${Version}\\n'; "
    "find /etc -xdev -type f ! -name adjtime ! -name resolv.conf ! -name 'ld.so.cache' "
    "-printf '%P %s %T@\\n' | sort; } | sha256sum | cut -c1-32"
)
EXPOSURE = re.compile(r"Overall exposure level for \S+:\s*([0-9.]+)\s+(\S+)")


class AuditError(Exception):
    pass


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_channels: dict[str, Any] = {}


def _endpoint(target: Target) -> Any:
    from hostaccess import connection, hostvars

    inv = hostvars.load(target.inventory, target.host,
                        vault_password_file=target.vault_password_file)
    return connection.endpoint(inv, target.host, password=target.become_password)


def ssh(target: Target, command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`command` as root on the host, over the same root channel as verify (sudo with the
    inventory's become password where sudo asks for one; reached as Ansible reaches it)."""
    from toolkit.assurance import shell_channel

    command = command.replace("sudo -n ", "")
    host = _channels.get(target.name)
    if host is None:
        ep = _endpoint(target)
        host = shell_channel.host_from_launcher(
            target.host, list(ep.argv), sudo=True, password=ep.become_password, timeout=3600
        )
        _channels[target.name] = host
    try:
        r = host.run(command)
    except RuntimeError as exc:
        return subprocess.CompletedProcess(command, 255, "", str(exc))
    return subprocess.CompletedProcess(command, r.rc, r.stdout, r.stderr)


def close_channels() -> None:
    for host in _channels.values():
        host.backend.close()
    _channels.clear()


# --- Lynis ----------------------------------------------------------------------------------


def parse_lynis_report(text: str) -> dict[str, Any]:
    """Figures from lynis-report.dat (key=value lines; `key[]=` repeats)."""
    values: dict[str, str] = {}
    warnings: list[str] = []
    suggestions: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "warning[]":
            warnings.append(value)
        elif key == "suggestion[]":
            suggestions.append(value)
        else:
            values[key] = value
    index = int(values["hardening_index"]) if values.get("hardening_index", "").isdigit() else None
    tests = values.get("lynis_tests_done", "")
    return {
        "figures": {
            "hardening_index": index,
            "warnings": len(warnings),
            "suggestions": len(suggestions),
            "tests_done": int(tests) if tests.isdigit() else None,
            "version": values.get("lynis_version"),
        },
        # Every warning, then the suggestions: what a reviewer reads to see what is left.
        "details": [f"warning {w}" for w in warnings[:30]]
        + [f"suggestion {x}" for x in suggestions[:40]],
    }


def run_lynis(target: Target, cached: dict[str, Any] | None, fresh: bool) -> dict[str, Any]:
    fp = ssh(target, f"sudo -n sh -c {json.dumps(FINGERPRINT)}")
    fingerprint = fp.stdout.strip() if fp.returncode == 0 else None
    if (
        not fresh
        and cached
        and not cached.get("error")
        and fingerprint
        and cached.get("fingerprint") == fingerprint
    ):
        print(f"    lynis: host unchanged since {cached.get('ran_at')}: reusing that result")
        return {**cached, "note": f"cached: host unchanged since {cached.get('ran_at')}"}
    # Through sudo: its secure_path has /usr/sbin, where Debian installs lynis; the admin's
    # own PATH over a non-login SSH command does not.
    if ssh(target, "sudo -n sh -c 'command -v lynis'").returncode != 0:
        return {
            "error": "lynis is not installed on the host (Debian package `lynis`)",
            "ran_at": _now(),
        }
    print("    lynis: running `lynis audit system --quick` (minutes; ~10 under TCG)", flush=True)
    started = time.monotonic()
    proc = ssh(
        target,
        f"lynis audit system --quick --no-colors --report-file {LYNIS_REPORT} >/dev/null",
        timeout=3600,
    )
    took = round(time.monotonic() - started)
    dat = ssh(target, f"sudo -n cat {LYNIS_REPORT} && sudo -n rm -f {LYNIS_REPORT}")
    if proc.returncode != 0 or dat.returncode != 0:
        return {
            "error": f"lynis exited {proc.returncode}; report: {dat.stderr.strip()[-200:]}",
            "ran_at": _now(),
            "duration": took,
        }
    out = parse_lynis_report(dat.stdout)
    return {**out, "ran_at": _now(), "duration": took, "fingerprint": fingerprint}


# --- ssh-audit ------------------------------------------------------------------------------


def parse_ssh_audit(data: dict[str, Any]) -> dict[str, Any]:
    fails: list[str] = []
    warns: list[str] = []
    for section in ("kex", "key", "enc", "mac"):
        for alg in data.get(section, []):
            notes = alg.get("notes") or {}
            name = alg.get("algorithm", "?")
            fails += [f"({section}) {name}: {n}" for n in notes.get("fail") or []]
            warns += [f"({section}) {name}: {n}" for n in notes.get("warn") or []]
    cves = [c.get("name", str(c)) for c in data.get("cves") or []]
    return {
        "figures": {
            "fail": len(fails) + len(cves),
            "warn": len(warns),
            "cves": len(cves),
            "server": (data.get("banner") or {}).get("software"),
        },
        "details": [f"fail {x}" for x in fails + cves] + [f"warn {x}" for x in warns],
    }


def _ssh_audit_exe() -> str | None:
    local = Path(sys.executable).parent / "ssh-audit"
    return str(local) if local.exists() else shutil.which("ssh-audit")


def run_ssh_audit(target: Target) -> dict[str, Any]:
    exe = _ssh_audit_exe()
    if exe is None:
        return {
            "error": "ssh-audit is not installed (pip install ssh-audit: a dev dependency)",
            "ran_at": _now(),
        }
    args = [exe, "-j", "--skip-rate-test", "-t", "30"]
    if target.kind == "lab":
        from lab import state

        lab = state.load()
        if lab is None:
            return {"error": "no running lab", "ran_at": _now()}
        where = f"from the build namespace to {lab.vm_ipv4}:22"
        proc = lab.netns_run("build", [*args, lab.vm_ipv4], timeout=180)
        stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    else:
        # Where ssh itself would go (the inventory's options, -F config), resolved by `ssh -G`.
        # ssh-audit speaks TCP itself: a host behind a jump host is out of its reach.
        argv = list(_endpoint(target).argv)
        g = subprocess.run([*argv[:-1], "-G", argv[-1]], capture_output=True, text=True)
        opts = dict(line.split(" ", 1) for line in g.stdout.splitlines() if " " in line)
        host, port = opts.get("hostname", target.host), opts.get("port", "22")
        where = f"from the controller to {host}:{port}"
        p = subprocess.run([*args, "-p", port, host], capture_output=True, text=True, timeout=180)
        stdout, stderr = p.stdout, p.stderr
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        tail = (stdout + stderr).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"ssh-audit {where}: {tail[0][:200]}", "ran_at": _now()}
    return {**parse_ssh_audit(data), "note": where, "ran_at": _now()}


# --- systemd-analyze security ---------------------------------------------------------------


def parse_exposure(text: str) -> dict[str, Any] | None:
    m = EXPOSURE.search(text)
    if not m:
        return None
    return {"figures": {"exposure": float(m[1]), "rating": m[2]}}


def run_systemd_analyze(target: Target, unit: str = UNIT) -> dict[str, Any]:
    proc = ssh(target, f"sudo -n systemd-analyze security --no-pager {unit}")
    parsed = parse_exposure(proc.stdout)
    if parsed is None:
        why = (proc.stderr.strip().splitlines() or ["no exposure line in the output"])[-1]
        return {"error": f"systemd-analyze security {unit}: {why[:200]}", "ran_at": _now()}
    return {**parsed, "note": unit, "ran_at": _now()}


# --- the task -------------------------------------------------------------------------------


def audit(
    inventory: str | None = None,
    limit: str | None = None,
    report_dir: Path | None = None,
    only: list[str] | None = None,
    fresh: bool = False,
    strict: bool = False,
    *,
    vault_password_file: str | None = None,
    ask_become_pass: bool = False,
) -> int:
    report_dir = report_dir or verify.DEFAULT_REPORT_DIR
    wanted = set(only or ("lynis", "ssh-audit", "systemd"))
    unknown = wanted - {"lynis", "ssh-audit", "systemd"}
    if unknown:
        raise AuditError(f"unknown auditor(s): {', '.join(sorted(unknown))}")
    try:
        targets = verify.resolve_targets(
            inventory, limit, vault_password_file=vault_password_file,
            ask_become_pass=ask_become_pass,
        )
    except verify.VerifyError as exc:
        raise AuditError(str(exc)) from exc
    try:
        return _audit(targets, report_dir, wanted, fresh, strict)
    finally:
        close_channels()


def _audit(
    targets: list[Target], report_dir: Path, wanted: set[str], fresh: bool, strict: bool
) -> int:
    code = 0
    unreachable = []
    for target in targets:
        print(f"==> audit {target.name} ({target.kind})", flush=True)
        probe = ssh(target, "true")
        if probe.returncode == 255:
            # Nothing is claimed for a host that did not answer; its earlier figures stay.
            print(f"    UNREACHABLE: {probe.stderr.strip()[-300:]}", flush=True)
            unreachable.append(target.name)
            continue
        path = report_dir / target.name / "auditors.json"
        previous: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        aud = dict(previous)
        if "ssh-audit" in wanted:
            aud["ssh-audit"] = run_ssh_audit(target)
        if "systemd" in wanted:
            aud["systemd-analyze"] = run_systemd_analyze(target)
        if "lynis" in wanted:
            aud["lynis"] = run_lynis(target, previous.get("lynis"), fresh)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(aud, indent=1) + "\n")
        for name, data in aud.items():
            if data.get("error"):
                print(f"    {name}: ERROR {data['error']}")
                code = 1
        judged = auditors.judge(registry.load_controls().values(), aud)
        for line in auditors.lines(judged):
            print(f"    {line}")
        if strict and auditors.missed(judged):
            code = code or 1  # a threshold missed is a failure (exit codes: 4 means unreachable)
        print(f"    figures in {path}; the next `invoke verify` puts them in the report")
    if unreachable and not code:
        return verify.UNREACHABLE_EXIT
    return code
