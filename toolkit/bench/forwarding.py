"""Audit forwarding figure for `invoke bench` (issue 15): P-256 signing throughput through the
daemon with the audit log forwarded (rsyslog imfile -> RELP over mutual TLS -> a collector)
against the same daemon with the forwarder stopped, in the same run, 1 and 8 clients.

- The forwarder is the signer role's own configuration (its template rendered with the role's
  defaults) in a real rsyslogd, the collector the lab's receiver configuration in another,
  on loopback with a CA made at run time (toolkit/local_forwarder.py). One daemon, one log.
- Phases alternate off, on, off, on, ... (`rounds` pairs), so drift of a shared machine shows as a
  difference between the two offs or the two ons rather than as a cost. An "on" phase starts
  once the forwarder has caught up with what the "off" before it wrote (steady state: the
  catch-up is reported apart); at its end, how far the copy misses and how long it takes
  to drain are reported, so "forwarding keeps up" is measured, not assumed.
- The collector runs on the same machine (on a host it is elsewhere): its CPU is reported, and
  on a machine with few cores the "on" figure carries it too (an upper bound of the cost).
- At the end, `signer audit compare` of the host's log against the collector's copy: every
  entry arrived (consistent, nothing in flight).

Ratios, no asserts (the tests assert: tests/signer/test_audit_forwarding.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from signer import certs, compare
from toolkit import local_forwarder
from toolkit.bench.signer import SECONDS, _rate
from toolkit.local_forwarder import Forwarding
from toolkit.local_signer import Lab, available, sign_over_socket

ROUNDS = 3  # off, on, off, on, off, on


def _last_seq(log: Path) -> int:
    with log.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - (1 << 17)))
        lines = f.read().splitlines()
    return int(json.loads(lines[-1])["seq"])


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a running process (0 when it is not running)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(seconds: float = SECONDS, rounds: int = ROUNDS) -> dict[str, Any]:
    why = available() or local_forwarder.available()
    if why:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench-forwarding-") as tmp:
        return _run(Path(tmp), seconds, rounds)


def _run(root: Path, seconds: float, rounds: int) -> dict[str, Any]:
    lab = Lab(root / "signer")
    lab.init_token()
    profiles = {"ec": {"key": "pkcs11:object=ec", "algorithm": "ecdsa-p256", "formats": ["raw"],
                       "max_size": 1 << 20, "clients": ["build1"], "budget_count": 10**9,
                       "budget_window": 3600}}
    # as toolkit/bench/signer.py's daemon figure, so "off" compares with it
    config = lab.config("forwarding", profiles, ["build1"], [], checkpoint_interval=1000)
    for args in (["--profile", "ec"], ["--audit"]):
        lab.signer("keys", "generate", "--config", config, *args).check_returncode()
    lab.signer("keys", "selfsign", "--config", config, "--audit").check_returncode()
    log = config.parent / "audit.jsonl"
    sock = Lab.socket_of(config)

    def one() -> None:
        code, message, _sig = sign_over_socket(sock, "ec", b"artifact", fmt="raw")
        if code != 0:
            raise RuntimeError(message)

    out: dict[str, Any] = {"seconds_per_figure": seconds, "audit_fsync": True,
                           "load_average_1min_before": round(os.getloadavg()[0], 2)}
    phases: list[dict[str, Any]] = []
    with Forwarding(root / "forwarding", log) as fw:
        collector_pid = fw.start_collector()
        lab.start(config)
        try:
            for _ in range(rounds):
                for mode in ("off", "on"):
                    phase: dict[str, Any] = {"forwarding": mode}
                    if mode == "on":
                        fw.start_forwarder()
                        phase["catch_up_s"] = round(fw.wait_for(_last_seq(log), 120), 2)
                    else:
                        fw.stop_forwarder()
                    proc = fw.procs.get("forwarder")
                    fwd_pid = proc.pid if proc is not None else None
                    daemon_pid = lab.daemons[config].pid
                    cpu0 = _cpu_s(fwd_pid), _cpu_s(collector_pid), _cpu_s(daemon_pid)
                    seq0 = _last_seq(log)
                    phase["daemon_1_client_per_s"] = round(_rate(one, seconds, 1), 1)
                    phase["daemon_8_clients_per_s"] = round(_rate(one, seconds, 8), 1)
                    last = _last_seq(log)
                    entries = last - seq0
                    if mode == "on":
                        phase["copy_missing_at_end_entries"] = fw.missing(last)
                        phase["drain_s"] = round(fw.wait_for(last, 120), 2)
                    cpu1 = _cpu_s(fwd_pid), _cpu_s(collector_pid), _cpu_s(daemon_pid)
                    for who, before, after in zip(("forwarder", "collector", "daemon"), cpu0,
                                                  cpu1, strict=True):
                        if mode == "on" or who == "daemon":
                            phase[f"{who}_cpu_ms_per_1000_entries"] = round(
                                1e6 * (after - before) / max(entries, 1), 1)
                    phase["entries_written"] = entries
                    phase["load_average_1min"] = round(os.getloadavg()[0], 2)
                    phases.append(phase)
            if "forwarder" not in fw.procs:
                fw.start_forwarder()
            fw.wait_for(_last_seq(log), 120)
        finally:
            lab.stop()
        spki = certs.load_public_key(lab.certs / "audit.pem")
        result = compare.compare([log], fw.copy, spki)
        copy_lines = sum(1 for line in fw.copy.read_bytes().splitlines() if line.strip())
    out["phases"] = phases
    for clients in ("1_client", "8_clients"):
        key = f"daemon_{clients}_per_s"
        on = [p[key] for p in phases if p["forwarding"] == "on"]
        off = [p[key] for p in phases if p["forwarding"] == "off"]
        out[f"on_over_off_{clients}"] = round(sum(on) / len(on) / (sum(off) / len(off)), 3)
        out[f"on_over_off_{clients}_per_round"] = [round(a / b, 3) for a, b in
                                                    zip(on, off, strict=True)]
    on_phases = [p for p in phases if p["forwarding"] == "on"]
    daemon_cpu = sorted(p["daemon_cpu_ms_per_1000_entries"] for p in phases)
    for who in ("forwarder", "collector"):
        cpu = sorted(p[f"{who}_cpu_ms_per_1000_entries"] for p in on_phases)
        out[f"{who}_cpu_over_daemon_cpu_median"] = round(
            cpu[len(cpu) // 2] / daemon_cpu[len(daemon_cpu) // 2], 3)
    out["compare"] = result.text()
    out["every_entry_received"] = result.consistent and result.in_flight == 0 \
        and result.copy_first == result.local_first
    out["entries_in_log"] = (result.local_last or 0) + 1
    out["lines_in_copy"] = copy_lines
    out["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else SECONDS), indent=2))
