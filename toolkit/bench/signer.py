"""Signer figures for `invoke bench`: throughput through the daemon against the raw token,
hashing through the gateway against `sha256sum`, and Authenticode signing of a 100 MiB PE and
of a 30 MiB MSI through the host (`signer submit`) against `osslsigncode sign` with the same
token key through a local PKCS#11 module (the "key on the build server" baseline), side by
side in one run on the same SoftHSM2 token and the same file. Ratios, no asserts: the note on
the issue compares them with the targets (1,000 P-256 signatures/s through the daemon; RSA-3072
and hashing at 0.9 of raw; under 100 MiB peak for a 1 GiB artifact).

Every daemon request here is a full protocol exchange on a fresh Unix socket connection, with
the audit entry fsynced before the answer; the client side runs in this process (the gateway's
own protocol code) so that the figure is the daemon's, not Python's start-up time, which is
reported separately ("per SSH connection"). The client shares the machine's cores with the
daemon and the token: its CPU time per request is reported beside the rates.

The denominator, "raw": one process signing in a loop with python-pkcs11. That is the most a
daemon can get from the token: python-pkcs11 initialises the module with C_Initialize(NULL),
which promises it no concurrent calls, so one process signs one signature at a time whatever
its sessions (SoftHSM2 fails two at once). Two processes (each its own library instance) can
sign at once on two cores; that figure is reported too, as the token's capacity on this
machine, not as what one daemon could reach.

`token_process_busy_8_clients`: per round, the share of the 8-client time that the daemon's
token process (signer/tokenproc.py) spent on the CPU. 1.0 means the token never waited for a
request; what then separates the daemon from raw is the CPU the token process gets beside the
daemon and the clients on the same cores, not the daemon's design.

`before`: a checkout of an earlier version (`git worktree add /tmp/before main`). Its daemon
runs beside this one on the same token, each with its own config, log and socket, and their
figures are measured alternately in the same run, raw before and after each algorithm's round.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from toolkit.local_signer import (
    SOFTHSM_MODULE,
    Lab,
    available,
    forced_command,
    sign_over_socket,
    write_msi,
    write_pe,
)

GiB = 1 << 30
MiB = 1 << 20
PKCS11_ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")  # libengine-pkcs11-openssl
SECONDS = 3.0


def _rate(fn: Any, seconds: float, threads: int = 1) -> float:
    """Calls of fn per second over `seconds`, with `threads` callers."""
    count = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            fn()
            count[i] += 1

    started = time.monotonic()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(count) / (time.monotonic() - started)


def _raw_token_rate(lab: Lab, label: str, algorithm: str, seconds: float) -> float:
    """python-pkcs11 sign loop on the same key, in a child process (the library is a
    per-process singleton and needs the lab's SOFTHSM2_CONF)."""
    out = subprocess.run([sys.executable, "-c", _raw_code(lab, label, algorithm, seconds)],
                         env=lab.env, capture_output=True, text=True, check=True).stdout
    return float(out.strip())


def _raw_code(lab: Lab, label: str, algorithm: str, seconds: float, wait: bool = False
              ) -> str:
    """The raw loop; with `wait`, it says "ready" once the key is found and starts on a line
    of stdin (processes that open the token at the same moment can fail in SoftHSM2)."""
    return f"""
import sys, time, pkcs11
from pkcs11 import ObjectClass
from signer.algorithms import BY_NAME
alg = BY_NAME[{algorithm!r}]
lib = pkcs11.lib({str(SOFTHSM_MODULE)!r})
tok = lib.get_token(token_label="signer")
with tok.open(user_pin=open({str(lab.pin_file)!r}).read().strip()) as s:
    key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label={label!r})
    mech, param = alg.mechanism
    data = alg.token_input(b"\\x11" * 32)
    if {wait!r}:
        print("ready", flush=True)
        sys.stdin.readline()
    n, stop = 0, time.monotonic() + {seconds}
    start = time.monotonic()
    while time.monotonic() < stop:
        key.sign(data, mechanism=mech, mechanism_param=param)
        n += 1
    print(n / (time.monotonic() - start))
"""


def _gateway_hash(lab: Lab, config: Path, artifact: Path) -> tuple[float, int, int]:
    """(seconds, exit code, gateway peak RSS in KiB) for one artifact through the gateway."""
    env = {**lab.env, "SSH_ORIGINAL_COMMAND":
           f"sign --profile ec --format raw --size {artifact.stat().st_size}"}
    with artifact.open("rb") as f:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "signer", "gateway", "--client",
                                 "build1", "--config", str(config)], stdin=f,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, proc.returncode, usage.ru_maxrss


def _sha256sum(artifact: Path) -> float:
    start = time.monotonic()
    subprocess.run(["sha256sum", str(artifact)], check=True, capture_output=True)
    return time.monotonic() - start


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _raw_parallel_rate(lab: Lab, label: str, algorithm: str, seconds: float,
                       processes: int = 2) -> float:
    """The raw loop in `processes` processes at once (each opens the token in turn, then all
    start together): their rates added up."""
    code = _raw_code(lab, label, algorithm, seconds, wait=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(processes):
            proc = subprocess.Popen([sys.executable, "-c", code], env=lab.env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("raw signing loop did not start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        rates = [float(p.communicate()[0].strip()) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError("raw signing loop failed")
    return sum(rates)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _token_process(daemon_pid: int) -> int | None:
    """The daemon's token process (signer/tokenproc.py), if it has one: its only child."""
    kids = [int(c) for task in Path(f"/proc/{daemon_pid}/task").iterdir()
            for c in (task / "children").read_text().split()]
    return kids[0] if len(kids) == 1 else None


def _daemon_rates(sock: Path, profile: str, seconds: float, token_pid: int | None = None
                  ) -> tuple[float, float, float, float | None]:
    """(1 client/s, 8 clients/s, this process's CPU ms per request with 8 clients, the share
    of the 8-client time the token process spent on the CPU, when it has one: 1.0 is a token
    that never waited for work)."""
    def one() -> None:
        code, message, _sig = sign_over_socket(sock, profile, b"artifact", fmt="raw")
        if code != 0:
            raise RuntimeError(message)

    d1 = _rate(one, seconds, 1)
    cpu = time.process_time()
    token_cpu = _cpu_seconds(token_pid) if token_pid else 0.0
    started = time.monotonic()
    d8 = _rate(one, seconds, 8)
    wall = time.monotonic() - started
    busy = (_cpu_seconds(token_pid) - token_cpu) / wall if token_pid else None
    return d1, d8, 1000 * (time.process_time() - cpu) / max(d8 * wall, 1), busy


def throughput(lab: Lab, configs: dict[str, Path], seconds: float,
               rounds: int = 1) -> dict[str, Any]:
    """Signatures/s through each daemon of `configs` ("this", and "before" when given) and
    the raw token, per algorithm, in `rounds` rounds of raw then each daemon, and raw once
    more at the end: each figure is the mean over the rounds, each ratio over the mean raw
    (a machine whose load changes during the run moves both alike)."""
    out: dict[str, Any] = {}
    for name, label, algorithm in (("ecdsa_p256", "ec", "ecdsa-p256"),
                                   ("rsa3072", "rsa", "rsa3072-pkcs1")):
        raws: list[float] = []
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in configs}
        busy: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(rounds):
            raws.append(_raw_token_rate(lab, label, algorithm, seconds))
            for who, config in configs.items():
                token = _token_process(lab.daemons[config].pid)
                d1, d8, cpu, b = _daemon_rates(Lab.socket_of(config), label, seconds, token)
                got[who].append((d1, d8, cpu))
                if b is not None:
                    busy[who].append(round(b, 3))
        raws.append(_raw_token_rate(lab, label, algorithm, seconds))
        raw = sum(raws) / len(raws)
        fig: dict[str, Any] = {
            "raw_pkcs11_per_s": round(raw, 1),
            "raw_pkcs11_spread": [round(r, 1) for r in raws],
            "raw_pkcs11_2_processes_per_s": round(
                _raw_parallel_rate(lab, label, algorithm, seconds), 1),
        }
        for who, samples in got.items():
            prefix = "" if who == "this" else f"{who}_"
            d1, d8, cpu = (sum(x) / len(x) for x in zip(*samples, strict=True))
            fig.update({
                f"{prefix}daemon_1_client_per_s": round(d1, 1),
                f"{prefix}daemon_8_clients_per_s": round(d8, 1),
                f"{prefix}ratio_1_client": round(d1 / raw, 3),
                f"{prefix}ratio_8_clients": round(d8 / raw, 3),
                f"{prefix}bench_client_cpu_ms_per_request_8_clients": round(cpu, 3),
            })
            if busy[who]:
                fig[f"{prefix}token_process_busy_8_clients"] = busy[who]
        out[name] = fig
    return out


def run(seconds: float = SECONDS, artifact_size: int = GiB,
        before: Path | None = None) -> dict[str, Any]:
    why = available()
    if why:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench-signer-") as tmp:
        return _run(Path(tmp), seconds, artifact_size, before)


def _commit_of(checkout: Path) -> str:
    r = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip()[:100] if r.returncode == 0 else "unknown"


def _run(root: Path, seconds: float, artifact_size: int,
         before: Path | None = None) -> dict[str, Any]:
    lab = Lab(root)
    lab.init_token()
    big = artifact_size + (1 << 20)
    profiles = {
        "ec": {"key": "pkcs11:object=ec", "algorithm": "ecdsa-p256", "formats": ["raw"],
               "max_size": big, "clients": ["build1"], "budget_count": 10**9,
               "budget_window": 3600},
        "rsa": {"key": "pkcs11:object=rsa", "algorithm": "rsa3072-pkcs1", "formats": ["raw"],
                "max_size": big, "clients": ["build1"], "budget_count": 10**9,
                "budget_window": 3600},
        "win": {"key": "pkcs11:object=rsa", "algorithm": "rsa3072-pkcs1",
                "cert": str(lab.certs / "win.pem"), "formats": ["authenticode"],
                "max_size": big, "clients": ["build1"], "budget_count": 10**9,
                "budget_window": 3600},
    }
    config = lab.config("bench", profiles, ["build1"], [], checkpoint_interval=1000)
    for args in (["--profile", "ec"], ["--profile", "rsa"], ["--audit"]):
        lab.signer("keys", "generate", "--config", config, *args).check_returncode()
    lab.signer("keys", "selfsign", "--config", config, "--profile", "win").check_returncode()
    out: dict[str, Any] = {"seconds_per_figure": seconds, "audit_fsync": True,
                           "this_checkout": _commit_of(Path(__file__).resolve().parents[2])}
    configs = {"this": config}
    lab.start(config)
    try:
        if before is not None:
            configs["before"] = lab.config("before", profiles, ["build1"], [],
                                           checkpoint_interval=1000)
            out["before_checkout"] = f"{before}: {_commit_of(before)}"
            try:
                lab.start(configs["before"], cwd=before)
            except RuntimeError as exc:
                out["before_checkout"] += f" (its daemon did not start: {exc})"
                del configs["before"]
        out.update(throughput(lab, configs, seconds, rounds=3 if before else 1))

        def via_gateway() -> None:
            r = lab.gateway(config, "sign --profile ec --format raw", b"artifact")
            if r.returncode != 0:
                raise RuntimeError(r.stderr)

        out["ecdsa_p256"]["per_ssh_connection_gateway_process_per_s"] = round(
            _rate(via_gateway, seconds, 1), 1)
        out["gateway_start"] = gateway_start_figures(lab, config, seconds)

        artifact = root / "artifact.bin"
        block = os.urandom(1 << 20)
        with artifact.open("wb") as f:
            for _ in range(artifact_size >> 20):
                f.write(block)
        _sha256sum(artifact)  # page cache warm for both
        ref = _sha256sum(artifact)
        elapsed, code, gw_peak = _gateway_hash(lab, config, artifact)
        daemon_peak = _peak_kib(lab.daemons[config].pid)
        out["hashing"] = {
            "artifact_bytes": artifact_size,
            "sha256sum_MiB_per_s": round(artifact_size / ref / (1 << 20), 1),
            "gateway_daemon_MiB_per_s": round(artifact_size / elapsed / (1 << 20), 1),
            "ratio": round(ref / elapsed, 3),
            "exit_code": code,
            "daemon_peak_rss_MiB": round(daemon_peak / 1024, 1),
            "gateway_peak_rss_MiB": round(gw_peak / 1024, 1),
        }
        artifact.unlink()  # a GiB of /tmp, not needed below
        out["authenticode_100MiB_pe"] = authenticode_figures(lab, config, root)
        out["authenticode_msi"] = msi_figures(lab, config, root)
    finally:
        lab.stop()
    return out


def gateway_start_figures(lab: Lab, config: Path, seconds: float) -> dict[str, Any]:
    """One P-256 signature per new gateway process, as every SSH request starts one: the
    forced command the role writes (`python -c FORCED_COMMAND_CODE ... --socket`, the lean
    import path) against the form it wrote before (`signer gateway ... --config`, through the
    CLI module, which reads the config; here `-m signer`), alternating in the same run. Both
    include the signature itself (about 1 ms through the daemon); the difference is start-up.
    Both run with -S: a checkout's editable install hooks a finder into site that imports
    pathlib and more, which a host's wheel-installed venv does not have."""
    env = {k: v for k, v in lab.env.items() if k != "SOFTHSM2_CONF"}
    env["SSH_ORIGINAL_COMMAND"] = "sign --profile ec --format raw --size 8"  # b"artifact"
    forms = {
        "forced_command": forced_command(["--client", "build1"], Lab.socket_of(config), "-S"),
        "cli_with_config": [sys.executable, "-S", "-m", "signer", "gateway", "--client",
                            "build1", "--config", str(config)],
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    stop = time.monotonic() + 2 * seconds
    while time.monotonic() < stop or not all(times.values()):
        for name, argv in forms.items():
            started = time.perf_counter()
            r = subprocess.run(argv, input=b"artifact", capture_output=True, env=env,
                               check=False)
            times[name].append(time.perf_counter() - started)
            if r.returncode != 0:
                raise RuntimeError(f"{name}: {r.stderr.decode(errors='replace')}")
    out: dict[str, Any] = {}
    for name, samples in times.items():
        samples.sort()
        out[f"{name}_median_ms"] = round(1000 * samples[len(samples) // 2], 1)
        out[f"{name}_per_s"] = round(len(samples) / sum(samples), 1)
    out["ratio_forced_command_to_cli"] = round(out["forced_command_median_ms"]
                                               / out["cli_with_config_median_ms"], 3)
    out["runs_each"] = len(times["forced_command"])
    return out


def authenticode_figures(lab: Lab, config: Path, root: Path, size: int = 100 * MiB
                         ) -> dict[str, Any]:
    """One 100 MiB PE signed twice with the same token key (see _sign_both)."""
    if shutil.which("osslsigncode") is None:
        return {"skipped": "osslsigncode not installed"}
    return _sign_both(lab, config, root, write_pe(root / "big.exe", size))


def msi_figures(lab: Lab, config: Path, root: Path, size: int = 30 * MiB) -> dict[str, Any]:
    """An installer of a realistic size (wixl: one application of `size` bytes, a readme)
    signed twice with the same token key (see _sign_both). The MSI is hashed stream by
    stream where a PE is hashed in one pass: the figure says whether that changes what
    going through the host costs."""
    if shutil.which("osslsigncode") is None or shutil.which("wixl") is None:
        return {"skipped": "osslsigncode or wixl not installed"}
    app = write_pe(root / "app.exe", size).read_bytes()
    msi = write_msi(root / "big.msi", {"app.exe": app, "readme.txt": b"bench\r\n"},
                    name="Bench App")
    (root / "app.exe").unlink()
    return _sign_both(lab, config, root, msi)


def _sign_both(lab: Lab, config: Path, root: Path, artifact: Path) -> dict[str, Any]:
    """`artifact` signed twice with the same token key: through the host (extract-data, ssh
    round trip through the gateway, daemon, attach-signature) and by osslsigncode alone with
    the key through PKCS#11 on this machine. The ratio is what keeping the key off the build
    server costs; the bytes are what travels per signature (the request out, the PKCS#7 back).
    Where the time goes on the build server: `extract-data` and `attach-signature` timed on
    their own after the round trip (each reads the whole file once more). Both results must
    pass `osslsigncode verify` against the profile's certificate, or the figure says so."""
    cert = lab.certs / "win.pem"
    ssh = root / "fake-ssh"  # runs the gateway as the forced command would, without sshd
    ssh.write_text(f"#!{sys.executable}\nimport os, sys\n"
                   "os.environ['SSH_ORIGINAL_COMMAND'] = sys.argv[2]\n"
                   f"os.execv(sys.executable, [sys.executable, '-m', 'signer', 'gateway', "
                   f"'--client', 'build1', '--config', {str(config)!r}])\n")
    ssh.chmod(0o700)
    via_host_out = root / f"via-host{artifact.suffix}"
    _sha256sum(artifact)  # in the page cache for both
    started = time.monotonic()
    r = lab.signer("submit", "--host", "build1@signer", "--profile", "win", "--format",
                   "authenticode", "--cafile", cert, "--ssh", ssh, "--out", via_host_out,
                   artifact, timeout=600)
    via_host = time.monotonic() - started
    if r.returncode != 0:
        return {"failed": r.stderr.decode(errors="replace").strip()}
    entry = _last_sign(config)
    signature, request = root / "signature.p7", root / "request.der"
    extract_s = _osslsigncode_s("extract-data", "-h", "sha256", "-in", artifact, "-out",
                                request)
    _osslsigncode_s("extract-signature", "-in", via_host_out, "-out", signature)
    attach_s = _osslsigncode_s("attach-signature", "-sigin", signature, "-CAfile", cert,
                               "-in", artifact, "-out", root / f"attached{artifact.suffix}")
    out: dict[str, Any] = {
        f"{artifact.suffix.lstrip('.')}_bytes": artifact.stat().st_size,
        "via_host_s": round(via_host, 2),
        "of_which_extract_data_s": round(extract_s, 2),
        "of_which_attach_signature_s": round(attach_s, 2),
        "bytes_sent_to_host": entry.get("size"),
        "bytes_returned": signature.stat().st_size,
        "via_host_verifies": _verifies(via_host_out, cert),
    }
    for f in (signature, request, root / f"attached{artifact.suffix}"):
        f.unlink()
    if not PKCS11_ENGINE.exists():
        out["local_pkcs11"] = f"skipped: {PKCS11_ENGINE} missing (libengine-pkcs11-openssl)"
        return out
    local_out = root / f"local{artifact.suffix}"
    started = time.monotonic()
    local = subprocess.run(
        ["osslsigncode", "sign", "-pkcs11engine", str(PKCS11_ENGINE), "-pkcs11module",
         str(SOFTHSM_MODULE), "-certs", str(cert), "-key",
         "pkcs11:token=signer;object=rsa;type=private", "-readpass", str(lab.pin_file),
         "-h", "sha256", "-in", str(artifact), "-out", str(local_out)],
        env=lab.env, capture_output=True, text=True, check=False)
    local_s = time.monotonic() - started
    if local.returncode != 0:
        out["local_pkcs11"] = f"failed: {local.stderr.strip().splitlines()[-1:]}"
        return out
    out["local_osslsigncode_pkcs11_s"] = round(local_s, 2)
    out["local_verifies"] = _verifies(local_out, cert)
    out["ratio_via_host_over_local"] = round(via_host / local_s, 2)
    for f in (via_host_out, local_out, artifact):
        f.unlink()
    return out


def _osslsigncode_s(*args: str | Path) -> float:
    started = time.monotonic()
    subprocess.run(["osslsigncode", *map(str, args)], capture_output=True, check=True)
    return time.monotonic() - started


def _verifies(signed: Path, cert: Path) -> bool:
    r = subprocess.run(["osslsigncode", "verify", "-CAfile", str(cert), "-in", str(signed)],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0


def _last_sign(config: Path) -> dict[str, Any]:
    import json

    lines = (config.parent / "audit.jsonl").read_text().splitlines()
    signs = [e for e in map(json.loads, lines) if e.get("event") == "sign"]
    return signs[-1] if signs else {}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
