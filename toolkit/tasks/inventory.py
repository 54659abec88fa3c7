"""`invoke inventory.check`, and the same check at the start of every task that uses an inventory.

Exit codes of every task (README, "Exit codes"): toolkit.exitcodes.
"""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from toolkit import exitcodes
from toolkit.runner import hostvars, inventory_check

DEFAULT = str(hostvars.ROOT / "inventory" / "lab")


def checked(
    task_name: str,
    inventory: str | None,
    limit: str | None = None,
    vault_password_file: str | None = None,
    *,
    quiet: bool = False,
) -> inventory_check.Result:
    """inventory.check, in process; stops the task (exit 2) with its problems, one per line."""
    try:
        result = inventory_check.check(
            inventory or DEFAULT, limit, vault_password_file=vault_password_file
        )
    except hostvars.InventoryError as exc:
        raise Exit(f"{task_name}: {exc}", code=exitcodes.BAD_INPUT) from None
    if not result.ok:
        lines = inventory_check.report(result).splitlines()
        raise Exit(
            "\n".join(f"{task_name}: {line}" for line in lines)
            + f"\n{task_name}: the inventory does not pass inventory.check; nothing was run",
            code=exitcodes.BAD_INPUT,
        )
    if not quiet:
        print(f"==> {task_name}: {inventory_check.report(result)}", flush=True)
    return result


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
    result = checked("inventory.check", inventory, limit, vault_password_file, quiet=True)
    print(inventory_check.report(result))


ns = Collection("inventory")
ns.add_task(check)
