"""The pipeline behind `invoke up` (the main job) and `invoke ci` (the tests, as CI runs them).

A pipeline is a list of stages; each stage is one command, run with its output streamed
to the terminal and to `reports/ci/<stage>.log`. A stage that fails stops the run, prints
its log tail, and the lab instance is torn down (`invoke ci`) so nothing is left behind.
The summary at the end says what ran, how long each stage took and where the logs and
reports are; it is also written to `reports/ci/summary.json`.

A stage may run in the background (`until=`): it starts, the stages after it run beside it,
and it is joined before the stage it names begins (CI's unit tests run while the lab VM is
built and provisioned, which is mostly waiting on the network and the emulated guest). Its
output goes to its log only; its result is printed when it is joined, and a failure there
fails the run like any other.

A stage may run alone (`alone=True`, CI's verify): before it starts, every background stage must
have parked (written its `park` file: a lane waiting at its gate, `wait_gate`) or ended; when it
ends, its `gate` file is written ("open", or why not) and the parked lanes go on. Its time then
measures the stage, not the lanes beside it: one emulated guest takes one of the controller's two
cores, and three of them with the unit tests made verify take 197 s instead of about 100. A
failure anywhere closes every gate not yet written, so no lane waits for a stage that will not run.

A stage names the files it runs (`needs`, e.g. `playbooks/deploy.yml`). When one is not in the
tree the stage fails ("MISSING ...") like a stage whose command failed: a renamed or deleted
playbook makes CI fail, it is never skipped, and nothing in the pipeline counts as passed without
having run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.runner.ansible_run import ROOT, venv_exe

REPORTS = ROOT / "reports"
CI_DIR = REPORTS / "ci"
VENV_BIN = ROOT / ".venv" / "bin"


_bin = venv_exe


@dataclass
class Stage:
    name: str
    argv: list[str]
    needs: list[str] = field(default_factory=list)  # paths (relative to ROOT); missing: failed
    always: bool = False  # run even after a failure (teardown)
    until: str | None = None  # run in the background until the stage of this name starts
    # a stage that runs a pipeline of its own (a release lane): where that one's summary is
    sub_summary: Path | None = None
    # a background stage that parks: the file it writes once it waits at a gate (wait_gate)
    park: Path | None = None
    alone: bool = False  # start only once every background stage has parked or ended
    gate: Path | None = None  # written when this stage ends: "open", else why it did not pass
    status: str = "pending"
    seconds: float = 0.0
    started: float | None = None  # wall clock (epoch seconds) when it started
    log: Path | None = None

    def missing(self) -> list[str]:
        return [n for n in self.needs if not (ROOT / n).exists()]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class _Background:
    stage: Stage
    proc: subprocess.Popen[bytes]
    started: float


def start_background(stage: Stage, env: dict[str, str], ci_dir: Path | None = None) -> _Background:
    ci_dir = ci_dir or CI_DIR
    ci_dir.mkdir(parents=True, exist_ok=True)
    stage.log = log_path(stage.name, ci_dir)
    print(f"\n\033[1m==> [{stage.name}] {' '.join(stage.argv)}\033[0m\n"
          f"    (in the background until [{stage.until}]; output: {stage.log})", flush=True)
    with stage.log.open("wb") as fh:
        proc = subprocess.Popen(stage.argv, cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stage.status, stage.started = "running", time.time()
    return _Background(stage, proc, time.monotonic())


def join_background(bg: _Background) -> bool:
    stage = bg.stage
    if bg.proc.poll() is None:
        print(f"==> waiting for [{stage.name}] (background)", flush=True)
    rc = bg.proc.wait()
    stage.seconds = time.monotonic() - bg.started
    stage.status = "passed" if rc == 0 else f"FAILED (exit {rc})"
    tail = _tail(stage.log, 3 if rc == 0 else 40) if stage.log else ""
    print(f"{tail}\n==> [{stage.name}] {stage.status} in {stage.seconds:.0f}s (background)",
          flush=True)
    return rc == 0


def log_path(name: str, ci_dir: Path | None = None) -> Path:
    """reports/ci/<stage>.log, the stage's name made a file name (a '/' in a name such as
    "inventory/lab" would be a directory)."""
    return (ci_dir or CI_DIR) / (re.sub(r"[^A-Za-z0-9._+=,() -]+", "_", name).strip() + ".log")


def run_stage(stage: Stage, env: dict[str, str], ci_dir: Path | None = None) -> bool:
    ci_dir = ci_dir or CI_DIR
    ci_dir.mkdir(parents=True, exist_ok=True)
    stage.log = log_path(stage.name, ci_dir)
    print(f"\n\033[1m==> [{stage.name}] {' '.join(stage.argv)}\033[0m", flush=True)
    started, stage.started = time.monotonic(), time.time()
    try:
        with stage.log.open("w") as fh, subprocess.Popen(
            stage.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace",
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                fh.write(line)
            rc = proc.wait()
    except OSError as exc:
        # A stage that cannot start fails like one that ran and failed: the run goes on to
        # its teardown stages (lab.down) instead of ending with a traceback and a VM left up.
        stage.seconds = time.monotonic() - started
        stage.status = f"FAILED (cannot start: {exc})"
        print(f"==> [{stage.name}] {stage.status}", flush=True)
        return False
    stage.seconds = time.monotonic() - started
    stage.status = "passed" if rc == 0 else f"FAILED (exit {rc})"
    print(f"==> [{stage.name}] {stage.status} in {stage.seconds:.0f}s", flush=True)
    return rc == 0


GATE_OPEN = "open"
PARK_POLL = 2.0  # seconds between looks at a gate or at the parked lanes
PARK_REPORT = 60.0  # seconds between progress lines while waiting


def write_gate(path: Path, state: str) -> None:
    """Open a gate ("open") or close it for good (any other text: why), once."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state + "\n")
    tmp.replace(path)  # whole or not at all: a waiting lane never reads half a word


def wait_gate(gate: Path, park: Path, what: str, timeout: float) -> int:
    """A lane's stage that parks it until the pipeline's `what` has run: writes `park`, then
    waits for `gate`. 0 once the gate is open; 1 when it was closed (the pipeline failed before
    or in `what`: the lane stops, its teardown runs) or after `timeout` seconds."""
    park.parent.mkdir(parents=True, exist_ok=True)
    park.write_text(f"{os.getpid()}\n")
    started = last = time.monotonic()
    print(f"==> parked: waiting for the pipeline's {what} ({gate})", flush=True)
    while True:
        now = time.monotonic()
        if gate.exists():
            state = gate.read_text().strip()
            if state == GATE_OPEN:
                print(f"==> the pipeline's {what} has run; going on after {now - started:.0f}s",
                      flush=True)
                return 0
            print(f"==> the pipeline will not run its {what} ({state}): this lane stops here",
                  flush=True)
            return 1
        if now - started > timeout:
            print(f"==> gave up after {timeout:.0f}s: the pipeline's {what} never ended "
                  f"({gate} was not written)", flush=True)
            return 1
        if now - last >= PARK_REPORT:
            print(f"    ... still waiting for the pipeline's {what} ({now - started:.0f}s)",
                  flush=True)
            last = now
        time.sleep(PARK_POLL)


def _wait_parked(stage: Stage, background: list[_Background]) -> None:
    """Before an `alone` stage: every background stage parked (its park file written) or
    ended. Their results are left for their join."""
    started = last = time.monotonic()

    def busy() -> list[Stage]:
        return [b.stage for b in background if b.proc.poll() is None
                and not (b.stage.park is not None and b.stage.park.exists())]

    if pending := busy():
        print(f"==> [{stage.name}] runs alone: waiting for "
              f"{', '.join(s.name for s in pending)} to park or end", flush=True)
    while pending := busy():
        now = time.monotonic()
        if now - last >= PARK_REPORT:
            print(f"    ... still running after {now - started:.0f}s: "
                  f"{', '.join(s.name for s in pending)}", flush=True)
            last = now
        time.sleep(PARK_POLL)
    if time.monotonic() - started >= PARK_POLL:
        print(f"==> [{stage.name}] everything beside it parked or ended after "
              f"{time.monotonic() - started:.0f}s", flush=True)


def run(stages: list[Stage], *, title: str, env_extra: dict[str, str],
        on_failure: Callable[[Stage], None] | None = None, ci_dir: Path | None = None) -> bool:
    env = dict(os.environ, **env_extra, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    started = time.monotonic()
    failed: Stage | None = None
    background: list[_Background] = []
    # an earlier run's gates and park files would let a lane through, or the pipeline on
    for st in stages:
        for path in (st.gate, st.park):
            if path is not None:
                path.unlink(missing_ok=True)

    def close_gates(why: str) -> None:
        for st in stages:
            if st.gate is not None:
                write_gate(st.gate, why)

    def fail(st: Stage) -> None:
        nonlocal failed
        if failed is None:
            failed = st
            close_gates(f"stage {st.name} failed")
            why = f"; last lines of {st.log}:\033[0m\n{_tail(st.log)}" if st.log else (
                f": {st.status}\033[0m")
            print(f"\n\033[1;31m!! stage {st.name} failed{why}", flush=True)
            if on_failure:
                on_failure(st)

    def join(name: str | None) -> None:
        for bg in [b for b in background if name is None or b.stage.until == name]:
            background.remove(bg)
            if not join_background(bg):
                fail(bg.stage)

    for st in stages:
        if not st.always:
            join(st.name)
        if failed is not None and not st.always:
            st.status = "not run"
            continue
        if missing := st.missing():
            st.status = f"FAILED (missing {', '.join(missing)})"
            fail(st)
            continue
        if st.until is not None:
            background.append(start_background(st, env, ci_dir))
            continue
        if st.alone:
            _wait_parked(st, background)
        ok = run_stage(st, env, ci_dir)
        if not ok and not st.always:
            fail(st)
        if st.gate is not None:
            write_gate(st.gate, GATE_OPEN if ok else f"stage {st.name} failed")
    close_gates("the run ended before it")  # no lane waits for a stage that did not run
    join(None)  # a background stage whose `until` never came (a failure before it)
    total = time.monotonic() - started
    summary(stages, title=title, total=total, ci_dir=ci_dir)
    return failed is None and all(s.status == "passed" for s in stages)


def _sub_rows(stage: Stage) -> list[dict[str, Any]]:
    """The stages of a lane's own pipeline (its summary.json), for the run's summary."""
    if stage.sub_summary is None:
        return []
    try:
        rows = json.loads(stage.sub_summary.read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return []
    return [r for r in rows if isinstance(r, dict)]


def figures(stages: list[Stage], total: float) -> dict[str, Any]:
    """The figures issue 25 asks of a CI run, from its stages and its lanes' stages: each
    verify, each part of the lab tests and the longest (the halves run at once), the total."""
    rows = [(s.name, s.seconds, s.status, s.started) for s in stages if s.sub_summary is None] + [
        (f"{s.name} / {r.get('stage', '?')}", float(r.get("seconds") or 0), str(r.get("status")),
         r.get("started")) for s in stages for r in _sub_rows(s)]
    ran = [(n, round(t, 1), at) for n, t, st, at in rows
           if st == "passed" or st.startswith("FAILED")]
    verify = {n: t for n, t, _at in ran if n.endswith("verify")}
    lab = {n: t for n, t, _at in ran if "lab tests" in n.rsplit("/", 1)[-1]}
    # from the first lab test's start to the last one's end, over every part and VM
    spans = [(float(at), float(at) + t) for n, t, at in ran
             if n in lab and isinstance(at, (int, float))]
    span = round(max(e for _s, e in spans) - min(s for s, _e in spans), 1) if (
        spans and len(spans) == len(lab)) else None
    return {"verify_seconds": verify, "lab_tests_seconds": lab,
            "lab_tests_longest_seconds": max(lab.values(), default=None),
            "lab_tests_span_seconds": span, "total_seconds": round(total, 1)}


def summary(stages: list[Stage], *, title: str, total: float, ci_dir: Path | None = None) -> None:
    ci_dir = ci_dir or CI_DIR
    ci_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"stage": s.name, "status": s.status, "seconds": round(s.seconds, 1),
             "started": round(s.started, 1) if s.started is not None else None,
             "log": str(s.log) if s.log else None,
             **({"stages": _sub_rows(s)} if s.sub_summary else {})} for s in stages]
    figs = figures(stages, total)
    reports = sorted(str(p) for p in (REPORTS / "verify").glob("*/latest/*.md")) if (
        REPORTS / "verify").exists() else []
    (ci_dir / "summary.json").write_text(json.dumps(
        {"title": title, "total_seconds": round(total, 1), "figures": figs, "stages": rows,
         "reports": reports}, indent=2) + "\n")
    subs = [f"  {r.get('stage', '?')}" for s in stages for r in _sub_rows(s)]
    width = max(len(n) for n in [s.name for s in stages] + subs)
    print(f"\n\033[1m==> {title}: summary ({total / 60:.1f} min)\033[0m")
    for s in stages:
        t = f"{s.seconds:7.0f}s" if s.status != "not run" and s.log else "       -"
        print(f"  {s.name:<{width}}  {t}  {s.status}")
        for row in _sub_rows(s):
            name = f"  {row.get('stage', '?')}"
            secs = float(row.get("seconds") or 0)
            print(f"  {name:<{width}}  {secs:7.0f}s  {row.get('status')}")
    for key, label in (("verify_seconds", "verify"), ("lab_tests_seconds", "lab tests")):
        for name, secs in figs[key].items():
            print(f"  figure: {label}: {secs:.0f}s  ({name})")
    if figs["lab_tests_longest_seconds"] is not None and len(figs["lab_tests_seconds"]) > 1:
        print(f"  figure: lab tests, the longest part: {figs['lab_tests_longest_seconds']:.0f}s")
    if figs["lab_tests_span_seconds"] is not None:
        print(f"  figure: lab tests, from the first one's start to the last one's end: "
              f"{figs['lab_tests_span_seconds']:.0f}s")
    print(f"  figure: total: {total / 60:.1f} min")
    print(f"  logs: {ci_dir}/<stage>.log   summary: {ci_dir / 'summary.json'}")
    for r in reports:
        print(f"  posture report: {r}")


def invoke(*args: str) -> list[str]:
    return [_bin("invoke"), *args]


# mypy --strict over every module: the signer (it runs on the host), host access, the lab, the
# toolkit, the entry point, the Ansible plugins (the roles' filters too) and every test tree (unit,
# signer, posture, lab: their fixtures are typed; testinfra has no hints, so a posture test's
# `host` is Any to mypy). Whole directories, not a list of files: a new module or test tree is
# checked without anyone adding it.
MYPY_PATHS = ["signer", "hostaccess", "lab", "toolkit", "tasks.py", "callback_plugins",
              "strategy_plugins", "tests",
              *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("roles/*/*_plugins"))]


# The plays `invoke provision|harden|deploy` run (toolkit/tasks/plays.py): the syntax check and
# the lab stages need them, so a renamed or deleted playbook fails CI.
PLAYBOOKS = ["playbooks/provision.yml", "playbooks/harden.yml", "playbooks/deploy.yml"]


def static_stages() -> list[Stage]:
    playbooks = sorted({*PLAYBOOKS, *(str(p.relative_to(ROOT))
                                      for p in (ROOT / "playbooks").glob("*.yml"))})
    return [
        Stage("ruff", [_bin("ruff"), "check", "."]),
        Stage("mypy", [_bin("mypy"), *MYPY_PATHS], needs=MYPY_PATHS),
        Stage("yamllint", [_bin("yamllint"), "."], needs=[".yamllint"]),
        Stage("no lab coupling", [_bin("python"), "-m", "toolkit.assurance.lab_coupling"],
              needs=["toolkit/assurance/lab_coupling.py"]),
        Stage("ansible-syntax", ["sh", "-c", " && ".join(
            f"{_bin('ansible-playbook')} --syntax-check {p}" for p in playbooks)],
              needs=playbooks),
        Stage("ansible-lint", [_bin("ansible-lint"), "--offline", "-q"], needs=["roles"]),
        Stage("threat-model", invoke("threat-model.check"),
              needs=["toolkit/controls/check.py", "threat-model/threats.yml"]),
    ]


# JUnit records of CI's test runs, stamped with the toolkit commit (toolkit.controls.ci_record):
# verify cites them for the controls only the toolkit's own tests can prove.
UNIT_RECORD = "reports/ci/unit+signer.junit.xml"
LAB_RECORD = "reports/ci/lab-tests.junit.xml"


def _recorded(path: str) -> list[str]:
    return ["-p", "toolkit.controls.ci_record", f"--junitxml={path}"]


LAB_RECORD_SECOND_HALF = "reports/ci/lab-tests-second-half.junit.xml"

# The lab tests run in two halves at once, each on a VM of the first release of its own: the
# first half (every module of tests/lab not named here: the harden, roll-back, AIDE and PIN
# share stories, which change the host's hardening or its deployed configuration) on the
# pipeline's VM after verify; the second half (the signing stories through the build
# namespace, the card, the collector, the SSH clients, the USB devices, the lab's own life
# cycle) on a second VM that a lane of its own provisions, hardens and deploys beside the
# pipeline (lab_tests_lane_stages). That lane skips the pipeline's proofs (harden and deploy
# again, verify) and parks until the pipeline's verify has run alone, so both halves start
# together. One emulated guest keeps one of the controller's two cores busy: run one after the
# other, the lab tests left the other core idle for 17 minutes. The split is by measured time
# (CI #11, contended: first half 553 s with the life cycle's 67 s; second half 749 s, 464 s
# once its certificates came in one round and its admin commands on one connection).
LAB_TESTS_SECOND_HALF = [
    "tests/lab/test_signer_e2e.py",
    "tests/lab/test_authenticode_e2e.py",
    "tests/lab/test_openpgp_e2e.py",
    "tests/lab/test_audit_collector.py",
    "tests/lab/test_ssh_clients.py",
    "tests/lab/test_usb.py",
    "tests/lab/test_lab_vm.py",
]
# ... and the lane's early part: run on its VM right after its deploy, while the pipeline
# deploys again and the other releases verify (the lane would otherwise sit parked, CI #12:
# 220 s): the harden runs (they put back what they change, as the first half's stories do)
# and the lab's life cycle (a VM of its own). Both halves were 625 s with them (CI #12).
LAB_TESTS_EARLY = [
    "tests/lab/test_harden_runs.py",
    "tests/lab/test_lab_lifecycle.py",
]
LAB_RECORD_EARLY = "reports/ci/lab-tests-early.junit.xml"


def lab_tests_argv(inventory: str | None, vault: str | None, half: str | None, record: str
                   ) -> list[str]:
    """pytest over tests/lab through `inventory` (None: the tests' default, inventory/lab):
    all of it (half None), the "first" half (every module but LAB_TESTS_SECOND_HALF and
    LAB_TESTS_EARLY), the "second" (LAB_TESTS_SECOND_HALF) or the lane's "early" part
    (LAB_TESTS_EARLY)."""
    if half == "second":
        paths = LAB_TESTS_SECOND_HALF
    elif half == "early":
        paths = LAB_TESTS_EARLY
    else:
        paths = ["tests/lab", *(f"--ignore={p}" for p in [*LAB_TESTS_SECOND_HALF,
                                                          *LAB_TESTS_EARLY]
                                if half == "first")]
    return [_bin("pytest"), "-q", "-p", "no:cacheprovider", "--durations=15",
            *_recorded(record), *paths,
            *(["--lab-inventory", inventory] if inventory else []),
            *(["--lab-vault-password-file", vault] if vault else [])]


def test_stages() -> list[Stage]:
    paths = ["tests/unit", "tests/signer"]
    return [Stage("unit+signer tests", [_bin("pytest"), "-q", "--durations=15",
                                        *_recorded(UNIT_RECORD), *paths], needs=paths)]


# The Debian releases CI proves, the first on the full pipeline (lab.site, the lab tests), the
# others in a lane of their own beside it (release_lane_stages). lab/image.py knows the same
# names; the pipeline only passes them on.
RELEASES = {"trixie": "Debian 13 (trixie)", "bookworm": "Debian 12 (bookworm)"}


def main_job_stages(instance: str | None, release: str | None = None) -> list[Stage]:
    """`invoke up` (`make lab`): the lab VM through inventory/lab, ansible.cfg's default."""
    i = ["--instance", instance] if instance else []
    r = ["--release", release] if release else []
    return [
        Stage("lab.up", invoke("lab.up", *i, *r)),
        Stage("provision", invoke("provision"), needs=["playbooks/provision.yml"]),
        Stage("harden", invoke("harden"), needs=["playbooks/harden.yml"]),
        Stage("deploy", invoke("deploy"), needs=["playbooks/deploy.yml"]),
        Stage("verify", invoke("verify"), needs=["tests/posture"]),
    ]


def release_lane_stages(instance: str, release: str) -> list[Stage]:
    """Another release in the same CI run, on an instance of its own: `make lab`'s path
    (inventory/lab, the instance from $SIGNLAB_INSTANCE) from a fresh VM through provision,
    harden, harden again (changed=0), deploy and verify, then down. The lab tests and the
    production-style site run once, on the first release (lab_stages)."""
    i = ["--instance", instance]
    return [
        Stage("lab.down (before)", invoke("lab.down", *i)),
        Stage("lab.up", invoke("lab.up", *i, "--release", release)),
        Stage("provision", invoke("provision"), needs=["playbooks/provision.yml"]),
        Stage("harden", invoke("harden"), needs=["playbooks/harden.yml"]),
        Stage("harden again (changed=0)", invoke("harden", "--expect-unchanged"),
              needs=["playbooks/harden.yml"]),
        Stage("deploy", invoke("deploy"), needs=["playbooks/deploy.yml"]),
        Stage("verify", invoke("verify"), needs=["tests/posture"]),
        Stage("lab.down", invoke("lab.down", *i), always=True),
        Stage("nothing left behind", invoke("lab.status", *i, "--expect-clean"), always=True),
    ]


def lab_tests_lane_stages(instance: str, release: str, gate: Path | None = None,
                          park: Path | None = None) -> list[Stage]:
    """The second half of the lab tests (LAB_TESTS_SECOND_HALF), on a VM of the first release
    of its own, beside the pipeline: a fresh VM, the production-style site, provision, harden,
    deploy through it (the proofs of those runs, again and --check, stay with the pipeline),
    then the early part of the lab tests (LAB_TESTS_EARLY), the second half, then down. With
    `gate` (and `park`), the lane parks after its early part until the pipeline's verify has
    run alone (wait_gate)."""
    inventory = site_inventory(instance)
    vault = str(Path(inventory).parent / "vault-pass")
    inv = ["-i", inventory, "--vault-password-file", vault]
    i = ["--instance", instance]
    return [
        Stage("lab.down (before)", invoke("lab.down", *i)),
        Stage("lab.up", invoke("lab.up", *i, "--release", release)),
        Stage("lab.site (jump host, password sudo, vault)", invoke("lab.site", *i)),
        Stage("provision", invoke("provision", *inv), needs=["playbooks/provision.yml"]),
        Stage("harden", invoke("harden", *inv), needs=["playbooks/harden.yml"]),
        Stage("deploy", invoke("deploy", *inv), needs=["playbooks/deploy.yml"]),
        Stage("lab tests (early part)", lab_tests_argv(inventory, vault, "early",
                                                       LAB_RECORD_EARLY),
              needs=LAB_TESTS_EARLY),
        *([Stage("parked until the pipeline's verify has run", [
            _bin("python"), "-m", "toolkit.pipeline", "wait-gate", "--gate", str(gate),
            "--park", str(park or gate.with_suffix(".parked")), "--what", "verify"])]
          if gate is not None else []),
        Stage("lab tests (second half)",
              lab_tests_argv(inventory, vault, "second", LAB_RECORD_SECOND_HALF),
              needs=LAB_TESTS_SECOND_HALF),
        Stage("lab.down", invoke("lab.down", *i), always=True),
        Stage("nothing left behind", invoke("lab.status", *i, "--expect-clean"), always=True),
    ]


def lane_dir(release: str, lab_tests: bool = False) -> Path:
    """Where a lane keeps its stage logs and its summary.json."""
    return CI_DIR / (f"{release}-lab-tests" if lab_tests else release)


def site_inventory(instance: str) -> str:
    """Where `lab.site` renders the production-style inventory of this instance."""
    from lab.state import state_dir  # the lab's own paths, known only to the pipeline

    return str(state_dir(instance) / "site" / "inventory")


def lab_stages(instance: str, ci_evidence: list[str] | None = None,
               release: str | None = None, half: str | None = None) -> list[Stage]:
    """CI on the lab VM. The proof runs once, through the production-style inventory that
    `lab.site` renders from inventory/production.example: a jump host (ProxyJump), an admin
    whose sudo asks for the password kept in ansible-vault. Every play, verify and the lab tests
    take that inventory, as an operator's would. `ci_evidence`: the JUnit records of this run's
    unit and signer tests (written before verify starts), which verify cites.

    `make lab` (inventory/lab: a direct connection, the lab's `admin` with passwordless sudo)
    is kept honest on the fresh VM before the site takes it over: `harden --check --tags
    preflight` with inventory/lab runs inventory.check on it (argument specs of every role,
    cross-rules, with the running lab's facts), connects and becomes root the way `make lab`
    does, and runs the lock-out checks against the live session. The roles themselves are
    the same for both inventories and are proven by the site run.

    `half`: "first" when a lane runs the second half of the lab tests beside it
    (lab_tests_lane_stages); None runs them all here.
    """
    inventory = site_inventory(instance)
    vault = str(Path(inventory).parent / "vault-pass")
    inv = ["-i", inventory, "--vault-password-file", vault]
    i = ["--instance", instance]
    r = ["--release", release] if release else []
    return [
        Stage("lab.up", invoke("lab.up", *i, *r)),
        Stage("make lab's inventory: harden --check --tags preflight (inventory/lab)",
              invoke("harden", "--check", "--tags", "preflight"),
              needs=["playbooks/harden.yml"]),
        Stage("lab.site (jump host, password sudo, vault)", invoke("lab.site", *i)),
        Stage("provision", invoke("provision", *inv), needs=["playbooks/provision.yml"]),
        Stage("harden", invoke("harden", *inv), needs=["playbooks/harden.yml"]),
        Stage("harden again (changed=0)", invoke("harden", "--expect-unchanged", *inv),
              needs=["playbooks/harden.yml"]),
        Stage("deploy", invoke("deploy", *inv), needs=["playbooks/deploy.yml"]),
        Stage("deploy again (changed=0, daemon kept)",
              invoke("deploy", "--expect-unchanged", *inv), needs=["playbooks/deploy.yml"]),
        Stage("verify", invoke("verify", *inv, *(
            a for p in ci_evidence or [] for a in ("--ci-evidence", p))), needs=["tests/posture"]),
        Stage("lab tests" + (" (first half)" if half else ""),
              lab_tests_argv(inventory, vault, half, LAB_RECORD), needs=["tests/lab"]),
        Stage("harden --check (changed=0)",
              invoke("harden", "--check", "--expect-unchanged", *inv),
              needs=["playbooks/harden.yml"]),
        Stage("lab.down", invoke("lab.down", *i), always=True),
        Stage("nothing left behind", invoke("lab.status", *i, "--expect-clean"), always=True),
    ]


LANE_FIRST_INDEX = 6
LANE_NICENESS = 5


def ci_stages(instance: str, releases: list[str], *, tests: bool = True, lab: bool = True,
              keep: bool = False) -> list[Stage]:
    """`invoke ci`: static checks and the VM-less tests, then the first release's whole
    pipeline on `instance` (lab_stages, each stage named by its release) and, beside it, a
    lane per other release on lab6, lab5, ... (`invoke ci-lane`, release_lane_stages), and a
    lane of the first release on the next instance down that runs the second half of the lab
    tests (`invoke ci-lane --lab-tests`, lab_tests_lane_stages).

    The unit and signer tests need no VM: they run in the background while the lab is built,
    provisioned, hardened and deployed (emulated guests leave the controller's CPUs partly
    idle) and are joined before verify, which cites their JUnit record. The lanes start once
    the first VM is up (its image built, the controller's disk and mirror free again) and are
    joined before the first release's last check.

    The first release's verify runs alone (Stage.alone): the other releases' lanes end before
    it (their verify overlaps the pipeline's deploy again), the lab tests' lane parks after its
    deploy; the verify's time in the summary is the suite's own, and both halves of the lab
    tests start when it has run."""
    first, *others = releases
    test = test_stages() if tests else []
    stages = (static_stages() if tests else []) + test
    if not lab:
        return stages
    main = lab_stages(instance, [UNIT_RECORD] if test else [], first, half="first")
    for s in main:
        s.name = f"{RELEASES[first]}: {s.name}"
    # verify runs alone: the other releases' lanes end first (their verify runs while the
    # pipeline deploys), the lab tests' lane parks after its deploy and starts its half when
    # verify has run, at the same time as the first half here
    verify = next(s for s in main if s.name.endswith(": verify"))
    verify.alone, verify.gate = True, CI_DIR / "gates" / "verify"
    for t in test:
        t.until = next(s.name for s in main if s.name.endswith(": verify"))
    last_check = next(s.name for s in main if s.name.endswith("--check (changed=0)"))
    lanes = []
    for n, rel in enumerate([*others, first]):
        # lab6, lab5, ...: the unit tests make real namespaces as lab7 and lab8 while the lanes
        # run, and lab9 is the first release's
        lane_instance = f"lab{LANE_FIRST_INDEX - n}"
        if n < len(others):
            argv = invoke("ci-lane", "--release", rel, "--instance", lane_instance)
            name, sub = f"{RELEASES[rel]}: lane on {lane_instance}", lane_dir(rel)
        else:
            sub = lane_dir(rel, lab_tests=True)
            park = sub / "parked"
            argv = invoke("ci-lane", "--release", rel, "--instance", lane_instance,
                          "--lab-tests", "--gate", str(verify.gate), "--park", str(park))
            name = f"{RELEASES[rel]}: lab tests (second half), lane on {lane_instance}"
        # Beside the pipeline, a little behind it: its stages (verify, the first half of the lab
        # tests) are what the run waits for, the lanes fill the time its guest leaves free.
        # Their VMs inherit the niceness (QEMU is started by the lane's `lab.up`).
        argv = ["nice", "-n", str(LANE_NICENESS), *argv]
        lanes.append(Stage(name, [*argv, "--keep"] if keep else argv, until=last_check,
                           sub_summary=sub / "summary.json",
                           park=park if n >= len(others) else None))
    if keep:
        for s in main:
            s.always = False
    # A fresh VM: whatever an earlier run left of this instance goes first.
    return [*stages, Stage("lab.down (before)", invoke("lab.down", "--instance", instance)),
            main[0], *lanes, *main[1:]]


def _main(argv: list[str] | None = None) -> int:
    """`python -m toolkit.pipeline wait-gate --gate G --park P [--what W] [--timeout S]`: the
    stage by which a lane parks until the pipeline opens its gate (wait_gate)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m toolkit.pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait-gate", help="park until the pipeline opens a gate")
    w.add_argument("--gate", type=Path, required=True, help="the file the pipeline writes")
    w.add_argument("--park", type=Path, required=True, help="the file written once parked")
    w.add_argument("--what", default="stage", help="the stage waited for (for the messages)")
    w.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    args = parser.parse_args(argv)
    return wait_gate(args.gate, args.park, args.what, args.timeout)


if __name__ == "__main__":
    sys.exit(_main())
