"""`invoke verify`: the posture tests against every host of an inventory, one report per host.

Transport: plain OpenSSH through testinfra's ssh backend with connection reuse (ControlMaster),
not Ansible's connection plugin: a posture suite issues hundreds of short commands and the
Ansible backend would pay a module round trip for each.

Targets:
- the lab (default, or `--inventory inventory/lab`): `lab.state.load()` gives the ssh_config with
  the `signhost` alias (admin user, key, forwarded port, ControlMaster);
- any other inventory: hosts from `ansible-inventory --list` (with `--limit`); an ssh_config is
  generated from their ansible_host/port/user/key (or the `-F` in ansible_ssh_common_args is
  used as is). A host is treated as production unless its vars say `verify_kind: lab`.

Each host gets its own pytest run (tests/posture), so one host's failure or unreachability does
not hide another's results, and each report stands alone.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import registry, report

ROOT = Path(__file__).resolve().parent.parent
LAB_INVENTORY = ROOT / "inventory" / "lab"
DEFAULT_REPORT_DIR = ROOT / "reports" / "verify"
POSTURE = "tests/posture"


class VerifyError(Exception):
    """A problem that stops verify before any test runs (one line for the operator)."""


@dataclass(frozen=True)
class Target:
    name: str  # inventory host name; the report's file name
    spec: str  # testinfra host spec
    kind: str  # "lab" or "production"
    ssh_config: Path | None = None
    since: float | None = None  # when the host came up (lab): older auditor figures are stale


def is_lab_inventory(inventory: str | None) -> bool:
    if inventory in (None, "", "lab"):
        return True
    assert inventory is not None
    return Path(inventory).resolve() == LAB_INVENTORY.resolve()


def _limited(names: list[str], limit: str | None) -> list[str]:
    if not limit:
        return names
    patterns = [p.strip() for p in limit.replace(":", ",").split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def lab_targets(limit: str | None = None) -> list[Target]:
    from lab import state

    lab = state.load()
    if lab is None:
        raise VerifyError(
            f"no running lab ({state.instance_name()}): run `invoke lab.up` first, "
            "or pass --inventory for other hosts"
        )
    # Instances run side by side (lab0 for the pipeline, others for experiments): their
    # reports must not overwrite each other, so only lab0 reports under the bare alias.
    instance = str(lab.raw.get("instance") or state.instance_name())
    name = lab.ssh_alias if instance == "lab0" else f"{lab.ssh_alias}-{instance}"
    if not _limited([name, lab.ssh_alias], limit):
        return []
    lab_json = lab.state_dir / "lab.json"
    since = lab_json.stat().st_mtime if lab_json.exists() else None
    return [Target(name, f"ssh://{lab.ssh_alias}", "lab", lab.ssh_config, since)]


def _ssh_block(name: str, hv: dict[str, Any]) -> str:
    lines = [f"Host {name}", f"  HostName {hv.get('ansible_host', name)}"]
    if hv.get("ansible_port"):
        lines.append(f"  Port {hv['ansible_port']}")
    if hv.get("ansible_user"):
        lines.append(f"  User {hv['ansible_user']}")
    key = hv.get("ansible_ssh_private_key_file") or hv.get("ansible_private_key_file")
    if key:
        lines += [f"  IdentityFile {Path(str(key)).expanduser()}", "  IdentitiesOnly yes"]
    return "\n".join(lines) + "\n"


SSH_COMMON = """
Host *
  BatchMode yes
  ControlMaster auto
  ControlPath /tmp/signverify-%C
  ControlPersist 120s
  ServerAliveInterval 15
Match all
  Include ~/.ssh/config
"""


def inventory_targets(inventory: str, limit: str | None, workdir: Path) -> list[Target]:
    cmd = ["ansible-inventory", "-i", inventory, "--list"]
    if limit:
        cmd += ["--limit", limit]
    exe = Path(sys.executable).parent / "ansible-inventory"
    if exe.exists():
        cmd[0] = str(exe)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VerifyError(f"ansible-inventory: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise VerifyError(f"ansible-inventory -i {inventory}: {tail}")
    data = json.loads(proc.stdout)
    hostvars: dict[str, dict[str, Any]] = data.get("_meta", {}).get("hostvars", {})
    names = sorted(hostvars)
    if not names:
        raise VerifyError(
            f"inventory {inventory}: no hosts" + (f" match {limit!r}" if limit else "")
        )
    blocks: list[str] = []
    targets: list[Target] = []
    config = workdir / ".ssh_config"
    for name in names:
        hv = hostvars[name]
        kind = "lab" if hv.get("verify_kind") == "lab" else "production"
        common = shlex.split(str(hv.get("ansible_ssh_common_args") or ""))
        templated = [k for k, v in hv.items() if k.startswith("ansible_") and "{{" in str(v)]
        if "-F" in common and not any("{{" in a for a in common):
            own = Path(common[common.index("-F") + 1]).expanduser()
            targets.append(Target(name, f"ssh://{hv.get('ansible_host', name)}", kind, own))
            continue
        if templated:
            raise VerifyError(
                f"{name}: {', '.join(templated)} use Jinja templates; verify reads the inventory "
                "without templating: give literal values (or an ssh_config through -F)"
            )
        blocks.append(_ssh_block(name, hv))
        targets.append(Target(name, f"ssh://{name}", kind, config))
    if blocks:
        workdir.mkdir(parents=True, exist_ok=True)
        config.write_text("# generated by invoke verify\n" + "\n".join(blocks) + SSH_COMMON)
        config.chmod(0o600)
    return targets


def resolve_targets(inventory: str | None, limit: str | None, workdir: Path) -> list[Target]:
    if is_lab_inventory(inventory):
        targets = lab_targets(limit)
    else:
        assert inventory is not None
        targets = inventory_targets(inventory, limit, workdir)
    if not targets:
        raise VerifyError(f"no host matches --limit {limit!r}")
    return targets


def pytest_command(
    target: Target, results: Path, keyword: str | None, workers: int = 1
) -> list[str]:
    cmd = [
        sys.executable, "-m", "pytest", POSTURE,
        "-p", "toolkit.pytest_verify", f"--verify-json={results}",
        f"--target={target.spec}", f"--target-kind={target.kind}", f"--target-name={target.name}",
        "-v", "--tb=short", "-p", "no:cacheprovider",
        "-o", "console_output_style=count",
    ]  # fmt: skip
    if target.ssh_config:
        cmd.append(f"--ssh-config={target.ssh_config}")
    if workers > 1:
        # Each worker opens its own SSH connection; the guest's CPUs bound the gain.
        cmd += ["-n", str(workers)]
    if keyword:
        cmd += ["-k", keyword]
    return cmd


def run_tests(
    target: Target, workdir: Path, keyword: str | None, workers: int = 1
) -> dict[str, Any]:
    results = workdir / f".{target.name}.results.json"
    results.unlink(missing_ok=True)
    cmd = pytest_command(target, results, keyword, workers)
    started = time.monotonic()
    # Output goes straight to the terminal: pytest -v prints one line per test with a counter.
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
    took = round(time.monotonic() - started, 1)
    if not results.exists():
        return {
            "tests": [],
            "duration": took,
            "exitstatus": proc.returncode,
            "error": f"pytest exited {proc.returncode} before writing results",
        }
    run: dict[str, Any] = json.loads(results.read_text())
    run["duration"] = took
    if not run["tests"] and not run.get("error") and run.get("exitstatus") not in (0, None):
        run["error"] = f"pytest exited {run['exitstatus']} before any test ran (see above)"
    return run


def load_auditors(report_dir: Path, target: Target) -> dict[str, Any] | None:
    """The host's latest `invoke audit` figures, unless they predate the host (a new lab VM)."""
    path = report_dir / f"{target.name}.auditors.json"
    if not path.exists():
        return None
    if target.since is not None and path.stat().st_mtime < target.since:
        print(f"    ({path.name} predates this lab VM: not merged; run `invoke audit`)")
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def verify(
    inventory: str | None = None,
    limit: str | None = None,
    keyword: str | None = None,
    report_dir: Path | None = None,
    workers: int = 1,
) -> int:
    """Run, report, and return the exit code (0 when every host passed)."""
    report_dir = report_dir or DEFAULT_REPORT_DIR
    if workers > 1 and importlib.util.find_spec("xdist") is None:
        raise VerifyError("--workers needs pytest-xdist in the virtual environment")
    targets = resolve_targets(inventory, limit, report_dir)
    reg = registry.load()
    refs = registry.collect_tests()
    failed: list[str] = []
    lines: list[str] = []
    for target in targets:
        print(f"==> verify {target.name} ({target.kind}, {target.spec})", flush=True)
        run = run_tests(target, report_dir, keyword, workers)
        model = report.build(
            reg, refs, run, host=target.name, kind=target.kind, target=target.spec,
            keyword=keyword, auditors=load_auditors(report_dir, target),
        )  # fmt: skip
        paths = report.write(model, report_dir)
        c = model["summary"]["controls"]
        t = model["summary"]["threats"]
        verdict = "PASS" if model["ok"] else "FAIL"
        lines.append(
            f"{target.name}: {verdict} in {run['duration']:.0f}s - controls {c['passed']} passed, "
            f"{c['failed']} failed, {c['waived'] + c['skipped']} waived/skipped, "
            f"{c['not run'] + c['untested']} not run/untested, {c['procedure']} procedures; "
            f"threats covered {t.get('covered', 0)}/{t['total']} - {paths[1]}"
        )
        for p in model["problems"]:
            lines.append(f"  - {p}")
        if not model["ok"]:
            failed.append(target.name)
    print("\n".join(["", "==> verify summary", *lines]), flush=True)
    return 1 if failed else 0
