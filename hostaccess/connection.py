"""How verify and audit reach a host: exactly as Ansible does, through testinfra's translation.

The inventory is read and templated by Ansible (hostaccess.hostvars); the connection variables a
play would use (ansible_host, _port, _user, the private key, ansible_ssh_common_args and
ansible_ssh_extra_args with their ProxyJump or -F ssh_config, ansible.cfg's ssh_args) are handed
to testinfra's own Ansible translation (`testinfra.utils.ansible_runner.get_ansible_host`), which
builds the ssh command line. Nothing here writes another ssh_config.

The become password (sudo that asks for one) comes from the inventory (`ansible_become_password`,
usually vaulted) or from a prompt, asked once per process (`become_password`) whoever needs it:
a play (toolkit.runner.ansible_run hands it to Ansible through a pipe) or a channel of our own
(written to the remote sudo's stdin and nowhere else, see toolkit.assurance.shell_channel).
"""

from __future__ import annotations

import getpass
import shlex
from dataclasses import dataclass, field
from typing import Any

from hostaccess import hostvars

CONNECTION_VARS = (
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "ansible_connection",
    "ansible_ssh_common_args",
    "ansible_ssh_extra_args",
    "ansible_ssh_private_key_file",
    "ansible_private_key_file",
    "ansible_become",
    "ansible_become_user",
)


class ConnectionError_(Exception):
    """A host cannot be reached the way its inventory says (one line)."""


@dataclass(frozen=True)
class Endpoint:
    """One inventory host, ready to connect to."""

    host: str  # the inventory name
    argv: tuple[str, ...]  # `ssh ... <host>`: append the remote command as one argument
    become_password: str | None = field(default=None, repr=False)

    def command(self, remote: str) -> list[str]:
        return [*self.argv, remote]


def ssh_argv(values: dict[str, Any], host: str) -> list[str]:
    """The ssh command line (without the remote command) testinfra builds from these vars."""
    from testinfra.backend.ssh import SshBackend
    from testinfra.utils.ansible_runner import get_ansible_config, get_ansible_host

    connection = str(values.get("ansible_connection") or "ssh")
    if connection not in ("ssh", "smart"):
        raise ConnectionError_(
            f"{host}: ansible_connection={connection}: verify and audit reach hosts over ssh only"
        )
    inventory = {"_meta": {"hostvars": {host: values}}, "all": {"hosts": [host]}}
    th = get_ansible_host(get_ansible_config(), inventory, host)
    if th is None or not isinstance(th.backend, SshBackend):
        raise ConnectionError_(f"{host}: testinfra cannot build an ssh connection for it")
    backend: SshBackend = th.backend
    marker = "SIGNHOST-REMOTE-COMMAND"
    cmd, args = backend._build_ssh_command(marker)
    line = backend.quote(" ".join(cmd), *args)
    argv = shlex.split(line)
    if argv[-1] != marker:  # pragma: no cover - testinfra changed its command layout
        raise ConnectionError_(f"{host}: unexpected ssh command from testinfra: {line}")
    # Never a prompt (host key, password): a check that waits for input hangs a fleet run.
    return [*argv[:-2], "-o", "BatchMode=yes", argv[-2]]


def endpoint(
    inv: hostvars.Inventory, host: str, *, password: str | None = None
) -> Endpoint:
    values = inv.render(host, CONNECTION_VARS)
    values.setdefault("ansible_host", host)
    pw = password if password is not None else host_become_password(inv, host, False)
    return Endpoint(host, tuple(ssh_argv(values, host)), pw)


_BECOME_PASSWORD: list[str] = []


def become_password(ask: bool, prompt: str = "sudo password (become): ") -> str | None:
    """The become (sudo) password the operator typed, asked at most once per process.

    None when not asked for: Ansible then uses the inventory's `ansible_become_password`
    (vaulted, decrypted with --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE), or none.
    A channel of our own that needs the vaulted value reads it with `host_become_password`.
    """
    if not ask:
        return None
    if not _BECOME_PASSWORD:
        _BECOME_PASSWORD.append(getpass.getpass(prompt))
    return _BECOME_PASSWORD[0]


_BECOME_VARS = ("ansible_become_password", "ansible_become_pass", "ansible_sudo_pass")


def host_become_password(inv: hostvars.Inventory, host: str, ask: bool) -> str | None:
    """The sudo password Ansible would use on `host`, for a channel of our own.

    Ansible's precedence: the inventory's `ansible_become_password` (vault decrypted) wins
    over the one typed at --ask-become-pass (asked once per process); else None.
    """
    for name in _BECOME_VARS:
        if inv.has(host, name):
            # hostvars decrypts a vaulted value and turns its errors into InventoryError.
            value = inv.get(host, name)
            return None if value is None else str(value)
    return become_password(ask)
