"""What the posture suite expects of one host, read from that host's inventory values.

The same test code runs against every inventory (the lab VM, a production host): the accounts,
keys, profiles, token and paths a test checks come from here, never from the test itself.
Values are the inventory's (role defaults underneath), templated by Ansible as a play would see
them (hostaccess/hostvars.py).

Only the variables named below are read, and none of them is a secret; `hostvars.public` drops
any secret-named one as a second guard. The token's PIN *file path*, the controller directory
the PINs are kept in, *how the PIN is entered* and whether admins' sudo asks for a password
(`token_pin_file`, `token_pin_dir`, `token_pin_source`, `base_sudo_nopasswd`) are not secrets
although their names look like it, so they are let through by name; PINs and passwords
themselves are never read here (the posture test that looks for the PINs in the host's logs
reads them itself, from where the token role keeps them).

A variable whose templating fails (a lookup of a key file that is not on this controller) is
left out and its error kept under `UNRESOLVED`, so that a test that needs it fails with the
reason while the others run.
"""

from __future__ import annotations

from typing import Any

from hostaccess import hostvars

# The inventory variables the suite reads: role knobs (their defaults apply) and the
# verify_* values that describe how the host can be observed (none of them are role knobs).
NAMES: tuple[str, ...] = (
    # base
    "base_admin_users", "base_sudo_nopasswd", "base_sudo_logfile", "base_apt_timers",
    "base_ntp_servers", "base_aide_database", "base_aide_probe_dir",
    # ssh
    "ssh_allowed_users", "ssh_port", "ssh_kex_algorithms", "ssh_kex_classical_clients",
    # firewall
    "firewall_admin_networks", "firewall_build_networks", "firewall_ntp_servers",
    "firewall_log_collectors",
    # usb
    "usb_allowed_devices", "usb_blocked_modules",
    # auditd
    "auditd_remote_server",
    # token
    "token_backend", "token_module", "token_label", "token_owner", "token_softhsm_conf",
    "token_softhsm_store", "token_pcscd", "token_pin_source", "token_pin_file", "token_pin_dir",
    "token_pcscd_sandbox", "token_cards",
    # signer
    "signer_client_account_prefix", "signer_gateway_group", "signer_daemon_user",
    "signer_daemon_home",
    "signer_clients", "signer_custodians", "signer_profiles", "signer_config", "signer_venv",
    "signer_socket", "signer_service", "signer_audit_log", "signer_audit_cert",
    "signer_audit_collector", "signer_audit_collector_port",
    # how the suite observes the host (inventory values, no role reads them)
    "verify_kind", "verify_egress_probe", "verify_vantage_points", "verify_usb_hotplug",
    "verify_audit_collector_copy",
)

# Not secrets, though their names match hostvars.SECRET: a path and a mode, no PIN.
NOT_SECRET = frozenset({"token_pin_file", "token_pin_dir", "token_pin_source",
                        "base_sudo_nopasswd"})

# Keys of the result that are not inventory variables.
UNRESOLVED = "_unresolved"  # {name: why it could not be templated}
SOURCE = "_source"  # "inventory/lab host signhost", for error messages


def for_host(inv: hostvars.Inventory, host: str) -> dict[str, Any]:
    """The public, templated values of NAMES that `host` has (role defaults included)."""
    if host not in inv.hosts:
        raise hostvars.InventoryError(f"inventory {inv.path}: no host {host!r}")
    values: dict[str, Any] = {}
    unresolved: dict[str, str] = {}
    for name in NAMES:
        if not inv.has(host, name):
            continue
        try:
            values[name] = inv.get(host, name)
        except hostvars.InventoryError as exc:
            unresolved[name] = str(exc)
    kept = hostvars.public(values)
    kept.update({k: v for k, v in values.items() if k in NOT_SECRET})
    kept[UNRESOLVED] = {k: v for k, v in unresolved.items()
                        if k in NOT_SECRET or not hostvars.SECRET.search(k)}
    kept[SOURCE] = f"{inv.path} host {host}"
    return kept


def default_host(inv: hostvars.Inventory, target_name: str | None) -> str:
    """The inventory host a run is about: the target's name when the inventory has it, else
    the inventory's only host; anything else is ambiguous and an error."""
    if target_name and target_name in inv.hosts:
        return target_name
    if len(inv.hosts) == 1:
        return inv.hosts[0]
    named = f" and none is called {target_name!r}" if target_name else ""
    raise hostvars.InventoryError(
        f"inventory {inv.path} has {len(inv.hosts)} hosts{named}: pass --inventory-host"
    )


def missing(expected: dict[str, Any], name: str) -> str:
    """One line saying why `name` is not among the expectations."""
    source = expected.get(SOURCE, "the inventory")
    why = expected.get(UNRESOLVED, {}).get(name)
    if why:
        return f"{source}: {name} could not be templated: {why}"
    if name not in NAMES:
        return (f"{name} is not an expectation the suite reads"
                " (add it to hostaccess/expectations.py)")
    return f"{source} has no value for {name}: set it in the inventory"
