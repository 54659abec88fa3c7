"""Bringing a lab instance up and down, safely and completely.

`up` is all-or-nothing: if any step fails, what it created (QEMU, taps, namespaces,
lab.json) is removed again and the error says where to look. `down` removes everything
the instance created on the machine, including what a crashed run left behind; it never
touches anything whose name does not carry the instance prefix, and it ends only the
QEMU whose pid file and -name marker are ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab import card, collector, image, net, site, usb, vm
from lab.ca import LabCA
from lab.config import KEY_NAMES, Instance, guest_network_config, ssh_config_text
from lab.state import instance_name, state_dir

REQUIRED_BINARIES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsyslogd": "rsyslog",  # the log collector, with rsyslog-relp (lab/collector.py)
    "certutil": "libnss3-tools",  # the lab card's NSS database (lab/card.py)
}
OVERLAY_MIN_FREE = 3 * 2**30


class LabError(RuntimeError):
    """A lab problem with a one-line explanation for the operator."""


def instance(name: str | None = None) -> Instance:
    name = name or instance_name()
    return Instance(name, state_dir(name if name != instance_name() else None))


def preflight(inst: Instance) -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, bridges, taps): run as root")
    missing = [f"{b} (package {p})" for b, p in REQUIRED_BINARIES.items()
               if shutil.which(b) is None]
    if missing:
        raise LabError("missing on this machine: " + ", ".join(missing)
                       + "; run scripts/bootstrap")
    inst.state_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(inst.state_dir.parent).free
    if free < OVERLAY_MIN_FREE:
        raise LabError(f"not enough disk in {inst.state_dir.parent}: {free / 2**30:.1f} GiB "
                       f"free, {OVERLAY_MIN_FREE / 2**30:.0f} GiB needed for the VM's overlay")
    if not vm.port_free(inst.ssh_port):
        raise LabError(f"port 127.0.0.1:{inst.ssh_port} (the {inst.name} admin SSH forward) "
                       "is already taken by another program; stop it or use another "
                       "SIGNLAB_INSTANCE")


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True)


def write_runtime_files(inst: Instance) -> None:
    """Keys and the lab CA (made here, at run time, never in the repo), known_hosts, ssh_config."""
    inst.state_dir.mkdir(parents=True, exist_ok=True)
    inst.state_dir.chmod(0o700)
    inst.keys_dir.mkdir(exist_ok=True)
    inst.keys_dir.chmod(0o700)
    for name in KEY_NAMES:
        _keygen(inst.keys_dir / name, f"signlab-{inst.name}-{name}")
    hostkey = inst.keys_dir / "ssh_host_ed25519_key"
    _keygen(hostkey, f"signhost-{inst.name}")
    pub = " ".join(Path(str(hostkey) + ".pub").read_text().split()[:2])
    names = [f"[127.0.0.1]:{inst.ssh_port}", inst.ipv4("vm"), inst.ipv6("vm")]
    inst.known_hosts.write_text("".join(f"{n} {pub}\n" for n in names))
    inst.ssh_config.write_text(ssh_config_text(inst))
    inst.path("lab-network").write_text(guest_network_config(inst))
    LabCA(inst.state_dir).ensure(inst.name)
    card.ensure(inst.state_dir)


def make_overlay(inst: Instance, base: Path) -> None:
    inst.overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(inst.overlay)], check=True)


def _close_ssh_master(inst: Instance) -> None:
    """Close our SSH connection masters (ours and Ansible's), so no ssh process outlives
    the lab."""
    if inst.ssh_config.exists():
        subprocess.run(["ssh", "-F", str(inst.ssh_config), "-O", "exit", "signhost"],
                       capture_output=True, timeout=10)
    cp = inst.path("cp")
    if cp.is_dir():
        for sock in cp.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "signhost"],
                           capture_output=True, timeout=10)


def cleanup_leftovers(inst: Instance) -> list[str]:
    """What a crashed run left: a dead pid file, links and namespaces of our prefix."""
    found = []
    if inst.pidfile.exists() and vm.running_pid(inst) is None:
        inst.pidfile.unlink()
        found.append(f"stale pid file {inst.pidfile}")
    if vm.running_pid(inst) is None:
        found += collector.down(inst)
        found += net.down(inst)
        if inst.lab_json.exists():
            inst.lab_json.unlink()
            found.append(f"stale {inst.lab_json}")
    return found


def is_up(inst: Instance) -> bool:
    return vm.running_pid(inst) is not None


def base_record(inst: Instance) -> Path:
    """Which base image the instance's overlay stands on (image.prune_old reads it too)."""
    return inst.path("base-image.json")


def recorded_base(inst: Instance) -> tuple[str, Path] | None:
    try:
        rec = json.loads(base_record(inst).read_text())
        return str(rec["release"]), Path(rec["image"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def up(inst: Instance, release: str | None = None) -> bool:
    """Bring the lab up on a release (default: $SIGNLAB_RELEASE or Debian 13). Returns False
    (and does nothing) when it is already up."""
    suite = image.release(release)
    if is_up(inst):
        running = recorded_base(inst)
        if running and running[0] != suite:
            raise LabError(f"lab {inst.name} is up on {running[0]}, not {suite}: "
                           f"`invoke lab.down --instance {inst.name}` first")
        print(f"lab {inst.name} is already up (qemu pid {vm.running_pid(inst)}); "
              "nothing to do (`invoke lab.status`, `invoke lab.down`)")
        return False
    started = time.monotonic()
    stale = cleanup_leftovers(inst)
    if stale:
        print("==> cleaned leftovers of an earlier run: " + ", ".join(stale))
    preflight(inst)
    base = image.build(suite)
    arts = image.artefacts(base)
    print(f"==> starting lab {inst.name} on Debian {image.RELEASES[suite]} ({suite}) "
          f"(state: {inst.state_dir})", flush=True)
    try:
        write_runtime_files(inst)
        base_record(inst).write_text(json.dumps({"release": suite, "image": str(base)}) + "\n")
        make_overlay(inst, arts["disk"])
        print(f"  - lab network {inst.subnet4} {inst.subnet6}: bridge {inst.bridge}, "
              f"hosts {inst.netns('build')} {inst.netns('intruder')}", flush=True)
        net.up(inst)
        print(f"  - log collector {inst.ipv4('collector')}: rsyslog, RELP over TLS "
              f"(lab CA in {collector.pki_dir(inst)})", flush=True)
        collector.up(inst)
        accel = vm.start(inst, arts)
        vm.wait_login(inst)
        pid = vm.running_pid(inst)
        assert pid is not None
        write_facts(inst, accel=accel, pid=pid)
        # The signing token is in its reader from the start, as on a real signing host: the
        # deploy finds the card's key there (lab/card.py).
        print(f"  - {usb.plug(inst, 'token')} with the lab card", flush=True)
    except BaseException as e:
        print(f"  ! lab.up failed: {e}", file=sys.stderr)
        tail = ""
        if inst.console_log.exists():
            tail = "\n".join(inst.console_log.read_text(errors="replace").splitlines()[-20:])
        vm.stop(inst)
        collector.down(inst)
        net.down(inst)
        inst.lab_json.unlink(missing_ok=True)
        if tail:
            print(f"  ! last console lines ({inst.console_log}):\n{tail}", file=sys.stderr)
        print("  ! everything lab.up created has been removed", file=sys.stderr)
        raise
    print(f"==> lab {inst.name} up in {time.monotonic() - started:.0f}s ({accel.upper()}): "
          f"ssh -F {inst.ssh_config} signhost", flush=True)
    return True


def write_facts(inst: Instance, *, accel: str, pid: int) -> None:
    facts = inst.facts(accel=accel, pid=pid)
    rec = recorded_base(inst)
    if rec:
        facts["release"] = {"suite": rec[0], "version": image.RELEASES.get(rec[0], "?"),
                            "image": str(rec[1])}
    inst.lab_json.write_text(json.dumps(facts, indent=2) + "\n")


def down(inst: Instance) -> list[str]:
    """Remove everything of the instance; returns what was removed."""
    removed = []
    _close_ssh_master(inst)
    removed += site.down(inst)
    removed += collector.down(inst)
    if vm.stop(inst):
        removed.append("qemu")
    removed += net.down(inst)
    if inst.state_dir.exists():
        shutil.rmtree(inst.state_dir)
        removed.append(f"state {inst.state_dir}")
    return removed


def reset(inst: Instance) -> None:
    """A fresh disk for the same lab (same keys, same network): the overlay is recreated."""
    if not is_up(inst):
        raise LabError(f"lab {inst.name} is not up: run `invoke lab.up`")
    rec = recorded_base(inst)
    if rec is None or not image.is_built(rec[1]):
        raise LabError(f"the base image of lab {inst.name} is missing "
                       f"({rec[1] if rec else 'not recorded'}): `invoke lab.down` and `lab.up`")
    arts = image.artefacts(rec[1])
    started = time.monotonic()
    _close_ssh_master(inst)
    vm.stop(inst)
    make_overlay(inst, arts["disk"])
    if collector.forget(inst, inst.ipv4("vm")):
        print("  - the collector's copy of the old disk's audit log dropped", flush=True)
    print(f"  - overlay reset in {time.monotonic() - started:.1f}s; rebooting", flush=True)
    try:
        accel = vm.start(inst, arts)
        vm.wait_login(inst)
    except BaseException:
        vm.stop(inst)
        net.down(inst)
        inst.lab_json.unlink(missing_ok=True)
        raise
    pid = vm.running_pid(inst)
    assert pid is not None
    write_facts(inst, accel=accel, pid=pid)
    usb.plug(inst, "token")  # a new QEMU: the token back in its reader, as at lab.up
    print(f"==> lab {inst.name} reset in {time.monotonic() - started:.0f}s")


def status(inst: Instance) -> dict[str, object]:
    pid = vm.running_pid(inst)
    facts: dict[str, Any] = {}
    if inst.lab_json.exists():
        facts = json.loads(inst.lab_json.read_text())
    return {
        "instance": inst.name,
        "up": pid is not None,
        "pid": pid,
        "ssh_answers": vm.ssh_banner(inst.ssh_port) if pid else False,
        "accel": facts.get("vm", {}).get("accel"),
        "state_dir": str(inst.state_dir),
        "ssh": f"ssh -F {inst.ssh_config} signhost" if pid else None,
        "leftovers": [] if pid else net.leftovers(inst) + (
            [f"jump sshd pid {site.jump_pid(inst)}"] if site.jump_pid(inst) else []) + (
            [f"collector rsyslogd pid {collector.running_pid(inst)}"]
            if collector.running_pid(inst) else []),
    }
