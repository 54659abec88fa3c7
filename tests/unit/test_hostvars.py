"""hostaccess.hostvars: an inventory read by Ansible itself, templated per variable, role defaults under."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostaccess import hostvars

ROOT = Path(__file__).resolve().parents[2]


def _inventory(tmp_path: Path, hosts_yml: str, group_vars: str = "") -> Path:
    (tmp_path / "hosts.yml").write_text(hosts_yml)
    if group_vars:
        (tmp_path / "group_vars" / "all").mkdir(parents=True)
        (tmp_path / "group_vars" / "all" / "v.yml").write_text(group_vars)
    return tmp_path


def test_production_example_is_read_with_role_defaults_underneath() -> None:
    inv = hostvars.load(str(ROOT / "inventory" / "production.example"))
    assert inv.hosts
    host = inv.hosts[0]
    # set by the inventory (templated from base_admin_users and signer_clients, each build
    # client's account being the role's prefix + its name) ...
    allowed = inv.get(host, "ssh_allowed_users")
    assert "alice-admin" in allowed and "sign-jenkins01" in allowed and "sign" not in allowed
    # ... and a role default the inventory does not set
    assert inv.get(host, "token_pin_length") == 32


def test_inventory_values_win_over_role_defaults(tmp_path: Path) -> None:
    inv = hostvars.load(
        str(_inventory(tmp_path, "all:\n  hosts:\n    h1: {}\n", "token_label: mine\n"))
    )
    assert inv.get("h1", "token_label") == "mine"
    assert inv.get("h1", "token_pin_length") == 32  # roles/token/defaults


def test_a_broken_lookup_fails_only_the_variable_that_uses_it(tmp_path: Path) -> None:
    inv = hostvars.load(
        str(
            _inventory(
                tmp_path,
                "all:\n  hosts:\n    h1: {}\n",
                "bad: \"{{ lookup('ansible.builtin.file', '/nonexistent/key.pub') }}\"\ngood: 1\n",
            )
        )
    )
    assert inv.get("h1", "good") == 1
    with pytest.raises(hostvars.InventoryError, match="h1: bad:"):
        inv.get("h1", "bad")


def test_lookups_work_as_in_a_play(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTVARS_PROBE", "from-env")
    key = tmp_path / "k.pub"
    key.write_text("ssh-ed25519 AAAA k\n")
    (tmp_path / "inv").mkdir()
    inv = hostvars.load(
        str(
            _inventory(
                tmp_path / "inv",
                "all:\n  hosts:\n    h1: {}\n",
                "e: \"{{ lookup('ansible.builtin.env', 'HOSTVARS_PROBE') }}\"\n"
                f"f: \"{{{{ lookup('ansible.builtin.file', '{key}') }}}}\"\n",
            )
        )
    )
    assert inv.get("h1", "e") == "from-env"
    assert inv.get("h1", "f") == "ssh-ed25519 AAAA k"


def test_missing_inventory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(hostvars.InventoryError, match="no such file or directory"):
        hostvars.load(str(tmp_path / "nope"))


def test_yaml_error_is_an_error_not_no_hosts(tmp_path: Path) -> None:
    inv = _inventory(tmp_path, "all:\n  hosts:\n   a: [\n")
    with pytest.raises(hostvars.InventoryError, match="failed to parse"):
        hostvars.load(str(inv))


def test_limit_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    inv = _inventory(tmp_path, "all:\n  hosts:\n    h1: {}\n")
    with pytest.raises(hostvars.InventoryError, match="no host matches --limit 'zz'"):
        hostvars.load(str(inv), "zz")


def test_public_drops_secrets() -> None:
    values = {
        "ansible_become_password": "x",
        "token_so_pin": "y",
        "token_user_pin": "z",
        "vault_secret": "v",
        "ssh_allowed_users": ["a"],
    }
    assert hostvars.public(values) == {"ssh_allowed_users": ["a"]}


def test_a_vault_file_without_its_password_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    from ansible.parsing.vault import VaultLib, VaultSecret

    inv = _inventory(tmp_path, "all:\n  hosts:\n    h1: {}\n")
    vault = VaultLib([("default", VaultSecret(b"pw"))])
    (inv / "group_vars" / "all").mkdir(parents=True)
    (inv / "group_vars" / "all" / "vault.yml").write_bytes(vault.encrypt("x: 1\n"))
    with pytest.raises(hostvars.InventoryError, match="needs its password"):
        hostvars.load(str(inv)).raw("h1")
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    assert hostvars.load(str(inv), vault_password_file=str(pw)).get("h1", "x") == 1
