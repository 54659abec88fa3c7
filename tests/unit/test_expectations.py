"""hostaccess.expectations and the posture suite's use of it: what a host is expected to be comes
from its inventory, the same test code runs for every inventory, and a test that does not apply
skips with its reason instead of passing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hostaccess import expectations, hostvars

ROOT = Path(__file__).resolve().parents[2]

HOSTS = "all:\n  hosts:\n    h1: {}\n"
SITE = """
base_admin_users:
  - {name: ops, public_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@ws"]}
signer_client_account_prefix: build-
signer_clients:
  - {name: jenkins, ssh_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJenk jenkins", from: [198.51.100.7]}
signer_custodians:
  - {name: carol, ssh_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICarol carol", from: [192.0.2.0/24]}
  - {name: dave, ssh_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDave dave", from: [192.0.2.0/24]}
token_backend: hardware
token_module: /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so
token_user_pin: "not-for-the-suite"
ansible_become_password: "not-for-the-suite"
"""


def _inventory(tmp_path: Path, group_vars: str = SITE, hosts: str = HOSTS) -> Path:
    (tmp_path / "group_vars" / "all").mkdir(parents=True)
    (tmp_path / "hosts.yml").write_text(hosts)
    (tmp_path / "group_vars" / "all" / "site.yml").write_text(group_vars)
    return tmp_path


def test_values_come_from_the_inventory_with_role_defaults_underneath(tmp_path: Path) -> None:
    e = expectations.for_host(hostvars.load(str(_inventory(tmp_path))), "h1")
    assert e["signer_client_account_prefix"] == "build-"
    assert [c["name"] for c in e["signer_custodians"]] == ["carol", "dave"]
    assert e["token_backend"] == "hardware"
    assert e["token_softhsm_store"] == "/var/lib/signer/token"  # roles/token/defaults
    assert e["token_pin_file"] == "/etc/signer/pin"  # a path, not a PIN
    assert e[expectations.SOURCE].endswith("host h1")


def test_no_secret_is_read(tmp_path: Path) -> None:
    e = expectations.for_host(hostvars.load(str(_inventory(tmp_path))), "h1")
    assert "not-for-the-suite" not in json.dumps(e)
    assert not [n for n in expectations.NAMES
                if hostvars.SECRET.search(n) and n not in expectations.NOT_SECRET]


def test_a_value_that_cannot_be_templated_is_named_with_its_reason(tmp_path: Path) -> None:
    inv = _inventory(tmp_path, SITE + "usb_allowed_devices: \"{{ lookup('file', '/nonexistent/ids') }}\"\n")
    e = expectations.for_host(hostvars.load(str(inv)), "h1")
    assert "usb_allowed_devices" not in e
    assert "usb_allowed_devices" in expectations.missing(e, "usb_allowed_devices")
    assert "could not be templated" in expectations.missing(e, "usb_allowed_devices")
    assert "has no value for verify_vantage_points" in expectations.missing(
        e, "verify_vantage_points")


def test_the_host_is_the_target_name_else_the_only_one(tmp_path: Path) -> None:
    one = hostvars.load(str(_inventory(tmp_path / "one")))
    assert expectations.default_host(one, None) == "h1"
    assert expectations.default_host(one, "h1") == "h1"
    two = hostvars.load(str(_inventory(tmp_path / "two", hosts="all:\n  hosts:\n    a: {}\n    b: {}\n")))
    assert expectations.default_host(two, "b") == "b"
    with pytest.raises(hostvars.InventoryError, match="2 hosts and none is called 'c'"):
        expectations.default_host(two, "c")
    with pytest.raises(hostvars.InventoryError, match="no host 'c'"):
        expectations.for_host(two, "c")


def _posture(tmp_path: Path, inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The posture suite with this inventory against the controller itself (local://, no sudo:
    nothing is changed, the tests below only read)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--target=local://", "--no-sudo", f"--inventory={inventory}", "-rfs", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_the_suite_is_parametrised_by_the_inventory(tmp_path: Path) -> None:
    r = _posture(tmp_path, _inventory(tmp_path), "--collect-only", "-q",
                 "tests/posture/test_signer.py", "tests/posture/test_base.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_forced_command_accounts_only_have_restricted_keys[build-jenkins]" in r.stdout
    assert "test_forced_command_accounts_only_have_restricted_keys[carol]" in r.stdout
    assert "test_admin_keys_are_private_and_sudo_is_logged[ops]" in r.stdout
    assert "[alice]" not in r.stdout and "[admin]" not in r.stdout


def test_a_bad_inventory_is_one_line_before_any_test(tmp_path: Path) -> None:
    r = _posture(tmp_path, tmp_path / "nope", "--collect-only", "tests/posture/test_usb.py")
    assert r.returncode != 0
    assert "posture expectations: inventory" in r.stderr and "no such file" in r.stderr, r.stderr


def test_a_hardware_token_host_skips_the_softhsm_store_and_checks_the_token(tmp_path: Path) -> None:
    """On a hardware-token host the SoftHSM2 store test skips with its reason, and the test that
    other accounts cannot open the token no longer passes without looking: here (the
    controller, no token, no token owner) it fails, where it used to pass."""
    r = _posture(tmp_path, _inventory(tmp_path), "tests/posture/test_signer.py", "-k",
                 "test_token_store_belongs_to_the_daemon_user_only or "
                 "test_other_accounts_cannot_open_the_token")
    out = r.stdout
    assert "SKIPPED" in out and "token_backend is hardware, there is no SoftHSM2 store" in out, out
    # once per forced-command account: build-jenkins, carol, dave
    assert "3 failed" in out and "1 skipped" in out, out
    assert "FAILED tests/posture/test_signer.py::test_other_accounts_cannot_open_the_token" in out
