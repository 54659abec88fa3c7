"""Address filters for the preflight checks (ansible.utils is not assumed on the controller)."""

from __future__ import annotations

import ipaddress
from typing import Any


def signhost_is_cidr(value: Any) -> bool:
    """True for a network in CIDR notation (IPv4 or IPv6, host bits allowed to be zero only)."""
    try:
        ipaddress.ip_network(str(value), strict=True)
    except ValueError:
        return False
    return "/" in str(value)


def signhost_invalid_cidrs(values: list[Any]) -> list[str]:
    """The entries of `values` that are not networks in CIDR notation."""
    return [str(v) for v in values if not signhost_is_cidr(v)]


def signhost_ip_in_networks(address: Any, networks: list[str]) -> bool:
    """True when `address` lies in one of `networks` (IPv4-mapped IPv6 is unmapped first)."""
    try:
        ip = ipaddress.ip_address(str(address))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for net in networks:
        try:
            if ip in ipaddress.ip_network(str(net), strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False


def signhost_key_blobs(keys: list[str]) -> list[str]:
    """`type base64` of each OpenSSH public key line (options and comments dropped)."""
    out: list[str] = []
    for line in keys:
        parts = str(line).split()
        for i, part in enumerate(parts[:-1]):
            if part.startswith(("ssh-", "ecdsa-", "sk-")):
                out.append(f"{part} {parts[i + 1]}")
                break
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "signhost_is_cidr": signhost_is_cidr,
            "signhost_invalid_cidrs": signhost_invalid_cidrs,
            "signhost_ip_in_networks": signhost_ip_in_networks,
            "signhost_key_blobs": signhost_key_blobs,
        }
