"""The USB allow-list pins each device to its interface classes (and serial): the usb role's
rule template, rendered with Ansible's own templar, and preflight's check of the entries.

Before, the rule was `allow id 08e6:4433`: a stick claiming the token's ids with a storage or
keyboard interface was allowed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "roles/usb/templates/etc/usbguard/rules.conf.j2"
FILTER = ROOT / "roles/preflight/filter_plugins/signhost_usb.py"


def _render(devices: list[dict[str, Any]]) -> list[str]:
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    templar = Templar(DataLoader(), variables={"usb_allowed_devices": devices,
                                               "ansible_managed": "managed"})
    text = templar.template(TEMPLATE.read_text())
    return [ln for ln in str(text).splitlines() if ln and not ln.startswith("#")]


def _problems(devices: Any) -> list[str]:
    spec = importlib.util.spec_from_file_location("signhost_usb", FILTER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result: list[str] = module.signhost_usb_problems(devices)
    return result


def test_the_token_is_allowed_only_as_a_smart_card() -> None:
    assert _render([{"id": "08e6:4433", "interfaces": ["0b:*:*"], "name": "token"}]) == [
        'allow id 08e6:4433 with-interface equals { 0b:*:* } label "token"']


def test_a_serial_from_the_inventory_pins_the_one_device() -> None:
    assert _render([{"id": "20a0:4230", "interfaces": ["0b:00:00"], "serial": "DENK01"},
                    {"id": "1d6b:0002", "interfaces": ["09:00:*"], "serial": ""}]) == [
        'allow id 20a0:4230 serial "DENK01" with-interface equals { 0b:00:00 }',
        "allow id 1d6b:0002 with-interface equals { 09:00:* }"]


@pytest.mark.parametrize(("entry", "problem"), [
    ({"id": "08e6:4433", "interfaces": ["0b:*:*"], "name": "token"}, None),
    ({"id": "08e6:4433", "name": "token"}, "usb_allowed_devices[08e6:4433].interfaces"),
    ({"id": "08e6:4433", "interfaces": []}, "usb_allowed_devices[08e6:4433].interfaces"),
    ({"id": "08e6:4433", "interfaces": ["0b:*:00"]}, "'0b:*:00' is not cc:ss:pp"),
    ({"id": "08E6:4433", "interfaces": ["0b:*:*"]}, "usb_allowed_devices[0].id"),
    ({"id": "08e6:4433", "interfaces": ["0b:*:*"], "serial": 'x" with-interface { 08:*:* }'},
     "usb_allowed_devices[08e6:4433].serial"),
    ({"id": "08e6:4433", "interfaces": ["0b:*:*"], "name": "a\\"}, "[08e6:4433].name"),
])
def test_preflight_refuses_an_entry_that_does_not_pin_the_device(entry: dict[str, Any],
                                                                  problem: str | None) -> None:
    got = _problems([entry])
    if problem is None:
        assert got == []
    else:
        assert len(got) == 1 and problem in got[0], got


def test_the_inventories_pin_their_token() -> None:
    import yaml

    for path in ("inventory/lab/group_vars/all/hardening.yml",
                 "inventory/production.example/group_vars/all/hardening.yml"):
        devices = yaml.safe_load((ROOT / path).read_text())["usb_allowed_devices"]
        assert [d["interfaces"] for d in devices] == [["0b:*:*"]], path
