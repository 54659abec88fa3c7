"""The lab from scratch and back to nothing, on its own instance (lab2: none of CI's, whose
VMs are lab9, lab6 and lab5 and whose unit tests make lab7 and lab8, whichever half of the lab
tests this module is in), so the pipeline's lab is not disturbed: up, admin SSH, the build host reaches the VM, a USB stick appears in
the guest, then down leaves no process, namespace, link or state behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from lab import collector, lifecycle, net, usb, vm
from lab.config import Instance

pytestmark = [pytest.mark.lab, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LIFECYCLE_INSTANCE = "lab2"


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
def test_lab_up_from_scratch_and_down_leaves_nothing(tmp_path: Path) -> None:
    inst = Instance(LIFECYCLE_INSTANCE, tmp_path / LIFECYCLE_INSTANCE)
    lifecycle.down(inst)
    assert lifecycle.up(inst) is True
    try:
        assert lifecycle.up(inst) is False  # already up: says so, does nothing
        ssh = ["ssh", "-F", str(inst.ssh_config), "signhost"]
        r = subprocess.run([*ssh, "id -un"], capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "admin", r.stderr
        r2 = subprocess.run(["ip", "netns", "exec", inst.netns("build"), "bash", "-c",
                             f"exec 3<>/dev/tcp/{inst.ipv4('vm')}/22; head -c 7 <&3"],
                            capture_output=True, timeout=30)
        assert r2.stdout == b"SSH-2.0"
        usb.plug(inst, "storage")
        deadline, seen = time.monotonic() + 60, ""
        while time.monotonic() < deadline and "46f4:0001" not in seen:
            seen = subprocess.run(
                [*ssh, "for d in /sys/bus/usb/devices/*/idVendor; do p=${d%/idVendor}; "
                       "echo $(cat $p/idVendor):$(cat $p/idProduct); done"],
                capture_output=True, text=True, timeout=60).stdout
            time.sleep(2)
        assert "46f4:0001" in seen
        pid = vm.running_pid(inst)
        assert pid is not None
        collector_pid = collector.running_pid(inst)  # the log collector's rsyslogd
        assert collector_pid is not None
    finally:
        lifecycle.down(inst)
    assert not vm.is_ours(pid, inst)  # gone (at most a zombie waiting for init)
    assert str(collector.config_path(inst)).encode() not in _cmdline(collector_pid)
    assert net.leftovers(inst) == []
    assert not inst.state_dir.exists()
    assert vm.port_free(inst.ssh_port)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
