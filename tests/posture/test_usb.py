"""USB posture (USB-01..02) on the host, and devices hot-plugged where the inventory gives a
way to plug them (verify_usb_hotplug)."""

from __future__ import annotations

import re
import subprocess
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testinfra.host import Host

    from tests.posture.conftest import Expected

BLOCKED = ["usb-storage", "uas", "firewire-core", "firewire-ohci", "firewire-sbp2", "thunderbolt"]


@pytest.mark.control("USB-01")
@pytest.mark.parametrize("module", BLOCKED)
def test_usb_storage_and_dma_bus_modules_cannot_be_loaded(host: Host, module: str) -> None:
    # The attempt and the module list after it in one command (one round trip, not two).
    r = host.run(f"modprobe {module}; rc=$?; cat /proc/modules; exit $rc")
    assert r.rc != 0, f"modprobe {module} succeeded"
    loaded = r.stdout
    assert f"\n{module.replace('-', '_')} " not in "\n" + loaded


@pytest.mark.control("USB-02")
def test_usbguard_blocks_by_default(host: Host) -> None:
    assert host.service("usbguard.service").is_running
    assert host.service("usbguard.service").is_enabled
    conf = host.file("/etc/usbguard/usbguard-daemon.conf").content_string
    for line in ("ImplicitPolicyTarget=block", "PresentDevicePolicy=apply-policy",
                 "InsertedDevicePolicy=apply-policy"):
        assert line in conf.splitlines(), line


_RULE_ID = re.compile(r"(?:^| )id (\S+)")
_RULE_SERIAL = re.compile(r' serial "([^"]*)"')
_RULE_INTERFACES = re.compile(
    r" with-interface (?:(all-of|one-of|none-of|equals|equals-ordered|match-all) )?"
    r"(?:\{ ([^}]*) \}|(\S+))")


def _allow_rules(host: Host) -> dict[str, dict[str, object]]:
    """The daemon's rules (`usbguard list-rules`) by device id: serial, interface operator and set."""
    rules: dict[str, dict[str, object]] = {}
    for rule in host.check_output("usbguard list-rules").splitlines():
        if not rule.strip():
            continue
        target = rule.split(": ", 1)[1]
        assert target.startswith("allow id "), f"not an id allow-list rule: {rule}"
        # never "what was plugged in": no hash or port pinning from generate-policy
        for attribute in (" hash ", " parent-hash ", " via-port "):
            assert attribute not in target, rule
        dev = _RULE_ID.search(target)
        serial = _RULE_SERIAL.search(target)
        interfaces = _RULE_INTERFACES.search(target)
        assert dev and dev.group(1).lower() not in rules, rule
        rules[dev.group(1).lower()] = {
            "serial": serial.group(1) if serial else None,
            "operator": (interfaces.group(1) or "equals") if interfaces else None,
            "interfaces": sorted((interfaces.group(2) or interfaces.group(3)).split())
            if interfaces else None,
            "rule": rule,
        }
    return rules


@pytest.mark.control("USB-02")
def test_usbguard_allows_only_listed_device_ids(host: Host, expected: Expected) -> None:
    listed = {str(d["id"]).lower() for d in expected["usb_allowed_devices"]}
    allowed = set(_allow_rules(host))
    # exactly the inventory's ids: none missing (the token would be blocked), none added
    assert allowed == listed, f"USBGuard allows {sorted(allowed)}, the inventory lists {sorted(listed)}"


@pytest.mark.control("USB-02")
def test_each_allowed_device_is_pinned_to_its_interface_classes_and_serial(
        host: Host, expected: Expected) -> None:
    """A device that claims the token's vendor:product but brings a storage or keyboard
    interface must not match: every allow rule names exactly the inventory's interface classes
    (`equals`), and the serial where the inventory gives one."""
    devices = expected["usb_allowed_devices"]
    if not devices:
        pytest.skip("does not apply: the inventory allows no USB device (usb_allowed_devices)")
    rules = _allow_rules(host)
    for d in devices:
        dev = str(d["id"]).lower()
        got = rules.get(dev)
        assert got is not None, f"no allow rule for {dev}"
        assert got["operator"] == "equals" and got["interfaces"] is not None, (
            f"{dev} is not pinned to exactly its interface classes: {got['rule']}")
        assert got["interfaces"] == sorted(str(c).lower() for c in d["interfaces"]), got["rule"]
        want_serial = str(d["serial"]) if d.get("serial") else None
        assert got["serial"] == want_serial, (
            f"{dev}: serial {got['serial']!r} in the rule, {want_serial!r} in the inventory")


@pytest.mark.control("USB-01", "USB-02")
def test_a_plugged_usb_device_is_allowed_only_when_listed(host: Host, expected: Expected,
                                                          usb_hotplug_device: str) -> None:
    """Plug the device in (the inventory's hook) and watch USBGuard decide: an id on the
    allow-list is allowed, anything else is blocked and no driver binds it."""
    hook = expected["verify_usb_hotplug"]
    want = str(hook["devices"][usb_hotplug_device]).lower()
    listed = {str(d["id"]).lower() for d in expected["usb_allowed_devices"]}

    def hotplug(action: str) -> None:
        r = subprocess.run([*map(str, hook["argv"]), action, usb_hotplug_device],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{action} {usb_hotplug_device}: {r.stdout}{r.stderr}"

    def line() -> str:
        devices = host.check_output("usbguard list-devices").splitlines()
        return next((ln for ln in devices if f" id {want} " in ln + " "), "")

    # A device already in (the signing token in its reader) stays in: it is what the host
    # signs with, and the allow-list is proven with it plugged as on a working host.
    was_in = bool(line())
    hotplug("plug")
    try:
        deadline = time.monotonic() + 90  # the guest is slow to enumerate a new device
        while not line() and time.monotonic() < deadline:
            time.sleep(0.5)
        seen = line()
        assert seen, f"{want} never reached USBGuard"
        if want in listed:
            assert ": allow id " in seen, seen
            return
        assert ": block id " in seen, seen
        # Every event of the device handled: had it been authorised, udev would have loaded
        # and bound its driver by now (usb_storage in /proc/modules; its disk follows after
        # the driver's own 1 s delay, so the module is the proof that does not race).
        host.run("udevadm settle --timeout=30")
        assert not [b for b in host.check_output("ls /sys/block").split() if b.startswith("sd")]
        assert "usb_storage " not in host.file("/proc/modules").content_string
        auth = host.check_output(
            "for a in /sys/bus/usb/devices/*/authorized; do p=${a%/authorized}; "
            "echo $(cat $p/idVendor 2>/dev/null):$(cat $p/idProduct 2>/dev/null)=$(cat $a); done"
        ).split()
        assert f"{want}=0" in auth, auth
    finally:
        if not was_in:
            hotplug("unplug")
