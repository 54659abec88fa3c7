"""The lab's facts, as `lab.up` records them in `<state dir>/lab.json`.

Everything outside the lab package (inventory, posture tests, the deploy role's lab
variables, `invoke verify`) reads the running lab through this module, never by
guessing names or addresses.

State directory: ``$SIGNLAB_STATE`` if set, else ``/var/lib/signlab/<instance>`` where the
instance is ``$SIGNLAB_INSTANCE`` (default ``lab0``). Several instances can run side by
side: each has its own prefix, ports and subnet.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_ROOT = Path("/var/lib/signlab")
CACHE_ROOT = Path(os.environ.get("SIGNLAB_CACHE", "/var/cache/signlab"))


def instance_name() -> str:
    return os.environ.get("SIGNLAB_INSTANCE", "lab0")


def state_dir(instance: str | None = None) -> Path:
    if instance is None and os.environ.get("SIGNLAB_STATE"):
        return Path(os.environ["SIGNLAB_STATE"])
    return STATE_ROOT / (instance or instance_name())


@dataclass(frozen=True)
class NetHost:
    """A host of the lab network: a network namespace on the controller."""

    name: str
    netns: str
    ipv4: str
    ipv6: str


@dataclass(frozen=True)
class LabState:
    raw: dict[str, Any]

    @property
    def state_dir(self) -> Path:
        return Path(self.raw["state_dir"])

    @property
    def ssh_config(self) -> Path:
        """OpenSSH client config with a `signhost` alias for the VM (admin user, key, port)."""
        return Path(self.raw["ssh"]["config"])

    @property
    def ssh_alias(self) -> str:
        return str(self.raw["ssh"]["alias"])

    @property
    def vm_ipv4(self) -> str:
        """The VM's address on the lab segment (its second NIC)."""
        return str(self.raw["vm"]["lab_ipv4"])

    @property
    def vm_ipv6(self) -> str:
        return str(self.raw["vm"]["lab_ipv6"])

    @property
    def lab_subnet4(self) -> str:
        return str(self.raw["net"]["ipv4"])

    @property
    def lab_subnet6(self) -> str:
        return str(self.raw["net"]["ipv6"])

    @property
    def admin_subnet4(self) -> str:
        """The user-mode (slirp) network: where the operator's SSH comes from."""
        return str(self.raw["vm"]["admin_ipv4_net"])

    def host(self, name: str) -> NetHost:
        h = self.raw["hosts"][name]
        return NetHost(name=name, netns=h["netns"], ipv4=h["ipv4"], ipv6=h["ipv6"])

    def key(self, name: str) -> Path:
        """Private key generated for the lab at run time: admin, build, intruder, alice, bob."""
        return self.state_dir / "keys" / name

    def netns_run(
        self,
        host: str,
        argv: list[str],
        *,
        input: bytes | None = None,
        timeout: float = 60,
        check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv inside the network namespace of a lab host (build, intruder)."""
        ns = self.host(host).netns
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            input=input,
            capture_output=True,
            timeout=timeout,
            check=check,
        )


def load(instance: str | None = None) -> LabState | None:
    """The running lab's state, or None when no lab.json exists for this instance."""
    path = state_dir(instance) / "lab.json"
    if not path.exists():
        return None
    return LabState(json.loads(path.read_text()))
