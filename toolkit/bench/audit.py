"""Audit log figures for `invoke bench`: the daemon's start-up time with 10^5, 10^6 and 10^7
entries of history, replaying the whole log ("before", `Daemon(full_replay=True)`: what every
start did until the state checkpoints) against starting from the last state checkpoint
("after"), on the same log in the same run.

The history is written straight to the files by a generator (a daemon would need hours for
10^7 entries): `sign` entries in the daemon's canonical form, chained, in blocks of 999 closed
by a state checkpoint signed by the token's audit key (what the writer does under load, every
`checkpoint_interval` = 1000 entries), in segments of `segment_entries` (the default, 10^6)
as rotation leaves them, and the last checkpoint's state snapshot. Old timestamps, so the
budget window is empty: the snapshot is as small as a real one with no open work, and the
full replay still folds every entry. Bench only; the tests write small logs through the
daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from toolkit.local_signer import Lab, available

SIZES = (10**5, 10**6, 10**7)

_GENERATE = r"""
import hashlib, json, sys, time
from pathlib import Path
from signer import audit, certs, config, policy, segments
from signer.algorithms import ECDSA_P256
from signer.token import Token
import base64

cfg = config.load(Path(sys.argv[1]))
n = int(sys.argv[2])
d = cfg.daemon
tok = Token(d.token_module, d.token_label, d.token_serial)
tok.login(d.pin_file.read_text().strip())
key = tok.private_key(d.audit_key)
when = "2020-01-01T00:00:00.000000Z"
windows = {p.name: p.budget_window for p in cfg.profiles.values()}
snapshot = policy.State().export(windows, time.time())
state = hashlib.sha256(snapshot).hexdigest()
head = '{"client":"build1","event":"sign","format":"raw",'
tail = ('"key":"pkcs11:object=ec","name":"artifact.bin","prev":"%s","profile":"ec","seq":%d,'
        '"sha256":"' + "ab" * 32 + '","sig_sha256":"' + "cd" * 32 + '","size":8,"time":"'
        + when + '"}')
prev, seq, first = audit.GENESIS, 0, 0
out = open(d.audit_log, "wb", buffering=1 << 22)
started = time.monotonic()
while seq < n:
    lines = []
    for _ in range(min(999, n - 1 - seq)):
        rest = tail % (prev, seq)
        prev = hashlib.sha256((head + rest).encode()).hexdigest()
        lines.append(head + '"hash":"' + prev + '",' + rest + "\n")
        seq += 1
    b = audit.body(seq, prev, "checkpoint", {"state": state}, when)
    b["sig"] = base64.b64encode(tok.sign_digest(key, ECDSA_P256, audit.checkpoint_message(b))
                                ).decode()
    entry, line = audit.seal(b)
    out.write("".join(lines).encode() + line)
    prev, seq = entry["hash"], seq + 1
    if seq - first >= d.segment_entries and seq < n:
        out.close()
        d.audit_log.rename(segments.closed_name(d.audit_log, first))
        out = open(d.audit_log, "wb", buffering=1 << 22)
        first = seq
out.close()
snaps = d.state_dir / "checkpoints"
snaps.mkdir(parents=True, exist_ok=True)
audit.snapshot_path(snaps, seq - 1).write_bytes(snapshot)
# the generator writes what the daemon writes: the first block must verify as such
v = audit.Verifier(certs.load_public_key(d.audit_cert))
for _off, line in segments.lines(segments.of_log(d.audit_log)[0], 0, audit.MAX_LINE + 1):
    v.feed(line)
    if v.seq >= 2000:
        break
tok.close()
print(json.dumps({"entries": seq, "seconds": time.monotonic() - started}))
"""

_START = r"""
import json, sys, time
from pathlib import Path
from signer import config, daemon
cfg = config.load(Path(sys.argv[1]))
dm = daemon.Daemon(cfg, full_replay=sys.argv[2] == "full")
started, cpu = time.monotonic(), time.process_time()
dm.start()
elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
replayed = dm.writer.scan.replayed
dm.writer.close()
dm.token.close()
import resource
print(json.dumps({"start_s": elapsed, "cpu_s": cpu, "scan_s": dm.scan_seconds, "replayed": replayed,
                  "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(lab: Lab, code: str, *args: str | Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=lab.env,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else
                           f"exit {r.returncode}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def run(sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    why = available()
    if why:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        return _run(Path(tmp), sizes)


def _run(root: Path, sizes: tuple[int, ...]) -> dict[str, Any]:
    lab = Lab(root)
    lab.init_token()
    profiles = {"ec": {"key": "pkcs11:object=ec", "algorithm": "ecdsa-p256", "formats": ["raw"],
                       "max_size": 1 << 20, "clients": ["build1"], "budget_count": 10**9,
                       "budget_window": 3600}}
    out: dict[str, Any] = {}
    keys = None
    for n in sizes:
        config = lab.config(f"audit{n}", profiles, ["build1"], [])
        if keys is None:
            for args in (["--profile", "ec"], ["--audit"]):
                lab.signer("keys", "generate", "--config", config, *args).check_returncode()
            lab.signer("keys", "selfsign", "--config", config, "--audit").check_returncode()
            keys = True
        gen = _child(lab, _GENERATE, config, str(n))
        log = config.parent
        size = sum(p.stat().st_size for p in log.iterdir() if p.name.startswith("audit."))
        # after first: it appends its start entry and a state checkpoint, which the full
        # replay then reads too (two entries more, nothing to speak of)
        after = _child(lab, _START, config, "checkpoint")
        print(f"  audit start-up, {n} entries, from the last checkpoint: {after}",
              file=sys.stderr, flush=True)
        before = _child(lab, _START, config, "full")
        out[f"entries_{n}"] = {
            "log_MiB": round(size / (1 << 20), 1),
            "segments": sum(1 for p in log.iterdir() if p.name.startswith("audit.")),
            "generate_s": round(gen["seconds"], 1),
            "before_full_replay_start_s": round(before["start_s"], 3),
            "before_cpu_s": round(before["cpu_s"], 3),
            "before_scan_s": round(before["scan_s"], 3),
            "before_entries_read": before["replayed"],
            "before_us_per_entry": round(before["scan_s"] / n * 1e6, 2),
            "before_peak_rss_MiB": round(before["peak_rss_MiB"], 1),
            "after_from_checkpoint_start_s": round(after["start_s"], 3),
            "after_cpu_s": round(after["cpu_s"], 3),
            "after_scan_s": round(after["scan_s"], 4),
            "after_entries_read": after["replayed"],
            "after_peak_rss_MiB": round(after["peak_rss_MiB"], 1),
            "speedup": round(before["start_s"] / after["start_s"], 1),
            "load_average_1min": round(os.getloadavg()[0], 1),
        }
        shutil.rmtree(log)
        print(f"  audit start-up, {n} entries: {out[f'entries_{n}']}", file=sys.stderr,
              flush=True)
    return out


if __name__ == "__main__":
    sizes = tuple(int(a) for a in sys.argv[1:]) or SIZES
    print(json.dumps(run(sizes), indent=2))
