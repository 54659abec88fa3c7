"""The inventory the lab tests (tests/lab) run against, and what they need of it.

The lab tests drive the one signing host of a running lab instance. Which inventory describes
that host is the caller's choice: `inventory/lab` (the default, what `make lab` uses) or the
production-style inventory that `lab.site` renders (CI: `invoke ci` passes it). The tests take
everything from that inventory, read by Ansible itself (hostaccess.hostvars): the admin
connection (user, key, ProxyJump, sudo password), the signer's profiles, clients, custodians
and paths, the admin networks and the SSH algorithms. So one test code proves both
inventories, and a name of `inventory/lab` (`dev`, `build`, `alice`, `admin`) appears in no
test.

The lab supplies only what no inventory holds: the private half of each party's key (found by
its public half among the keys the lab generated), and the network namespace a build server
sits in (the lab host whose address the client's `from` names).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostaccess import connection, hostvars
from lab.state import LabState

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INVENTORY = ROOT / "inventory" / "lab"
ENV_INVENTORY = "SIGNLAB_TEST_INVENTORY"
ENV_VAULT = "SIGNLAB_TEST_VAULT_PASSWORD_FILE"

# The inventory values the lab tests read (role defaults underneath, as a play sees them).
NAMES = ("signer_profiles", "signer_clients", "signer_custodians", "signer_client_account_prefix",
         "signer_audit_log", "signer_config", "signer_controller_dir", "signer_cert_dir",
         "signer_socket", "signer_venv", "signer_audit_cert", "token_pin_source",
         "signer_daemon_user", "signer_service", "token_pin_dir", "token_pin_file",
         "base_sudo_logfile", "firewall_admin_networks",
         "ssh_ciphers", "ssh_host_key_algorithms", "ssh_kex_classical_clients",
         "ssh_kex_algorithms", "ansible_user", "base_aide",
         "base_aide_database", "base_aide_hardened_paths", "usb_allowed_devices",
         "signer_gateway_shell")


class TargetError(RuntimeError):
    """The inventory cannot drive the lab tests (one line)."""


@dataclass(frozen=True)
class Party:
    """A client or custodian of the signer whose private key the lab holds."""

    name: str
    key: Path
    netns_host: str | None = None  # clients: the lab host (namespace) it connects from


@dataclass
class Target:
    lab: LabState
    inventory: str
    vault_password_file: str | None
    host: str
    values: dict[str, Any]
    _inv: hostvars.Inventory = field(repr=False)
    _admin: connection.Endpoint = field(repr=False)

    # -- the admin -----------------------------------------------------------------------------

    @property
    def admin(self) -> str:
        return str(self.values["ansible_user"])

    def admin_argv(self, *options: str) -> list[str]:
        """`ssh ... host` as Ansible reaches the host; `options` go before the host name."""
        argv = list(self._admin.argv)
        return [*argv[:-1], *options, argv[-1]]

    def admin_run(self, command: str, *, sudo: bool = False, timeout: float = 120,
                  options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """`command` on the host as the admin, as root with `sudo`: the become password (vault)
        goes to sudo's standard input, never a command line."""
        pw = self._admin.become_password
        if sudo:
            import shlex

            prefix = "sudo -S -p '' " if pw is not None else "sudo -n "
            command = prefix + "sh -c " + shlex.quote(command)
        stdin = pw + "\n" if sudo and pw is not None else ""
        return subprocess.run([*self.admin_argv(*options), command], input=stdin,
                              capture_output=True, text=True, timeout=timeout)

    def root_output(self, command: str, *, timeout: float = 300) -> tuple[int, bytes, str]:
        """`command` as root on the host, its output as bytes (a journal export, an archive):
        (exit status, standard output, standard error). The become password as in admin_run."""
        import shlex

        pw = self._admin.become_password
        prefix = "sudo -S -p '' " if pw is not None else "sudo -n "
        r = subprocess.run([*self.admin_argv(), prefix + "sh -c " + shlex.quote(command)],
                           input=(pw + "\n").encode() if pw is not None else b"",
                           capture_output=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr.decode(errors="replace")

    @property
    def admin_networks4(self) -> list[str]:
        return [str(n) for n in self.values.get("firewall_admin_networks", []) if ":" not in n]

    # -- the signer's parties and profiles -------------------------------------------------------

    @property
    def profiles(self) -> list[dict[str, Any]]:
        return list(self.values.get("signer_profiles") or [])

    def profile(self, name: str) -> dict[str, Any]:
        return next(p for p in self.profiles if p["name"] == name)

    @staticmethod
    def allowed(profile: dict[str, Any], client: Party) -> bool:
        return client.name in (profile.get("clients") or [])

    def account(self, client: Party) -> str:
        """The local account a build client logs in through: its own (prefix + name), which
        the daemon binds its name to."""
        return f"{self.values['signer_client_account_prefix']}{client.name}"

    @property
    def token_dir(self) -> Path:
        """Where deploy copies the certificates and CSRs on the controller."""
        return Path(str(self.values["signer_controller_dir"]))

    @property
    def clients(self) -> list[Party]:
        """The inventory's build clients whose keys the lab holds, with their namespace."""
        out = []
        for c in self.values.get("signer_clients") or []:
            key = self._private_key(c["ssh_key"])
            ns = self._lab_host_of(c.get("from") or [])
            if key is not None and ns is not None:
                out.append(Party(c["name"], key, ns))
        return out

    @property
    def custodians(self) -> list[Party]:
        out = []
        for c in self.values.get("signer_custodians") or []:
            key = self._private_key(c["ssh_key"])
            if key is not None:
                out.append(Party(c["name"], key))
        return out

    def custodian_argv(self, who: Party) -> list[str]:
        """`ssh ... host` as custodian `who`: the admins' way in (the inventory's connection:
        port, ProxyJump, known hosts), with the custodian's account and key."""
        values = self._inv.render(self.host, connection.CONNECTION_VARS)
        values.setdefault("ansible_host", self.host)
        values.update(ansible_user=who.name, ansible_ssh_private_key_file=str(who.key))
        values.pop("ansible_private_key_file", None)
        argv = connection.ssh_argv(values, self.host)
        return [*argv[:-1], "-o", "IdentitiesOnly=yes", argv[-1]]

    def _private_key(self, line: str) -> Path | None:
        want = " ".join(str(line).split()[:2])
        for pub in sorted((self.lab.state_dir / "keys").glob("*.pub")):
            if " ".join(pub.read_text().split()[:2]) == want:
                return pub.with_suffix("")
        return None

    def _lab_host_of(self, sources: list[str]) -> str | None:
        import ipaddress

        for name in self.lab.raw["hosts"]:
            h = self.lab.host(name)
            for src in sources:
                try:
                    net = ipaddress.ip_network(str(src), strict=False)
                except ValueError:
                    continue
                if any(ipaddress.ip_address(a) in net for a in (h.ipv4, h.ipv6)
                       if ipaddress.ip_address(a).version == net.version):
                    return str(name)
        return None


def resolve(lab: LabState, inventory: str | None = None,
            vault_password_file: str | None = None) -> Target:
    """The inventory under test: `inventory` or $SIGNLAB_TEST_INVENTORY, else inventory/lab."""
    path = inventory or os.environ.get(ENV_INVENTORY) or str(DEFAULT_INVENTORY)
    vault = (vault_password_file or os.environ.get(ENV_VAULT)
             or os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE") or None)
    try:
        inv = hostvars.load(path, vault_password_file=vault)
        if len(inv.hosts) != 1:
            raise TargetError(f"inventory {path}: the lab tests drive one host, it has "
                              f"{len(inv.hosts)}: {', '.join(inv.hosts)}")
        host = inv.hosts[0]
        values = inv.render(host, NAMES)
        admin = connection.endpoint(inv, host)
    except (hostvars.InventoryError, connection.ConnectionError_) as exc:
        raise TargetError(str(exc)) from exc
    return Target(lab, path, vault, host, values, inv, admin)
