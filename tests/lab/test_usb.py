"""USB hot-plug against the hardened VM (USB-01, USB-02): the stick is refused, the token
stand-in is accepted, both decided by the inventory's allow-list; and a device that copies the
reader's vendor:product (and serial, where the inventory pins one) but brings a keyboard
interface is refused while the real reader stays in and allowed.

The look-alike is made inside the guest (tests/lab/usb_gadget.py: dummy_hcd and a configfs
gadget), since QEMU's emulated devices cannot take another device's ids. Its controller, the
dummy bus's root hub, comes after USBGuard started and is blocked like any new device; the
test allows that root hub for this boot only (`usbguard allow-device`, no rule written), as
production's allow-list allows its internal hubs, so that the device behind it reaches
USBGuard's decision. Nothing here changes USBGuard's rules: `usbguard remove-rule`, even of a
rule appended with -t, rewrites /etc/usbguard/rules.conf, which AIDE watches. Loading the gadget
modules is audited (AUD-03, key signhost-modules) like any module load and touches no file AIDE
watches; everything is removed after each test, even a failed one. The hardening leaves these
modules loadable (neither kernel_blacklisted_modules nor USB-01 names them, and
kernel.modules_disabled is not set: loading one takes root); a host that refuses them skips the
test with its reason."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
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
class Look:
    """What the host shows (usb_gadget.py `look`), seen from the look-alike on `port`."""

    port: str
    usbguard: list[str]
    authorized: dict[str, str]  # sysfs name (1-1, 4-1, usb4) -> "0" or "1"
    interfaces: list[str]  # the look-alike's interfaces in sysfs (4-1:1.0 ...)
    bound: list[str]  # input and hidraw devices under the dummy bus
    kernel: list[str]  # the kernel's messages about the dummy bus since it was made

    @property
    def entry(self) -> str:
        """USBGuard's entry for the look-alike ("" while it has not seen it)."""
        return next((ln for ln in self.usbguard if f' via-port "{self.port}" ' in ln), "")

    def others(self, device_id: str) -> list[str]:
        """USBGuard's entries for the other devices with this id (the real reader)."""
        return [ln for ln in self.usbguard
                if f" id {device_id} " in ln and f' via-port "{self.port}" ' not in ln]


@dataclass
class Gadget:
    """A device made in the guest with the reader's ids: what it claims and where it sits."""

    kind: str
    id: str
    serial: str
    port: str  # USBGuard's via-port and the sysfs name: "<bus>-1"
    look: Callable[[], Look]  # one round trip to the host

    def seen(self, wait_for: WaitFor) -> Look:
        """The host's view once USBGuard has decided on the look-alike."""
        found: list[Look] = []

        def decided() -> bool:
            found[:] = [self.look()]
            return bool(found[0].entry)

        assert wait_for(decided, timeout=60), f"the look-alike on {self.port} never reached USBGuard"
        return found[0]


@pytest.fixture
def gadget(lab: LabState, target: Target, admin_ssh: AdminSsh,
           request: pytest.FixtureRequest) -> Iterator[Gadget]:
    """The reader plugged in (left plugged: the card profile signs through it), and beside it a
    device of `request.param` kind (usb_gadget.py) with its vendor:product and serial; removed
    afterwards, whatever the test found."""
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

        def look() -> Look:
            out = run(f"look {made['port']} {made['controller']} {since}")
            assert out.returncode == 0, out.stdout + out.stderr
            return Look(made["port"], **json.loads(out.stdout))

        yield Gadget(request.param, f"{vendor}:{product}", serial, made["port"], look)
    finally:
        d = run("down")
        assert d.returncode == 0, f"the gadget left things behind: {d.stdout}{d.stderr}"


def _assert_reader_still_allowed(seen: Look, gadget: Gadget) -> None:
    """The real reader (same id, another port) is still allowed by USBGuard and the kernel."""
    [reader] = seen.others(gadget.id) or [""]
    assert ": allow id " in reader, f"the real reader is no longer allowed: {seen.others(gadget.id)}"
    port = reader.split(' via-port "', 1)[1].split('"', 1)[0]
    assert seen.authorized.get(port) == "1", f"the real reader on {port} is not authorized"


@pytest.mark.control("USB-02")
@pytest.mark.parametrize("gadget", ["hid"], indirect=True)
def test_a_keyboard_with_the_token_readers_ids_is_blocked_and_the_reader_stays_allowed(
        wait_for: WaitFor, gadget: Gadget) -> None:
    """A BadUSB keyboard (03:01:01) that copies the reader's vendor:product and serial: the
    allow rule pins the reader's interface class, so USBGuard blocks it, the kernel never
    authorizes it (no interface, no driver, no input device or hidraw, not even for a moment:
    the kernel log says so), and the real reader beside it stays allowed."""
    seen = gadget.seen(wait_for)
    assert f" id {gadget.id} serial \"{gadget.serial}\" " in seen.entry and \
        " with-interface 03:01:01 " in seen.entry, f"not the look-alike that was made: {seen.entry}"
    assert ": block id " in seen.entry, seen.entry
    assert seen.authorized.get(gadget.port) == "0", seen.authorized
    # Unauthorized from the start (USBGuard sets every controller's authorized_default to 0):
    # the kernel never configures it, so its interfaces, and anything bound to them, never exist.
    assert not seen.interfaces, f"the look-alike's interfaces were created: {seen.interfaces}"
    assert not seen.bound, f"an input device or hidraw appeared for it: {seen.bound}"
    made = [ln for ln in seen.kernel if "input" in ln or "hidraw" in ln]
    assert not made, f"the kernel made an input device for it: {made}"
    _assert_reader_still_allowed(seen, gadget)


@pytest.mark.control("USB-02")
@pytest.mark.parametrize("gadget", ["ccid"], indirect=True)
def test_the_same_ids_with_the_readers_interface_class_are_allowed(
        wait_for: WaitFor, gadget: Gadget) -> None:
    """The control case of the test above: the same look-alike, made the same way, with the
    reader's interface class (0b:00:00) instead of a keyboard's, is allowed. So the block above
    is USBGuard's verdict on the interface class, not an artefact of the gadget (a device that
    never enumerates or that nothing could allow); it is also the residual risk T-12 accepts:
    a copy of the ids, class and serial gets through."""
    seen = gadget.seen(wait_for)
    assert f" id {gadget.id} serial \"{gadget.serial}\" " in seen.entry and \
        " with-interface 0b:00:00 " in seen.entry, f"not the look-alike that was made: {seen.entry}"
    assert ": allow id " in seen.entry, seen.entry
    if seen.authorized.get(gadget.port) != "1":  # USBGuard lists it, then authorizes it
        assert wait_for(lambda: gadget.look().authorized.get(gadget.port) == "1", timeout=30), \
            "allowed by USBGuard, never authorized by the kernel"
    _assert_reader_still_allowed(seen, gadget)
