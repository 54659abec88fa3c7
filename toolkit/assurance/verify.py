"""`invoke verify`: the posture tests against every host of an inventory, one report per host.

Targets: the hosts of any inventory (default: inventory/lab, the local lab VM), read and
templated by Ansible (hostaccess.hostvars), with `--limit` as Ansible understands it. Each
host is reached exactly as a play reaches it (hostaccess.connection: testinfra's translation
of the inventory's user, port, key, ansible_ssh_common_args/extra_args, ProxyJump, -F
ssh_config), and every command runs as root over one channel (toolkit.assurance.shell_channel),
through sudo with the inventory's become password (vault) or `--ask-become-pass` when sudo asks
for one.

Inventory variables verify reads (all optional): `verify_kind` (lab|production, default
production), `verify_report_name` (the report's file name, default the inventory name),
`verify_report_signing_key` (the operator's SSH key that signs the report; `--sign-key` wins).

Each host gets its own pytest run (tests/posture), so one host's failure or unreachability does
not hide another's results, and each report stands alone. Hosts run in parallel (Ansible's
forks); an index of all hosts with their verdicts is written beside the reports.

History: each run of a host gets its own directory, reports/verify/<host>/<UTC time>/, written
under a hidden name and renamed when complete, and `latest` then points to it; the report says
what changed since the run `latest` pointed to before. A host that cannot be reached gets the
verdict UNREACHABLE, claims nothing else, and gets no run directory: `latest` keeps pointing to
its last report. With a signing key, the operator signs every run
(toolkit.assurance.report_signing).
"""

from __future__ import annotations

import datetime as dt
import getpass
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hostaccess import hostvars
from toolkit.assurance import report, report_signing
from toolkit.controls import ci_record, registry

ROOT = Path(__file__).resolve().parents[2]
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
    signing_key: str | None = None  # the operator's SSH key that signs the report

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
    from hostaccess.connection import host_become_password

    path = str(LAB_INVENTORY) if inventory in (None, "", "lab") else str(inventory)
    try:
        inv = hostvars.load(path, limit, vault_password_file=vault_password_file)
        targets = []
        for host in inv.hosts:
            kind = "lab" if inv.get(host, "verify_kind") == "lab" else "production"
            name = str(inv.get(host, "verify_report_name") or host)
            password = host_become_password(inv, host, ask_become_pass)
            key = inv.get(host, "verify_report_signing_key")
            targets.append(Target(name, host, path, kind, password, vault_password_file,
                                  str(key) if key else None))
    except hostvars.InventoryError as exc:
        raise VerifyError(str(exc)) from exc
    return targets


def pytest_command(
    target: Target, results: Path, keyword: str | None, workers: int = 1,
    password_fd: int | None = None,
) -> list[str]:
    cmd = [
        sys.executable, "-m", "pytest", POSTURE,
        "-p", "toolkit.assurance.pytest_verify", f"--verify-json={results}",
        f"--target={target.spec}", f"--target-kind={target.kind}", f"--target-name={target.name}",
        f"--inventory={target.inventory}", f"--inventory-host={target.host}",
        "-v", "--tb=short", "-p", "no:cacheprovider",
        "-o", "console_output_style=count",
        # where a run's time goes, in every log (verify's own budget is watched in CI)
        "--durations=15", "--durations-min=1.0",
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
    path = report_dir / target.name / "auditors.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def provenance(inventory: str, host: str) -> dict[str, Any]:
    """What the report was produced from and by whom (the host's own facts come from the run)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                 text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        version = None
    status = git("status", "--porcelain", "--untracked-files=no")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {
        "toolkit": {"version": version, "commit": git("rev-parse", "HEAD"),
                    "dirty": bool(status) if status is not None else None},
        "inventory": str(Path(inventory).resolve()),
        "inventory_host": host,
        "operator": {"user": user, "controller": socket.gethostname()},
    }


def host_dir(report_dir: Path, target: Target) -> Path:
    return report_dir / target.name


def previous_model(report_dir: Path, target: Target) -> dict[str, Any] | None:
    """The report `latest` points to (or a report of the flat layout before history)."""
    names = report.files(target.name)
    for path in (host_dir(report_dir, target) / "latest" / names["json"],
                 report_dir / names["json"]):
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        return data
    return None


def _stamp(parent: Path) -> str:
    base = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    stamp, n = base, 1
    while (parent / stamp).exists():
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def _point_latest(hdir: Path, stamp: str) -> None:
    """`latest` -> stamp, replaced atomically (relative, so the tree can be copied)."""
    tmp = hdir / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp, target_is_directory=True)
    os.replace(tmp, hdir / "latest")


def _signature(key: str | None) -> dict[str, Any]:
    if not key:
        return {"signed": False, "reason": "no signing key given (--sign-key or the "
                                           "inventory's verify_report_signing_key)"}
    path = Path(key).expanduser()
    return {"signed": True, "key": report_signing.fingerprint(path), "key_file": str(path),
            "namespace": report_signing.NAMESPACE, "file": report_signing.SIGNATURE}


def _write_run(model: dict[str, Any], staging: Path, key: str | None) -> str:
    """The report files, and the signature when there is a key; the signing line."""
    model["signature"] = _signature(key)
    report.write(model, staging)
    if not key:
        report_signing.write_manifest(staging)
        return f"NOT signed: {model['signature']['reason']}"
    try:
        report_signing.sign(staging, Path(key).expanduser())
    except report_signing.SigningError as exc:
        # The report must not claim a signature it lacks: rendered again, unsigned.
        model["signature"] = {"signed": False, "reason": f"signing failed: {exc}"}
        report.write(model, staging)
        report_signing.write_manifest(staging)
        return f"NOT signed: {exc}"
    return f"signed with {model['signature']['key']}"


def _verify_one(
    target: Target, reg: registry.Registry, refs: Any, report_dir: Path,
    keyword: str | None, workers: int, quiet: bool, prov: dict[str, Any],
    ci: ci_record.Evidence | None = None,
) -> dict[str, Any]:
    hdir = host_dir(report_dir, target)
    hdir.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(hdir)
    # Written under a hidden name and renamed when complete: `latest` never sees half a run.
    staging = hdir / f".{stamp}.partial"
    staging.mkdir()
    log = staging / "pytest.log" if quiet else None
    _say(f"==> verify {target.name} ({target.kind}, {target.host} from {target.inventory})"
         + (f": output in {hdir / stamp / 'pytest.log'}" if log else ""))
    run = run_tests(target, staging, keyword, workers, log)
    (staging / f".{target.name}.results.json").unlink(missing_ok=True)
    if unreachable(run):
        # Claim nothing about a host we could not reach, and keep its last good report.
        why = str(run.get("error", "")).removeprefix("run stopped: ")
        record = {"host": target.name, "verdict": "UNREACHABLE", "reason": why,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (hdir / "unreachable.json").write_text(json.dumps(record) + "\n")
        if log and log.exists():
            log.replace(hdir / "unreachable.log")
        shutil.rmtree(staging)
        kept = hdir / "latest" / report.files(target.name)["md"]
        line = f"{target.name}: UNREACHABLE - {why}" + (
            f" (last good report kept: {kept})" if kept.exists() else "")
        return {"host": target.name, "verdict": "UNREACHABLE", "line": line, "problems": [],
                "changes": [f"{target.name}: unreachable, no new run to compare"]}
    (hdir / "unreachable.json").unlink(missing_ok=True)
    (hdir / "unreachable.log").unlink(missing_ok=True)
    host_prov = dict(prov, **provenance(target.inventory, target.host))
    model = report.build(
        reg, refs, run, host=target.name, kind=target.kind, target=target.spec,
        keyword=keyword, auditors=load_auditors(report_dir, target), provenance=host_prov,
        previous=previous_model(report_dir, target), ci=ci,
    )  # fmt: skip
    model["run"] = stamp
    signed = _write_run(model, staging, target.signing_key)
    staging.rename(hdir / stamp)
    _point_latest(hdir, stamp)
    md = hdir / stamp / report.files(target.name)["md"]
    c = model["summary"]["controls"]
    t = model["summary"]["threats"]
    line = (
        f"{target.name}: {model['verdict']} in {run['duration']:.0f}s - controls {c['passed']} "
        f"passed, {c['failed']} failed, {c['in CI']} in CI, {c['waived'] + c['skipped']} "
        f"waived/skipped, {c['not run'] + c['untested']} not run/untested, {c['procedure']} "
        f"procedures; threats covered {t['covered'] + t['covered + procedures']}/{t['total']}, "
        f"at risk {t['at risk']} - {md} ({signed})"
    )
    return {"host": target.name, "verdict": model["verdict"], "line": line,
            "problems": list(model["problems"]), "report": str(md),
            "changes": report.change_lines(model)}


def write_index(results: list[dict[str, Any]], report_dir: Path, inventory: str) -> Path:
    """index.md / index.json: every host of the run with its verdict."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    rows = [{k: r.get(k) for k in ("host", "verdict", "report")} for r in results]
    (report_dir / "index.json").write_text(json.dumps(
        {"inventory": inventory, "time": stamp, "hosts": rows}, indent=1) + "\n")
    lines = [f"# Posture reports ({inventory}, {stamp})", "", "| host | verdict | report |",
             "|---|---|---|"]
    for r in rows:
        rel = (Path(str(r["report"])).resolve().relative_to(report_dir.resolve()).as_posix()
               if r.get("report") else None)
        link = f"[{rel}]({rel})" if rel else "-"
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
    sign_key: str | None = None,
    diff: bool = False,
    ci_evidence: list[Path] | None = None,
) -> int:
    """Run, report, and return the exit code: 0 all passed, 1 a host failed, 4 unreachable.

    `ci_evidence`: JUnit files of CI's test runs of this toolkit commit (ci_record); without
    them the controls only the toolkit's own tests prove are reported "claimed", not "in CI"."""
    report_dir = report_dir or DEFAULT_REPORT_DIR
    if workers < 1:
        raise VerifyError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and importlib.util.find_spec("xdist") is None:
        raise VerifyError("--workers needs pytest-xdist in the virtual environment")
    targets = resolve_targets(inventory, limit, vault_password_file=vault_password_file,
                              ask_become_pass=ask_become_pass)
    if sign_key:
        targets = [replace(t, signing_key=sign_key) for t in targets]
    for key in sorted({t.signing_key for t in targets if t.signing_key}):
        # A key that cannot sign is found before the hosts are tested, not after.
        if not Path(key).expanduser().is_file():
            raise VerifyError(f"signing key {key}: no such file")
        try:
            report_signing.fingerprint(Path(key).expanduser())
        except (report_signing.SigningError, report_signing.BadInput) as exc:
            raise VerifyError(f"signing key: {exc}") from exc
    try:
        ci = ci_record.load(list(ci_evidence or []), *ci_record.toolkit_state())
    except ci_record.RecordError as exc:
        raise VerifyError(f"--ci-evidence {exc}") from exc
    report_dir.mkdir(parents=True, exist_ok=True)
    reg = registry.load()
    refs = registry.collect_tests()
    prov = {"started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    parallel = min(forks(), len(targets))
    if parallel > 1:
        print(f"==> verify: {len(targets)} hosts, {parallel} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            results = list(pool.map(
                lambda t: _verify_one(t, reg, refs, report_dir, keyword, workers, True, prov,
                                      ci),
                targets))
    else:
        results = [_verify_one(t, reg, refs, report_dir, keyword, workers, False, prov, ci)
                   for t in targets]
    index = write_index(results, report_dir, targets[0].inventory)
    lines = []
    for r in results:
        lines.append(r["line"])
        lines += [f"  - {p}" for p in r["problems"]]
    if diff:
        lines += ["", "==> changes since the previous run"]
        lines += [line for r in results for line in r["changes"]]
    print("\n".join(["", "==> verify summary", *lines, f"index: {index}"]), flush=True)
    if any(r["verdict"] == "FAIL" for r in results):
        return 1
    if any(r["verdict"] == "UNREACHABLE" for r in results):
        return UNREACHABLE_EXIT
    return 0
