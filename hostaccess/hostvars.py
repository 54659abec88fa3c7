"""An inventory's hosts and their variables, read and templated by Ansible itself.

Everything that must see a host the way a play sees it (inventory.check, the values the posture
tests expect, how verify and audit connect) reads it here: Ansible's InventoryManager,
VariableManager and Templar, with the vault secrets Ansible would use, and the roles' defaults
under the inventory's values (the precedence a play gives them). Nothing here connects to a host.

Variables are templated one at a time, on demand: a production inventory may hold lookups that
only make sense on the operator's workstation (a key file in $HOME) or vaulted secrets; asking
for `ssh_allowed_users` must not fail because an unrelated lookup would.

Secrets (the become password, vaulted PINs) are returned to the caller in memory only; callers
never write them anywhere (`public()` drops them from what is written to disk).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLES = ROOT / "roles"

# Variables that hold secrets: never written to a report, an expectations file or a log.
SECRET = re.compile(r"(pass(word)?|_pin$|_pin_|secret|vault|token_so_pin|private_key$)", re.I)


class InventoryError(Exception):
    """The inventory cannot be used (one line for the operator)."""


@dataclass
class Inventory:
    path: str
    hosts: list[str]
    _inv: Any = field(repr=False)
    _vm: Any = field(repr=False)
    _loader: Any = field(repr=False)
    _defaults: dict[str, Any] = field(repr=False, default_factory=dict)
    _cache: dict[str, dict[str, Any]] = field(repr=False, default_factory=dict)

    def raw(self, host: str) -> dict[str, Any]:
        """The host's variables as a play sees them, untemplated (role defaults underneath)."""
        if host not in self._cache:
            from ansible.errors import AnsibleError

            h = self._inv.get_host(host)
            if h is None:
                raise InventoryError(f"{self.path}: no host {host!r}")
            try:
                found = self._vm.get_vars(host=h, include_hostvars=False)
            except AnsibleError as exc:  # a vault file without its password, a bad vars file
                msg = " ".join(str(exc).split())[:300]
                if "no vault secrets" in msg:
                    msg = ("a vault file needs its password (give --vault-password-file or "
                           "$ANSIBLE_VAULT_PASSWORD_FILE)")
                raise InventoryError(f"{host}: {msg}") from None
            merged = dict(self._defaults)
            merged.update(found)
            self._cache[host] = merged
        return self._cache[host]

    def groups(self, host: str) -> list[str]:
        h = self._inv.get_host(host)
        return sorted(g.name for g in h.get_groups()) if h is not None else []

    def has(self, host: str, name: str) -> bool:
        return name in self.raw(host)

    def get(self, host: str, name: str, default: Any = None) -> Any:
        """One variable, templated (lookups, filters and vault decryption as in a play)."""
        from ansible.errors import AnsibleError
        from ansible.template import Templar

        values = self.raw(host)
        if name not in values:
            return default
        templar = Templar(loader=self._loader, variables=values)
        try:
            return _plain(templar.template(values[name], fail_on_undefined=True))
        except AnsibleError as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "no vault secrets" in msg:
                msg += " (give --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE)"
            raise InventoryError(f"{host}: {name}: {msg}") from exc

    def render(self, host: str, names: Iterable[str]) -> dict[str, Any]:
        """The templated subset of `names` that the host defines (missing names are left out)."""
        return {n: self.get(host, n) for n in names if self.has(host, n)}


def _plain(value: Any) -> Any:
    """Ansible's wrapped types (unsafe text, vault text) as plain Python values."""
    from ansible.parsing.yaml.objects import AnsibleVaultEncryptedUnicode

    if isinstance(value, AnsibleVaultEncryptedUnicode):
        return str(value.data)  # decrypts here, inside the caller's error handling
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def public(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the variables that hold secrets (safe to write to a file)."""
    return {k: v for k, v in values.items() if not SECRET.search(k)}


def role_defaults(roles: Path = ROLES) -> dict[str, Any]:
    """Every role's defaults/main.yml merged (names are prefixed by role, so none collide)."""
    merged: dict[str, Any] = {}
    for path in sorted(roles.glob("*/defaults/main.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict):
            merged.update(data)
    return merged


def _vault_secrets(loader: Any, vault_password_file: str | None) -> None:
    from ansible.cli import CLI

    files = [vault_password_file] if vault_password_file else []
    env_file = os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
    if env_file and not files:
        files = [env_file]
    secrets = CLI.setup_vault_secrets(
        loader, vault_ids=[], vault_password_files=files, ask_vault_pass=False, auto_prompt=False
    )
    loader.set_vault_secrets(secrets)


def _init_plugins() -> None:
    """What ansible's CLI does before templating: without the collection loader, every
    `lookup('ansible.builtin.…')` fails with "lookup plugin not found"."""
    from ansible.plugins.loader import init_plugin_loader
    from ansible.utils.collection_loader import AnsibleCollectionConfig

    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader()


def load(
    inventory: str,
    limit: str | None = None,
    *,
    vault_password_file: str | None = None,
    require_hosts: bool = True,
) -> Inventory:
    """Parse `inventory` as ansible-playbook would; the hosts that `limit` selects.

    A missing path, a file Ansible cannot parse, or a limit that matches nothing is an
    InventoryError (Ansible itself only warns and runs against no host).
    """
    from ansible import constants as C
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    path = Path(inventory).expanduser()
    if not path.exists():
        raise InventoryError(f"inventory {inventory}: no such file or directory")
    _init_plugins()
    loader = DataLoader()
    loader.set_basedir(str(ROOT))
    try:
        _vault_secrets(loader, vault_password_file)
    except AnsibleError as exc:
        raise InventoryError(f"vault password: {str(exc).strip().splitlines()[0]}") from exc
    # Ansible reports an inventory source it cannot parse as a warning and carries on with no
    # hosts; here it is an error, with Ansible's own reason.
    old = C.INVENTORY_UNPARSED_IS_FAILED, C.INVENTORY_ANY_UNPARSED_IS_FAILED
    C.INVENTORY_UNPARSED_IS_FAILED = C.INVENTORY_ANY_UNPARSED_IS_FAILED = True
    try:
        inv = InventoryManager(loader=loader, sources=[str(path)])
    except AnsibleError as exc:
        text = " ".join(str(exc).split())
        raise InventoryError(f"inventory {inventory}: {text[:400]}") from exc
    finally:
        C.INVENTORY_UNPARSED_IS_FAILED, C.INVENTORY_ANY_UNPARSED_IS_FAILED = old
    if limit:
        inv.subset(limit)
    hosts = sorted(str(h.name) for h in inv.get_hosts())
    if require_hosts and not hosts:
        if limit:
            raise InventoryError(f"inventory {inventory}: no host matches --limit {limit!r}")
        raise InventoryError(f"inventory {inventory}: no hosts")
    vm = VariableManager(loader=loader, inventory=inv)
    return Inventory(str(inventory), hosts, inv, vm, loader, role_defaults())
