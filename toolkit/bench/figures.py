"""The figures the issues ask for, measured in one run, into one JSON file (`invoke bench`).

Benchmarks measure and compare; they assert nothing (the tests do that). Figures that are
compared are ratios measured in the same run on the same machine (e.g. signer throughput
vs the raw token, second harden vs first), so two versions can be compared even on
machines of different speed. Output: `reports/bench/bench-<time>.json` and a table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit

from toolkit.runner.ansible_run import ROOT

OUT = ROOT / "reports" / "bench"


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT)
    return time.monotonic() - started, proc.returncode


def _inv(*args: str) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "invoke"), *args]


def lab_figures(instance: str, cold: bool, env: dict[str, str],
                lab_tests: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Lab: cold up (image build) if asked, warm up, reset; then the plays first vs second,
    verify, and with `lab_tests` (half -> its pytest argv: the halves CI runs at once on two
    VMs, from the pipeline) each half one after the other on this one VM, and their ratio."""
    from lab import image

    fig: dict[str, Any] = {"instance": instance}
    subprocess.run(_inv("lab.down", "--instance", instance), env=env, capture_output=True)
    if cold:
        d = image.image_dir()
        if d.exists():
            shutil.rmtree(d)
        t, rc = _timed(_inv("lab.up", "--instance", instance), env)
        fig["lab_up_cold_s"] = round(t, 1) if rc == 0 else f"failed rc={rc}"
        subprocess.run(_inv("lab.down", "--instance", instance), env=env, capture_output=True)
    t, rc = _timed(_inv("lab.up", "--instance", instance), env)
    if rc:
        raise Exit(f"bench: lab.up failed (rc={rc})")
    fig["lab_up_warm_s"] = round(t, 1)
    facts = json.loads((Path(env.get("SIGNLAB_STATE") or f"/var/lib/signlab/{instance}")
                        / "lab.json").read_text())
    fig["accel"] = facts["vm"]["accel"]
    t, rc = _timed(_inv("lab.reset", "--instance", instance), env)
    fig["lab_reset_s"] = round(t, 1)
    plays: dict[str, Any] = {}
    for name in ("provision", "harden"):
        if (ROOT / "playbooks" / f"{name}.yml").exists():
            t1, rc1 = _timed(_inv(name), env)
            t2, rc2 = _timed(_inv(name), env)
            plays[name] = {"first_s": round(t1, 1), "second_s": round(t2, 1),
                           "second_over_first": round(t2 / t1, 3) if t1 else None,
                           "ok": rc1 == 0 and rc2 == 0}
    if (ROOT / "playbooks" / "deploy.yml").exists():
        t, rc = _timed(_inv("deploy"), env)
        plays["deploy"] = {"first_s": round(t, 1), "ok": rc == 0}
        if rc == 0 and find_spec("toolkit.bench.card"):
            print("==> the card: signer vs raw pkcs11-tool, same card, same run", flush=True)
            try:
                fig["card"] = import_module("toolkit.bench.card").run(instance)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                fig["card"] = {"failed": str(exc)}
    if find_spec("toolkit.tasks.verify"):
        t, rc = _timed(_inv("verify"), env)
        plays["verify"] = {"seconds": round(t, 1), "passed": rc == 0}
    fig["plays"] = plays
    if lab_tests:
        halves: dict[str, Any] = {}
        for half, argv in lab_tests.items():
            print(f"==> lab tests, {half} half (inventory/lab)", flush=True)
            t, rc = _timed(argv, env)
            halves[half] = {"seconds": round(t, 1), "passed": rc == 0}
        secs = [h["seconds"] for h in halves.values()]
        if len(secs) >= 2 and secs[0]:
            halves["second_over_first"] = round(secs[1] / secs[0], 3)
        halves["one_after_the_other_s"] = round(sum(secs), 1)
        fig["lab_tests"] = halves
    subprocess.run(_inv("lab.down", "--instance", instance), env=env, capture_output=True)
    return fig


def collect(instance: str, cold: bool, no_lab: bool,
            audit_sizes: tuple[int, ...] = (), before: Path | None = None,
            lab_tests: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Every figure of one bench run: the machine, the signer's (with `before`, the daemon of
    that checkout measured beside this one's), signing with the audit log forwarded vs not
    (rsyslog on loopback), the audit log's start-up with each history length of `audit_sizes`
    (full replay vs from the last checkpoint), and the lab's unless `no_lab`."""
    env = dict(os.environ, SIGNLAB_INSTANCE=instance)
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": sys.version.split()[0], "kernel": platform.release(),
                    "cpus": os.cpu_count()},
    }
    if find_spec("toolkit.bench.signer"):
        print("==> signer figures", flush=True)
        result["signer"] = import_module("toolkit.bench.signer").run(before=before)
    if find_spec("toolkit.bench.forwarding"):
        print("==> audit forwarding figures (signing with the forwarder on vs off)", flush=True)
        result["audit_forwarding"] = import_module("toolkit.bench.forwarding").run()
    if audit_sizes:
        print(f"==> audit start-up figures ({', '.join(map(str, audit_sizes))} entries; the full "
              "replay of 10^7 takes minutes)", flush=True)
        result["audit_startup"] = import_module("toolkit.bench.audit").run(audit_sizes)
    if find_spec("toolkit.bench.tcg_cpu"):
        print("==> the lab guest's CPU model under TCG (QEMU's max vs the lab's, qemu-user)",
              flush=True)
        result["tcg_cpu"] = import_module("toolkit.bench.tcg_cpu").run()
    if not no_lab:
        print(f"==> lab figures (instance {instance}; several minutes)", flush=True)
        result["lab"] = lab_figures(instance, cold, env, lab_tests)
    return result


def write(result: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
