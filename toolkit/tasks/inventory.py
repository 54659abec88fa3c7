"""`invoke inventory.check` (toolkit.runner.inventory_check; every task that uses an inventory
runs the same check first).

Exit codes of every task (README, "Exit codes"): toolkit.exitcodes.
"""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

from toolkit.runner import inventory_check


@task(
    name="check",
    help={
        "inventory": "inventory path (default: inventory/lab)",
        "limit": "only these hosts (Ansible --limit pattern)",
        "vault_password_file": "vault password file (default: $ANSIBLE_VAULT_PASSWORD_FILE)",
    },
)
def check(
    c: Context,
    inventory: str | None = None,
    limit: str | None = None,
    vault_password_file: str | None = None,
) -> None:
    """Validate an inventory without touching a host: the roles' argument specs, the cross-rules."""
    result = inventory_check.checked("inventory.check", inventory, limit, vault_password_file,
                                     quiet=True)
    print(inventory_check.report(result))


ns = Collection("inventory")
ns.add_task(check)
