"""USB posture (USB-01..02) on the host. Hot-plugging real devices is in tests/lab/test_usb.py."""

from __future__ import annotations

import pytest

BLOCKED = ["usb-storage", "uas", "firewire-core", "firewire-ohci", "firewire-sbp2", "thunderbolt"]


@pytest.mark.control("USB-01")
@pytest.mark.parametrize("module", BLOCKED)
def test_usb_storage_and_dma_bus_modules_cannot_be_loaded(host, module) -> None:  # type: ignore[no-untyped-def]
    r = host.run(f"modprobe {module}")
    assert r.rc != 0, f"modprobe {module} succeeded"
    loaded = host.file("/proc/modules").content_string
    assert f"\n{module.replace('-', '_')} " not in "\n" + loaded


@pytest.mark.control("USB-02")
def test_usbguard_blocks_by_default(host) -> None:  # type: ignore[no-untyped-def]
    assert host.service("usbguard.service").is_running
    assert host.service("usbguard.service").is_enabled
    conf = host.file("/etc/usbguard/usbguard-daemon.conf").content_string
    for line in ("ImplicitPolicyTarget=block", "PresentDevicePolicy=apply-policy",
                 "InsertedDevicePolicy=apply-policy"):
        assert line in conf.splitlines(), line


@pytest.mark.control("USB-02")
def test_usbguard_allows_only_listed_device_ids(host, lab) -> None:  # type: ignore[no-untyped-def]
    rules = [r for r in host.check_output("usbguard list-rules").splitlines() if r.strip()]
    assert rules, "USBGuard has no rules: nothing could be allowed, not even the token"
    for rule in rules:
        target = rule.split(": ", 1)[1]
        assert target.startswith("allow id "), f"not an id allow-list rule: {rule}"
        # never "what was plugged in": no serial, hash or port pinning from generate-policy
        assert " hash " not in target and " serial " not in target, rule
    if lab is not None:
        token = lab.raw["usb"]["token"]
        assert any(f"allow id {token['vendor']}:{token['product']}" in r for r in rules)
        stick = lab.raw["usb"]["storage"]
        assert not any(f"{stick['vendor']}:{stick['product']}" in r for r in rules)
