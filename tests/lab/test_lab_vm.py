"""The lab itself: the VM, its two networks and USB hot-plug, as the other tests use them."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from typing import TYPE_CHECKING

import pytest

from lab.config import USB_DEVICES, Instance
from lab.state import LabState

if TYPE_CHECKING:
    from tests.lab.conftest import AdminSsh, WaitFor

pytestmark = pytest.mark.lab


def _usb_ids(admin_ssh: AdminSsh) -> set[str]:
    out = admin_ssh("for d in /sys/bus/usb/devices/*/idVendor; do p=${d%/idVendor}; "
                    "echo $(cat $p/idVendor):$(cat $p/idProduct); done").stdout
    return {ln.strip() for ln in out.splitlines() if ":" in ln}


def test_admin_ssh_with_pinned_host_key(lab: LabState, admin_ssh: AdminSsh) -> None:
    """The admin key logs in and the host key matches the one made for this lab."""
    r = admin_ssh("hostname", check=True, new_login=True)
    assert r.stdout.strip() == "signhost"
    known = (lab.state_dir / "known_hosts").read_text()
    pub = (lab.key("ssh_host_ed25519_key").with_suffix(".pub")).read_text().split()[1]
    assert pub in known


def test_vm_has_its_lab_address(lab: LabState, admin_ssh: AdminSsh) -> None:
    out = admin_ssh("ip -o addr show").stdout
    assert f" {lab.vm_ipv4}/24 " in out
    assert f" {ipaddress.ip_address(lab.vm_ipv6)}/64 " in out


def test_build_host_reaches_vm_ssh_over_the_lab_segment(lab: LabState) -> None:
    """The build namespace talks to the VM's second NIC (the segment the firewall guards)."""
    r = lab.netns_run("build", ["bash", "-c",
                                f"exec 3<>/dev/tcp/{lab.vm_ipv4}/22; head -c 8 <&3"], timeout=30)
    assert r.stdout.startswith(b"SSH-2.0"), r.stderr


def test_lab_network_is_closed(lab: LabState) -> None:
    """Namespaces have no default route, and the controller's bridge carries no address."""
    for host in ("build", "intruder"):
        routes = lab.netns_run(host, ["ip", "route", "show", "default"], check=True).stdout
        assert routes.strip() == b"", f"{host} has a default route: {routes!r}"
        routes6 = lab.netns_run(host, ["ip", "-6", "route", "show", "default"], check=True).stdout
        assert routes6.strip() == b""
    bridge = lab.raw["net"]["bridge"]
    addrs = json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", bridge],
                                      capture_output=True, check=True, text=True).stdout)
    assert addrs and addrs[0]["addr_info"] == []


@pytest.mark.parametrize("device", ["token", "storage"])
def test_usb_hot_plug_is_seen_by_the_guest(lab: LabState, admin_ssh: AdminSsh, wait_for: WaitFor,
                                           device: str) -> None:
    """Plugging and unplugging through the QEMU monitor, while the VM runs, makes the device
    appear in and leave the guest's sysfs. The token (in its reader from lab.up on) is taken
    out first and left in at the end, as it was found."""
    from lab import usb

    inst = Instance(lab.raw["instance"], lab.state_dir)
    spec = USB_DEVICES[device]
    want = f"{spec['vendor']}:{spec['product']}"
    was_in = device in usb.plugged(inst)
    try:
        usb.unplug(inst, device)
        assert wait_for(lambda: want not in _usb_ids(admin_ssh), 60), f"{want} still there"
        usb.plug(inst, device)
        assert wait_for(lambda: want in _usb_ids(admin_ssh), 60), f"{want} never appeared"
    finally:
        if not was_in:
            usb.unplug(inst, device)
        else:
            usb.plug(inst, device)
    if not was_in:
        assert wait_for(lambda: want not in _usb_ids(admin_ssh), 60), f"{want} still there"


def test_intruder_sees_the_same_segment(lab: LabState) -> None:
    """The intruder is on the VM's own L2 segment (it resolves the VM's MAC), whatever the
    VM's firewall does with its packets: the attack tests start from a real neighbour."""
    lab.netns_run("intruder", ["bash", "-c", f"timeout 3 bash -c '</dev/tcp/{lab.vm_ipv4}/22'"],
                  timeout=20)
    inst = Instance(lab.raw["instance"], lab.state_dir)
    neigh = lab.netns_run("intruder", ["ip", "neigh", "show", lab.vm_ipv4], check=True).stdout
    assert inst.mac(1).encode() in neigh.lower(), neigh
