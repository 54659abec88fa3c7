"""USB hot-plug against the hardened VM (USB-01, USB-02): the stick is refused, the token
stand-in is accepted, both decided by the inventory's allow-list."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from lab import usb
from lab.config import USB_DEVICES, Instance
from lab.state import LabState

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
