"""`invoke verify`: the posture tests against every host of an inventory, one report per host.

Targets: the hosts of any inventory (default: inventory/lab, the local lab VM), read and
templated by Ansible (toolkit.hostvars), with `--limit` as Ansible understands it. Each host is
reached exactly as a play reaches it (toolkit.connection: testinfra's translation of the
inventory's user, port, key, ansible_ssh_common_args/extra_args, ProxyJump, -F ssh_config), and
every command runs as root over one channel (toolkit.shell_channel), through sudo with the
inventory's become password (vault) or `--ask-become-pass` when sudo asks for one.

Inventory variables verify reads (all optional): `verify_kind` (lab|production, default
production), `verify_report_name` (the report's file name, default the inventory name).

Each host gets its own pytest run (tests/posture), so one host's failure or unreachability does
not hide another's results, and each report stands alone. Hosts run in parallel (Ansible's
forks); an index of all hosts with their verdicts is written beside the reports. A host that
cannot be reached gets the verdict UNREACHABLE, claims nothing else, and its last good report is
kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import hostvars, registry, report

ROOT = Path(__file__).resolve().parent.parent
LAB_INVENTORY = ROOT / "inventory" / "lab"
DEFAULT_REPORT_DIR = ROOT / "reports" / "verify"
POSTURE = "tests/posture"
UNREACHABLE_EXIT = 4


class VerifyError(Exception):
    """A problem that stops verify before any test runs (one line for the operator)."""


@dataclass(frozen=True)
class Target:
    name: str  # the report's file name
    host: str  # the inventory host name
    inventory: str
    kind: str  # "lab" or "production"
    become_password: str | None = field(default=None, repr=False)
    vault_password_file: str | None = None  # a path: the suite reads the inventory too

    @property
    def spec(self) -> str:
        return f"ssh://{self.host}"


def resolve_targets(
    inventory: str | None,
    limit: str | None,
    *,
    vault_password_file: str | None = None,
    ask_become_pass: bool = False,
) -> list[Target]:
    from toolkit.ansible_run import host_become_password

    path = str(LAB_INVENTORY) if inventory in (None, "", "lab") else str(inventory)
    try:
        inv = hostvars.load(path, limit, vault_password_file=vault_password_file)
        targets = []
        for host in inv.hosts:
            kind = "lab" if inv.get(host, "verify_kind") == "lab" else "production"
            name = str(inv.get(host, "verify_report_name") or host)
            password = host_become_password(inv, host, ask_become_pass)
            targets.append(Target(name, host, path, kind, password, vault_password_file))
    except hostvars.InventoryError as exc:
        raise VerifyError(str(exc)) from exc
    return targets


def pytest_command(
    target: Target, results: Path, keyword: str | None, workers: int = 1,
    password_fd: int | None = None,
) -> list[str]:
    cmd = [
        sys.executable, "-m", "pytest", POSTURE,
        "-p", "toolkit.pytest_verify", f"--verify-json={results}",
        f"--target={target.spec}", f"--target-kind={target.kind}", f"--target-name={target.name}",
        f"--inventory={target.inventory}", f"--inventory-host={target.host}",
        "-v", "--tb=short", "-p", "no:cacheprovider",
        "-o", "console_output_style=count",
    ]  # fmt: skip
    if password_fd is not None:
        # The become password travels through an inherited pipe, never argv or environment.
        cmd.append(f"--become-password-fd={password_fd}")
    if workers > 1:
        # Each worker opens its own SSH connection; the guest's CPUs bound the gain.
        cmd += ["-n", str(workers)]
    if keyword:
        cmd += ["-k", keyword]
    return cmd


_print_lock = threading.Lock()


def _say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def run_tests(
    target: Target, workdir: Path, keyword: str | None, workers: int = 1,
    log: Path | None = None,
) -> dict[str, Any]:
    """One pytest run against one host; its output to the terminal, or to `log` (fleets)."""
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / f".{target.name}.results.json"
    results.unlink(missing_ok=True)
    read_fd = write_fd = None
    if target.become_password is not None:
        read_fd, write_fd = os.pipe()
    cmd = pytest_command(target, results, keyword, workers, read_fd)
    started = time.monotonic()
    out = log.open("w") if log else None
    env = os.environ.copy()
    if target.vault_password_file:
        # The path of the operator's vault password file (not the password): the suite reads
        # the same inventory for its expectations.
        env["ANSIBLE_VAULT_PASSWORD_FILE"] = str(Path(target.vault_password_file).resolve())
    try:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT if out else None,
            pass_fds=(read_fd,) if read_fd is not None else (),
        )
        if read_fd is not None and write_fd is not None:
            os.close(read_fd)
            assert target.become_password is not None
            os.write(write_fd, target.become_password.encode())
            os.close(write_fd)
        rc = proc.wait()
    finally:
        if out:
            out.close()
    took = round(time.monotonic() - started, 1)
    if not results.exists():
        return {
            "tests": [],
            "duration": took,
            "exitstatus": rc,
            "error": f"pytest exited {rc} before writing results",
        }
    run: dict[str, Any] = json.loads(results.read_text())
    run["duration"] = took
    if not run["tests"] and not run.get("error") and run.get("exitstatus") not in (0, None):
        run["error"] = f"pytest exited {run['exitstatus']} before any test ran (see above)"
    return run


def unreachable(run: dict[str, Any]) -> bool:
    """The run stopped because the host could not be reached (tests/posture/conftest.py)."""
    return bool(
        run.get("exitstatus") == UNREACHABLE_EXIT
        or str(run.get("error", "")).startswith("run stopped: unreachable")
    )


def load_auditors(report_dir: Path, target: Target) -> dict[str, Any] | None:
    """The host's latest `invoke audit` figures."""
    path = report_dir / f"{target.name}.auditors.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _verify_one(
    target: Target, reg: registry.Registry, refs: Any, report_dir: Path,
    keyword: str | None, workers: int, quiet: bool,
) -> dict[str, Any]:
    log = report_dir / f"{target.name}.pytest.log" if quiet else None
    _say(f"==> verify {target.name} ({target.kind}, {target.host} from {target.inventory})"
         + (f": output in {log}" if log else ""))
    run = run_tests(target, report_dir, keyword, workers, log)
    if unreachable(run):
        # Claim nothing about a host we could not reach, and keep its last good report.
        why = str(run.get("error", "")).removeprefix("run stopped: ")
        record = {"host": target.name, "verdict": "UNREACHABLE", "reason": why,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (report_dir / f"{target.name}.unreachable.json").write_text(json.dumps(record) + "\n")
        kept = report_dir / f"{target.name}.md"
        line = f"{target.name}: UNREACHABLE - {why}" + (
            f" (last good report kept: {kept})" if kept.exists() else "")
        return {"host": target.name, "verdict": "UNREACHABLE", "line": line, "problems": []}
    (report_dir / f"{target.name}.unreachable.json").unlink(missing_ok=True)
    model = report.build(
        reg, refs, run, host=target.name, kind=target.kind, target=target.spec,
        keyword=keyword, auditors=load_auditors(report_dir, target),
    )  # fmt: skip
    paths = report.write(model, report_dir)
    c = model["summary"]["controls"]
    t = model["summary"]["threats"]
    verdict = "PASS" if model["ok"] else "FAIL"
    line = (
        f"{target.name}: {verdict} in {run['duration']:.0f}s - controls {c['passed']} passed, "
        f"{c['failed']} failed, {c['waived'] + c['skipped']} waived/skipped, "
        f"{c['not run'] + c['untested']} not run/untested, {c['procedure']} procedures; "
        f"threats covered {t.get('covered', 0)}/{t['total']} - {paths[1]}"
    )
    return {"host": target.name, "verdict": verdict, "line": line,
            "problems": list(model["problems"]), "report": str(paths[1])}


def write_index(results: list[dict[str, Any]], report_dir: Path, inventory: str) -> Path:
    """index.md / index.json: every host of the run with its verdict."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    rows = [{k: r.get(k) for k in ("host", "verdict", "report")} for r in results]
    (report_dir / "index.json").write_text(json.dumps(
        {"inventory": inventory, "time": stamp, "hosts": rows}, indent=1) + "\n")
    lines = [f"# Posture reports ({inventory}, {stamp})", "", "| host | verdict | report |",
             "|---|---|---|"]
    for r in rows:
        name = Path(str(r.get("report") or "-")).name
        link = f"[{name}]({name})" if r.get("report") else "-"
        lines.append(f"| {r['host']} | {r['verdict']} | {link} |")
    path = report_dir / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def forks() -> int:
    from ansible import constants as C

    return max(1, int(C.DEFAULT_FORKS))


def verify(
    inventory: str | None = None,
    limit: str | None = None,
    keyword: str | None = None,
    report_dir: Path | None = None,
    workers: int = 1,
    *,
    vault_password_file: str | None = None,
    ask_become_pass: bool = False,
) -> int:
    """Run, report, and return the exit code: 0 all passed, 1 a host failed, 4 unreachable."""
    report_dir = report_dir or DEFAULT_REPORT_DIR
    if workers < 1:
        raise VerifyError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and importlib.util.find_spec("xdist") is None:
        raise VerifyError("--workers needs pytest-xdist in the virtual environment")
    targets = resolve_targets(inventory, limit, vault_password_file=vault_password_file,
                              ask_become_pass=ask_become_pass)
    report_dir.mkdir(parents=True, exist_ok=True)
    reg = registry.load()
    refs = registry.collect_tests()
    parallel = min(forks(), len(targets))
    if parallel > 1:
        print(f"==> verify: {len(targets)} hosts, {parallel} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            results = list(pool.map(
                lambda t: _verify_one(t, reg, refs, report_dir, keyword, workers, True), targets))
    else:
        results = [_verify_one(t, reg, refs, report_dir, keyword, workers, False)
                   for t in targets]
    index = write_index(results, report_dir, targets[0].inventory)
    lines = []
    for r in results:
        lines.append(r["line"])
        lines += [f"  - {p}" for p in r["problems"]]
    print("\n".join(["", "==> verify summary", *lines, f"index: {index}"]), flush=True)
    if any(r["verdict"] == "FAIL" for r in results):
        return 1
    if any(r["verdict"] == "UNREACHABLE" for r in results):
        return UNREACHABLE_EXIT
    return 0
