"""Names, addresses and ports of one lab instance: pure functions, no I/O.

An instance is `labN` (N = 0..9). Every name it creates on the machine carries the prefix
`slbN` so that a lab never collides with anything else (and two instances never collide
with each other): bridge `slbN-br`, tap `slbN-tap`, namespaces `slbN-build` and
`slbN-intruder`, `slbN-collector`, veth ends `slbN-b`, `slbN-i` and `slbN-c`. Addresses
are private and exist only on the bridge and inside the namespaces; the bridge itself
carries no address, so the controller is not a host of the lab segment and nothing on it
is routed anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lab import card

INSTANCE_RE = re.compile(r"^lab([0-9])$")
LAB_HOSTS = ("build", "intruder", "collector")
HOST_OCTET = {"vm": 10, "build": 20, "collector": 30, "intruder": 66}
# The collector's RELP port (rsyslog imrelp over TLS; RELP's customary port).
COLLECTOR_PORT = 2514
SSH_ALIAS = "signhost"
ADMIN_USER = "admin"
KEY_NAMES = ("admin", "build", "intruder", "alice", "bob")

# QEMU's own USB ids: usb-storage 46f4:0001, usb-ccid (the token stand-in) 08e6:4433.
# `bus`: the QEMU USB bus each is plugged into (lab/vm.py says why the reader has its own).
USB_DEVICES = {
    "storage": {"vendor": "46f4", "product": "0001", "qdev": "usb-storage", "bus": "xhci.0"},
    "token": {"vendor": "08e6", "product": "4433", "qdev": "usb-ccid", "bus": "uhci.0"},
}


class LabConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Instance:
    name: str
    state_dir: Path
    index: int = field(init=False)

    def __post_init__(self) -> None:
        m = INSTANCE_RE.match(self.name)
        if not m:
            raise LabConfigError(f"lab instance must be lab0..lab9, not {self.name!r}")
        object.__setattr__(self, "index", int(m.group(1)))

    @property
    def prefix(self) -> str:
        return f"slb{self.index}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def tap(self) -> str:
        return f"{self.prefix}-tap"

    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def veth(self, host: str) -> str:
        """Controller-side end of a host's veth pair (IFNAMSIZ: at most 15 characters)."""
        return f"{self.prefix}-{host[0]}"

    @property
    def ssh_port(self) -> int:
        return 22220 + self.index

    @property
    def subnet4(self) -> str:
        return f"10.77.{self.index}.0/24"

    @property
    def subnet6(self) -> str:
        return f"fd77:{self.index}::/64"

    def ipv4(self, who: str) -> str:
        return f"10.77.{self.index}.{HOST_OCTET[who]}"

    def ipv6(self, who: str) -> str:
        return f"fd77:{self.index}::{HOST_OCTET[who]}"

    def mac(self, nic: int) -> str:
        return f"52:54:00:5a:{nic:02x}:{self.index:02x}"

    @property
    def vm_name(self) -> str:
        """QEMU -name: also the marker by which a stale QEMU of ours is recognised."""
        return f"signlab-{self.name}"

    # Files in the state directory
    def path(self, name: str) -> Path:
        return self.state_dir / name

    @property
    def overlay(self) -> Path:
        return self.path("disk.qcow2")

    @property
    def pidfile(self) -> Path:
        return self.path("qemu.pid")

    @property
    def monitor(self) -> Path:
        return self.path("monitor.sock")

    @property
    def console_log(self) -> Path:
        return self.path("console.log")

    @property
    def ssh_config(self) -> Path:
        return self.path("ssh_config")

    @property
    def known_hosts(self) -> Path:
        return self.path("known_hosts")

    @property
    def keys_dir(self) -> Path:
        return self.path("keys")

    @property
    def lab_json(self) -> Path:
        return self.path("lab.json")

    @property
    def stick_image(self) -> Path:
        return self.path("usb-stick.img")

    # The log collector (lab/collector.py): its rsyslog, its PKI, the copies it keeps.
    @property
    def collector_dir(self) -> Path:
        return self.path("collector")

    def tls_name(self, who: str) -> str:
        """The name in a lab certificate (the collector's, the signing host's)."""
        return f"{who}.{self.name}.signlab"

    def collector_copy(self, sender_ipv4: str) -> Path:
        """The collector's copy of the signer audit log that `sender_ipv4` forwards."""
        return self.collector_dir / "copies" / sender_ipv4 / "signer-audit.jsonl"

    def facts(self, *, accel: str, pid: int) -> dict[str, object]:
        """What lab.json records (read back through lab.state.LabState)."""
        return {
            "instance": self.name,
            "prefix": self.prefix,
            "state_dir": str(self.state_dir),
            "ssh": {
                "alias": SSH_ALIAS,
                "host": "127.0.0.1",
                "port": self.ssh_port,
                "user": ADMIN_USER,
                "key": str(self.keys_dir / "admin"),
                "config": str(self.ssh_config),
            },
            "vm": {
                "name": self.vm_name,
                "pid": pid,
                "accel": accel,
                "monitor": str(self.monitor),
                "console_log": str(self.console_log),
                "lab_ipv4": self.ipv4("vm"),
                "lab_ipv6": self.ipv6("vm"),
                "admin_ipv4": "10.0.2.15",
                "admin_ipv4_net": "10.0.2.0/24",
            },
            "net": {"bridge": self.bridge, "tap": self.tap, "ipv4": self.subnet4,
                    "ipv6": self.subnet6},
            "hosts": {
                h: {"netns": self.netns(h), "veth": self.veth(h), "ipv4": self.ipv4(h),
                    "ipv6": self.ipv6(h)}
                for h in LAB_HOSTS
            },
            "usb": {k: {"vendor": v["vendor"], "product": v["product"]}
                    for k, v in USB_DEVICES.items()},
            # The card in the token's reader (lab/card.py): its signing certificate from the
            # lab CA and its PIN, on the controller, for the inventory's card profile.
            "card": {"cert": str(card.signing_cert(self.state_dir)),
                     "pin": str(card.pin_file(self.state_dir)),
                     "label": card.TOKEN_LABEL, "key": card.KEY_URI},
            "collector": {
                "port": COLLECTOR_PORT,
                "name": self.tls_name("collector"),
                "ca": str(self.collector_dir / "pki" / "ca.pem"),
                # the signing host's client certificate and key (RELP over mutual TLS)
                "client_name": self.tls_name("signhost"),
                "client_cert": str(self.collector_dir / "pki" / "signhost.pem"),
                "client_key": str(self.collector_dir / "pki" / "signhost.key"),
                "vm_copy": str(self.collector_copy(self.ipv4("vm"))),
            },
        }


def ssh_config_text(inst: Instance) -> str:
    """Client config for the admin connection: one alias, strict host keys, reuse."""
    return (
        f"Host {SSH_ALIAS} {inst.name}\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {inst.ssh_port}\n"
        f"  User {ADMIN_USER}\n"
        f"  IdentityFile {inst.keys_dir / 'admin'}\n"
        f"  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {inst.known_hosts}\n"
        f"  StrictHostKeyChecking yes\n"
        f"  ControlMaster auto\n"
        f"  ControlPath /tmp/signlab-{inst.name}-%C\n"
        f"  ControlPersist 120s\n"
        f"  ConnectTimeout 20\n"
        f"  ServerAliveInterval 15\n"
        f"  LogLevel ERROR\n"
    )


def guest_network_config(inst: Instance) -> str:
    """systemd-networkd unit for the VM's lab NIC, handed to the guest through fw_cfg."""
    return (
        "[Match]\n"
        f"MACAddress={inst.mac(1)}\n\n"
        "[Network]\n"
        f"Address={inst.ipv4('vm')}/24\n"
        f"Address={inst.ipv6('vm')}/64\n"
        "IPv6AcceptRA=no\n"
        "LinkLocalAddressing=ipv6\n"
    )
