"""Running the lab VM under QEMU: start (KVM, falling back to TCG), wait for SSH, stop.

Acceleration: KVM is tried when /dev/kvm is usable. On some machines a stock Debian
guest kernel hangs under KVM without an error, so "QEMU started" proves nothing; the only
honest test is "the guest answers SSH within a bound". If it does not, QEMU is stopped and
the guest is booted again under TCG (software emulation), and the verdict is remembered
for this host kernel + QEMU version so the next `lab.up` does not pay the bound again.
``SIGNLAB_ACCEL=kvm|tcg`` forces one; ``SIGNLAB_CPU`` the CPU model under TCG (TCG_CPU).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path

from lab.config import Instance
from lab.state import CACHE_ROOT

KVM_BOUND_S = 45.0  # a KVM guest that works answers SSH in ~10 s
TCG_BOUND_S = 420.0  # TCG: ~15 s when idle, much more with other guests on 2 cores
MEMORY_MB = 2048


class VMError(RuntimeError):
    pass


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def _verdict_file() -> Path:
    return CACHE_ROOT / "accel.json"


def _verdict_key() -> str:
    return f"{platform.release()}|{qemu_version()}"


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def accel_candidates() -> list[str]:
    forced = os.environ.get("SIGNLAB_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise VMError(f"SIGNLAB_ACCEL must be kvm or tcg, not {forced!r}")
        return [forced]
    if not kvm_usable():
        return ["tcg"]
    try:
        verdicts = json.loads(_verdict_file().read_text())
    except (OSError, ValueError):
        verdicts = {}
    if verdicts.get(_verdict_key()) == "kvm-hangs":
        return ["tcg"]
    return ["kvm", "tcg"]


def remember_kvm_hangs() -> None:
    try:
        verdicts = json.loads(_verdict_file().read_text())
    except (OSError, ValueError):
        verdicts = {}
    verdicts[_verdict_key()] = "kvm-hangs"
    _verdict_file().parent.mkdir(parents=True, exist_ok=True)
    _verdict_file().write_text(json.dumps(verdicts, indent=1) + "\n")


# Under TCG, QEMU's `max` CPU offers AVX and AVX2, which it emulates far more slowly than the
# SSE code paths: glibc and OpenSSL pick their AVX2 string, memory and hash routines when the
# CPU offers them, and the whole guest pays. Measured with qemu-user (QEMU 7.2) on a Python
# workload of hashing, compression, JSON and string searches: `max` 16.2-16.7 s, `max` without
# AVX/AVX2 4.0 s, `qemu64` 3.5-3.7 s. Everything else of `max` stays (NX, SMEP/SMAP, RDRAND):
# only the vector extensions go. KVM runs the host's CPU as it is.
TCG_CPU = "max,-avx,-avx2"


def tcg_cpu() -> str:
    """The CPU model QEMU emulates under TCG (``SIGNLAB_CPU`` overrides it, for measurements)."""
    return os.environ.get("SIGNLAB_CPU") or TCG_CPU


def command(inst: Instance, image: dict[str, Path], accel: str) -> list[str]:
    fw = {
        "authorized_keys": inst.keys_dir / "admin.pub",
        "lab-network": inst.path("lab-network"),
        "host_key": inst.keys_dir / "ssh_host_ed25519_key",
    }
    cmd = [
        "qemu-system-x86_64",
        "-name", f"{inst.vm_name},process={inst.vm_name}",
        "-machine", "q35",
        "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
        "-cpu", "host" if accel == "kvm" else tcg_cpu(),
        "-smp", "2",
        "-m", str(MEMORY_MB),
        "-kernel", str(image["kernel"]),
        "-initrd", str(image["initrd"]),
        "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1",
        "-nodefaults",
        "-drive", f"file={inst.overlay},if=virtio,format=qcow2,discard=unmap",
        # NIC 1: user-mode networking. The admin SSH port is forwarded on loopback only.
        "-netdev", f"user,id=admin,net=10.0.2.0/24,"
                   f"hostfwd=tcp:127.0.0.1:{inst.ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=admin,mac={inst.mac(0)},addr=0x3",
        # NIC 2: the tap on the lab bridge.
        "-netdev", f"tap,id=lab,ifname={inst.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=lab,mac={inst.mac(1)},addr=0x4",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-pci,rng=rng0",
        # USB controller for hot-plugged sticks (lab.usb).
        "-device", "qemu-xhci,id=xhci",
        # The token's reader on a UHCI controller of its own: QEMU's usb-ccid ends a reply of a
        # multiple of 64 bytes with a zero-length packet, which a controller that moves one
        # packet at a time (UHCI, as a real full-speed reader's port) takes as the end of that
        # reply; xHCI hands over the whole reply at once and libccid then reads the stray empty
        # packet as the next reply ("CCID_Receive() Not enough data received: 0 bytes").
        "-device", "piix3-usb-uhci,id=uhci",
        "-monitor", f"unix:{inst.monitor},server,nowait",
        "-serial", f"file:{inst.console_log}",
        "-display", "none",
        "-daemonize",
        "-pidfile", str(inst.pidfile),
    ]
    for name, path in fw.items():
        cmd += ["-fw_cfg", f"name=opt/signlab/{name},file={path}"]
    return cmd


def read_pid(inst: Instance) -> int | None:
    try:
        return int(inst.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def is_ours(pid: int, inst: Instance) -> bool:
    """True when pid is a live QEMU of this instance (checked by its -name marker)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.startswith(inst.vm_name.encode() + b",") for arg in cmdline)


def running_pid(inst: Instance) -> int | None:
    pid = read_pid(inst)
    return pid if pid is not None and is_ours(pid, inst) else None


def stop(inst: Instance, timeout: float = 15) -> bool:
    """Stop our QEMU (by its pid, after checking it is ours). Returns True if one ran."""
    pid = running_pid(inst)
    if pid is None:
        inst.pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_ours(pid, inst):
        time.sleep(0.2)
    if is_ours(pid, inst):
        os.kill(pid, signal.SIGKILL)
        while is_ours(pid, inst):
            time.sleep(0.1)
    inst.pidfile.unlink(missing_ok=True)
    return True


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ssh_banner(port: int, timeout: float = 5) -> bool:
    """True once the guest's sshd answers (slirp accepts at once even with no guest)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _console_tail(inst: Instance) -> str:
    try:
        lines = inst.console_log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln.strip() for ln in lines if ln.strip()]
    return lines[-1][:100] if lines else ""


def boot(inst: Instance, image: dict[str, Path], accel: str, bound: float) -> bool:
    """Start QEMU and wait for the SSH banner. False when the guest did not come up."""
    inst.console_log.unlink(missing_ok=True)
    proc = subprocess.run(command(inst, image, accel), capture_output=True, text=True)
    if proc.returncode != 0:
        raise VMError(f"qemu failed to start ({accel}): {proc.stderr.strip()}")
    started = time.monotonic()
    last_report = 0.0
    while time.monotonic() - started < bound:
        if running_pid(inst) is None:
            raise VMError(f"qemu exited during boot; console: {inst.console_log}")
        if ssh_banner(inst.ssh_port):
            print(f"  - guest answers SSH after {time.monotonic() - started:.0f}s ({accel})",
                  flush=True)
            return True
        elapsed = time.monotonic() - started
        if elapsed - last_report >= 10:
            last_report = elapsed
            print(f"    ... booting ({accel}) {elapsed:.0f}s  {_console_tail(inst)}", flush=True)
        time.sleep(1)
    return False


def wait_login(inst: Instance, timeout: float = 120) -> None:
    """The admin key logs in (guest init has installed it; sshd may still be starting)."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        proc = subprocess.run(
            ["ssh", "-F", str(inst.ssh_config), "-o", "ControlMaster=no", "-o",
             "ControlPath=none", "signhost", "true"],
            capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return
        last = proc.stderr.strip()
        time.sleep(2)
    raise VMError(f"admin SSH login failed for {timeout:.0f}s: {last}")


def start(inst: Instance, image: dict[str, Path]) -> str:
    """Boot with the best accelerator that works; returns the one used."""
    candidates = accel_candidates()
    for accel in candidates:
        bound = KVM_BOUND_S if accel == "kvm" and len(candidates) > 1 else TCG_BOUND_S
        print(f"  - booting the VM with {accel.upper()} (bound {bound:.0f}s)", flush=True)
        try:
            if boot(inst, image, accel, bound):
                return accel
            why = f"the guest did not answer under KVM within {bound:.0f}s"
        except VMError as e:
            if accel != "kvm" or len(candidates) == 1:
                raise
            why = f"QEMU could not run the guest under KVM ({str(e).splitlines()[0]})"
        stop(inst)
        if accel == "kvm" and len(candidates) > 1:
            print(f"  ! {why}: falling back to software emulation (TCG); "
                  "remembered for next time", flush=True)
            remember_kvm_hangs()
            continue
    raise VMError(f"the guest did not come up ({', '.join(candidates)}); "
                  f"console log: {inst.console_log}")
