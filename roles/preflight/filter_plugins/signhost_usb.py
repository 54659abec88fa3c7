"""The USB allow-list's entries, checked before USBGuard's rules are written from them."""

from __future__ import annotations

import re
from typing import Any

ID = re.compile(r"[0-9a-f]{4}:[0-9a-f]{4}")
# USBGuard's interface-type: cc:ss:pp, cc:ss:* or cc:*:* (never a class and a protocol alone).
INTERFACE = re.compile(r"[0-9a-f]{2}:(?:[0-9a-f]{2}:(?:[0-9a-f]{2}|\*)|\*:\*)")
# Goes between double quotes in the rule: printable ASCII without the quote and the backslash.
TEXT = re.compile(r"[ !#-\[\]-~]{1,126}")


def signhost_usb_problems(devices: Any) -> list[str]:
    """One line per problem of usb_allowed_devices (empty: every entry can be written)."""
    if not isinstance(devices, list):
        return ["usb_allowed_devices: not a list"]
    problems: list[str] = []
    for i, d in enumerate(devices):
        if not isinstance(d, dict):
            problems.append(f"usb_allowed_devices[{i}]: not a mapping")
            continue
        dev = d.get("id")
        where = f"usb_allowed_devices[{dev}]" if isinstance(dev, str) and ID.fullmatch(dev) \
            else f"usb_allowed_devices[{i}]"
        if not (isinstance(dev, str) and ID.fullmatch(dev)):
            problems.append(f"{where}.id: {str(dev)[:20]!r} is not vendor:product in lower-case "
                            "hex (e.g. 08e6:4433)")
        classes = d.get("interfaces")
        if not isinstance(classes, list) or not classes:
            problems.append(f"{where}.interfaces: the device's interface classes are needed "
                            "(a smart-card token: ['0b:*:*'])")
        else:
            problems += [f"{where}.interfaces: {str(c)[:20]!r} is not cc:ss:pp, cc:ss:* or cc:*:*"
                         for c in classes if not (isinstance(c, str) and INTERFACE.fullmatch(c))]
        for key in ("serial", "name"):
            if key in d and not (isinstance(d[key], str) and TEXT.fullmatch(d[key])):
                problems.append(f"{where}.{key}: printable ASCII without quotes or backslashes")
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"signhost_usb_problems": signhost_usb_problems}
