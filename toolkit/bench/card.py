"""Signatures per second through the lab's card (issue 23, point 6): the signer, from the build
namespace through SSH, the gateway, the daemon and OpenSC, against raw `pkcs11-tool` signing
on the same card on the VM, measured alternately in the same run (the emulated card under TCG
is slow: the ratio is what counts, not the rates).

Raw: `pkcs11-tool --sign` as the daemon's user (pcscd answers no one else), one process per
signature, as a script or an operator would use it: each one loads OpenSC, finds the card and
logs in. The PIN reaches it on standard input (`--pin env:` of a shell that read it), never in
an argument or sudo's environment. The signer: `sign --format raw` of a small artifact with the
inventory lab's card profile, one request after the other (the daemon keeps its card session
between them).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Any

from lab import state

ROUNDS = 3  # alternations of raw and signer
PER_ROUND = 3  # signatures of each kind per round
MODULE = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
CARD_PROFILE = "card"  # inventory/lab's profile on the card
SOFTHSM_PROFILE = "dev"  # inventory/lab's day-to-day profile on the host's SoftHSM2 token
KEY_ID = "0001"  # lab/card.py: the key behind `CAC ID Certificate`
OWNER = "signer"  # the daemon's user (token_owner)


def _admin(lab: state.LabState, command: str, stdin: bytes | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh", "-F", str(lab.ssh_config), lab.ssh_alias, command],
                          input=stdin, capture_output=True, timeout=timeout, check=False)


def _raw(lab: state.LabState, pin: bytes, n: int) -> float:
    """Seconds for n `pkcs11-tool --sign` runs on the VM (one process each), timed there."""
    script = (f"IFS= read -r P && export P && echo bench > /tmp/card-bench.in && "
              f"t0=$(date +%s%N) && for i in $(seq {n}); do pkcs11-tool --module {MODULE} "
              f"--login --pin env:P --sign -m SHA256-RSA-PKCS --id {KEY_ID} "
              f"-i /tmp/card-bench.in -o /tmp/card-bench.sig >/dev/null 2>&1 || exit 1; done "
              f"&& echo $(( $(date +%s%N) - t0 ))")
    r = _admin(lab, f"sudo -u {OWNER} sh -c {shlex.quote(script)}", stdin=pin + b"\n")
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"pkcs11-tool on the card failed: {r.stderr.decode()[-300:]}")
    return int(r.stdout.split()[-1]) / 1e9


def _signer(lab: state.LabState, n: int, profile: str = CARD_PROFILE) -> float:
    """Seconds for n signatures through the signer, from the build namespace."""
    argv = ["ssh", "-o", f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}", "-o",
            "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-i", str(lab.key("build")), f"sign-build@{lab.vm_ipv4}",
            f"sign --profile {profile} --format raw --size 5"]
    started = time.monotonic()
    for _ in range(n):
        r = lab.netns_run("build", argv, input=b"bench", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"signer on the card failed: {r.stderr.decode()[-300:]}")
    return time.monotonic() - started


def run(instance: str, rounds: int = ROUNDS, per_round: int = PER_ROUND) -> dict[str, Any]:
    lab = state.load(instance)
    if lab is None or "card" not in lab.raw:
        return {"skipped": f"lab {instance} is not up with its card (lab.up, deploy)"}
    pin = (lab.state_dir / "card" / "pin").read_bytes().strip()
    raw_s = signer_s = door_s = 0.0
    for _ in range(rounds):
        raw_s += _raw(lab, pin, per_round)
        signer_s += _signer(lab, per_round)
        # the same door (SSH, gateway, daemon) to the host's own token: what the card adds
        door_s += _signer(lab, per_round, SOFTHSM_PROFILE)
    n = rounds * per_round
    raw_rate, signer_rate, door_rate = n / raw_s, n / signer_s, n / door_s
    return {"signatures_each": n,
            "raw_pkcs11_tool_per_s": round(raw_rate, 3),
            "signer_from_build_per_s": round(signer_rate, 3),
            "signer_softhsm_from_build_per_s": round(door_rate, 3),
            "signer_over_raw": round(signer_rate / raw_rate, 3),
            "card_seconds_per_signature_through_signer": round((signer_s - door_s) / n, 2)}
