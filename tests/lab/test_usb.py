"""USB hot-plug against the hardened VM (USB-01, USB-02): the stick is refused, the token
stand-in is accepted, both decided by the inventory's allow-list; and a device that copies the
reader's vendor:product (and serial, where the inventory pins one) but brings a keyboard
interface is refused while the real reader stays in and allowed.

The look-alike is made inside the guest (tests/lab/usb_gadget.py: dummy_hcd and a configfs
gadget), since QEMU's emulated devices cannot take another device's ids. Its controller, the
dummy bus's root hub, comes after USBGuard started and is blocked like any new device; the
test allows that root hub for this boot only (`usbguard allow-device`, no rule written), as
production's allow-list allows its internal hubs, so that the device behind it reaches
USBGuard's decision. Loading the gadget modules is audited (AUD-03, key signhost-modules) like
any module load and touches no file AIDE watches; everything is removed after each test, even
a failed one."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lab import usb
from lab.config import USB_DEVICES, Instance
from lab.state import LabState
from lab.target import Target

if TYPE_CHECKING:
    from tests.lab.conftest import AdminSsh, WaitFor

pytestmark = pytest.mark.lab


def _devices(admin_ssh: AdminSsh) -> str:
    return str(admin_ssh("usbguard list-devices", sudo=True).stdout)


@pytest.fixture
def plugged(lab: LabState, request: pytest.FixtureRequest) -> Iterator[str]:
    inst = Instance(lab.raw["instance"], lab.state_dir)
    device = request.param
    # The token is in its reader from lab.up on (the card profile signs through it): left
    # as it was found.
    was_in = device in usb.plugged(inst)
    usb.plug(inst, device)
    try:
        yield device
    finally:
        if not was_in:
            usb.unplug(inst, device)


@pytest.mark.control("USB-01", "USB-02")
@pytest.mark.parametrize("plugged", ["storage"], indirect=True)
def test_usb_stick_is_blocked_when_plugged_in(admin_ssh: AdminSsh, wait_for: WaitFor,
                                              plugged: str) -> None:
    spec = USB_DEVICES[plugged]
    want = f"{spec['vendor']}:{spec['product']}"
    assert wait_for(lambda: want in _devices(admin_ssh)), f"{want} never reached USBGuard"
    line = next(ln for ln in _devices(admin_ssh).splitlines() if want in ln)
    assert ": block id " in line, line
    time.sleep(5)  # give the kernel every chance to bind a driver
    blocks = admin_ssh("ls /sys/block").stdout.split()
    assert not [b for b in blocks if b.startswith("sd")], f"a block device appeared: {blocks}"
    assert "usb_storage " not in admin_ssh("cat /proc/modules").stdout
    auth = admin_ssh("for a in /sys/bus/usb/devices/*/authorized; do p=${a%/authorized}; "
                     "echo $(cat $p/idVendor 2>/dev/null):$(cat $p/idProduct 2>/dev/null)=$(cat $a); done"
                     ).stdout.split()
    assert f"{want}=0" in auth, auth


@pytest.mark.control("USB-02")
@pytest.mark.parametrize("plugged", ["token"], indirect=True)
def test_token_stand_in_is_allowed_when_plugged_in(admin_ssh: AdminSsh, wait_for: WaitFor,
                                                   plugged: str) -> None:
    spec = USB_DEVICES[plugged]
    want = f"{spec['vendor']}:{spec['product']}"
    assert wait_for(lambda: want in _devices(admin_ssh)), f"{want} never reached USBGuard"
    line = next(ln for ln in _devices(admin_ssh).splitlines() if want in ln)
    assert ": allow id " in line, line


# -- a look-alike of the reader, made in the guest -----------------------------------------------

GADGET_SCRIPT = Path(__file__).with_name("usb_gadget.py")


def _reader(target: Target) -> dict[str, Any]:
    """The inventory's smart-card reader: the allow-list entry whose interfaces are all class 0b."""
    for d in target.values.get("usb_allowed_devices") or []:
        if d.get("interfaces") and all(str(c).lower().startswith("0b:") for c in d["interfaces"]):
            return dict(d)
    pytest.skip(f"{target.inventory}: no smart-card reader (interfaces 0b:*) in usb_allowed_devices")


@dataclass(frozen=True)
class Gadget:
    """A device made in the guest with the reader's ids: where it sits and what it claims."""

    kind: str
    id: str
    serial: str
    port: str  # USBGuard's via-port and the sysfs name: "<bus>-1"
    sysfs: str
    controller: str
    since: str  # the guest's clock before it was made (for its kernel log)


def _line(admin_ssh: AdminSsh, port: str) -> str:
    """USBGuard's entry for the device on `port` ("" while it has not seen it)."""
    return next((ln for ln in _devices(admin_ssh).splitlines() if f' via-port "{port}" ' in ln), "")


@pytest.fixture
def gadget(lab: LabState, target: Target, admin_ssh: AdminSsh, wait_for: WaitFor,
           request: pytest.FixtureRequest) -> Iterator[Gadget]:
    """The reader plugged in (left plugged: the card profile signs through it), and beside it a
    device of `request.param` kind (usb_gadget.py) with its vendor:product and serial."""
    reader = _reader(target)
    usb.plug(Instance(lab.raw["instance"], lab.state_dir), "token")
    vendor, product = str(reader["id"]).lower().split(":")
    serial = str(reader.get("serial") or "")
    code = base64.b64encode(GADGET_SCRIPT.read_bytes()).decode()

    def run(args: str) -> subprocess.CompletedProcess[str]:
        return admin_ssh(f"printf %s {code} | base64 -d | python3 - {args}", sudo=True)

    since = admin_ssh("date +%s").stdout.strip()
    try:
        r = run(f"up {request.param} {vendor} {product} {shlex.quote(serial)}")
        if r.returncode == 3:
            pytest.skip(r.stdout.strip())
        assert r.returncode == 0, f"the gadget was not made: {r.stdout}{r.stderr}"
        made = json.loads(r.stdout.splitlines()[-1])
        g = Gadget(request.param, f"{vendor}:{product}", serial, made["port"], made["sysfs"],
                   made["controller"], since)
        hub = Path(g.controller).name  # usbN
        assert wait_for(lambda: _line(admin_ssh, hub), timeout=60), f"{hub} never reached USBGuard"
        if ": block id " in _line(admin_ssh, hub):
            number = _line(admin_ssh, hub).split(":", 1)[0]
            admin_ssh(f"usbguard allow-device {number}", sudo=True, check=True)
        yield g
    finally:
        d = run("down")
        assert d.returncode == 0, f"the gadget left things behind: {d.stdout}{d.stderr}"


def _assert_reader_still_allowed(admin_ssh: AdminSsh, gadget: Gadget) -> None:
    """The real reader (same id, another port) is still allowed by USBGuard and the kernel."""
    lines = [ln for ln in _devices(admin_ssh).splitlines()
             if f" id {gadget.id} " in ln and f' via-port "{gadget.port}" ' not in ln]
    assert len(lines) == 1, f"want the one real reader {gadget.id}: {lines}"
    assert ": allow id " in lines[0], f"the real reader is no longer allowed: {lines[0]}"
    port = lines[0].split(' via-port "', 1)[1].split('"', 1)[0]
    assert _sysfs(admin_ssh, f"/sys/bus/usb/devices/{port}/authorized") == "1", \
        f"the real reader on {port} is no longer authorized"


def _sysfs(admin_ssh: AdminSsh, path: str) -> str:
    return str(admin_ssh(f"cat {shlex.quote(path)}").stdout).strip()


@pytest.mark.control("USB-02")
@pytest.mark.parametrize("gadget", ["hid"], indirect=True)
def test_a_keyboard_with_the_token_readers_ids_is_blocked_and_the_reader_stays_allowed(
        admin_ssh: AdminSsh, wait_for: WaitFor, gadget: Gadget) -> None:
    """A BadUSB keyboard (03:01:01) that copies the reader's vendor:product and serial: the
    allow rule pins the reader's interface class, so USBGuard blocks it, the kernel never
    authorizes it (no interface, no driver, no input device or hidraw, not even for a moment:
    the kernel log says so), and the real reader beside it stays allowed."""
    assert wait_for(lambda: _line(admin_ssh, gadget.port), timeout=60), \
        f"the look-alike on {gadget.port} never reached USBGuard"
    line = _line(admin_ssh, gadget.port)
    assert f" id {gadget.id} serial \"{gadget.serial}\" " in line and \
        " with-interface 03:01:01 " in line, f"not the look-alike that was made: {line}"
    assert ": block id " in line, line
    assert _sysfs(admin_ssh, f"{gadget.sysfs}/authorized") == "0"
    # Unauthorized from the start (USBGuard sets the controllers' authorized_default to 0):
    # the kernel never configures it, so its interfaces, and anything bound to them, never exist.
    assert admin_ssh(f"ls -d {gadget.sysfs}:* 2>/dev/null").stdout.strip() == "", \
        "the look-alike's interfaces were created"
    bound = admin_ssh(f"readlink -f /sys/class/input/* /sys/class/hidraw/* 2>/dev/null "
                      f"| grep -F {shlex.quote(gadget.controller)} || true").stdout.strip()
    assert bound == "", f"an input device or hidraw appeared for it: {bound}"
    kernel = admin_ssh(f"journalctl -q -k -o cat --since @{gadget.since}", sudo=True).stdout
    seen = [ln for ln in kernel.splitlines()
            if "dummy_hcd" in ln and ("input" in ln or "hidraw" in ln)]
    assert not seen, f"the kernel made an input device for it: {seen}"
    _assert_reader_still_allowed(admin_ssh, gadget)


@pytest.mark.control("USB-02")
@pytest.mark.parametrize("gadget", ["ccid"], indirect=True)
def test_the_same_ids_with_the_readers_interface_class_are_allowed(
        admin_ssh: AdminSsh, wait_for: WaitFor, gadget: Gadget) -> None:
    """The control case of the test above: the same look-alike, made the same way, with the
    reader's interface class (0b:00:00) instead of a keyboard's, is allowed. So the block above
    is USBGuard's verdict on the interface class, not an artefact of the gadget (a device that
    never enumerates or that nothing could allow); it also shows what the residual risk of T-12
    says: a copy of the ids, class and serial gets through."""
    assert wait_for(lambda: _line(admin_ssh, gadget.port), timeout=60), \
        f"the look-alike on {gadget.port} never reached USBGuard"
    line = _line(admin_ssh, gadget.port)
    assert f" id {gadget.id} serial \"{gadget.serial}\" " in line and \
        " with-interface 0b:00:00 " in line, f"not the look-alike that was made: {line}"
    assert ": allow id " in line, line
    assert wait_for(lambda: _sysfs(admin_ssh, f"{gadget.sysfs}/authorized") == "1", timeout=30)
    _assert_reader_still_allowed(admin_ssh, gadget)
