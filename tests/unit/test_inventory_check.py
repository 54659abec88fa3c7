"""inventory.check: small inventories that pass, and one that breaks each rule.

Real parts: Ansible reads and templates the inventories, Ansible's own validator checks the
roles' argument specs, ssh-keygen makes and reads the keys.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hostaccess import hostvars
from toolkit.runner import inventory_check

ROOT = Path(__file__).resolve().parents[2]
HOST = "sign01"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real public key lines, one per person or machine."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("op", "build", "alice", "bob", "carol"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test",
             "-f", str(d / name)],
            check=True,
        )
        out[name] = (d / f"{name}.pub").read_text().strip()
    return out


def _vars(keys: dict[str, str], tmp: Path) -> dict[str, Any]:
    return {
        "ansible_user": "admin",
        "token_pin_dir": str(tmp / "pins"),
        "preflight_operator_public_keys": [keys["op"]],
        "base_admin_users": [{"name": "admin", "public_keys": [keys["op"]], "sudo": True}],
        "firewall_admin_networks": ["192.0.2.0/24"],
        "signer_clients": [{"name": "build", "ssh_key": keys["build"], "from": ["192.0.2.9"]}],
        "signer_custodians": [
            {"name": "alice", "ssh_key": keys["alice"], "from": ["192.0.2.0/24"]},
            {"name": "bob", "ssh_key": keys["bob"], "from": ["192.0.2.0/24"]},
        ],
        "signer_profiles": [
            {"name": "dev", "algorithm": "ecdsa-p256", "formats": ["raw"], "max_size": 1024,
             "clients": ["build"], "approvals": 0, "budget_count": 10, "budget_window": 60,
             "cert": "selfsigned", "subject": "CN=dev"},
            {"name": "release", "algorithm": "ecdsa-p256", "formats": ["cms", "raw"],
             "max_size": 1024, "clients": ["build"], "approvals": 2,
             "custodians": ["alice", "bob"], "budget_count": 5, "budget_window": 86400,
             "cert": "ca", "subject": "CN=release"},
        ],
    }


def _write(tmp: Path, host_vars: dict[str, Any], group: str = "signing_hosts") -> str:
    inv = tmp / "inv"
    inv.mkdir(exist_ok=True)
    data = {"all": {"children": {group: {"hosts": {HOST: None}}}}}
    (inv / "hosts.yml").write_text(yaml.safe_dump(data))
    (inv / "host_vars").mkdir(exist_ok=True)
    (inv / "host_vars" / f"{HOST}.yml").write_text(yaml.safe_dump(host_vars))
    return str(inv)


def _problems(tmp: Path, host_vars: dict[str, Any], **kw: Any) -> list[str]:
    result = inventory_check.check(_write(tmp, host_vars, **kw))
    return result.problems[HOST]


@pytest.fixture()
def good(keys: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    return copy.deepcopy(_vars(keys, tmp_path))


def test_a_complete_inventory_passes(good: dict[str, Any], tmp_path: Path) -> None:
    result = inventory_check.check(_write(tmp_path, good))
    assert result.ok, result.lines()
    assert result.hosts == [HOST]
    assert inventory_check.report(result).endswith(": 1 host: OK")


def test_a_wrong_type_fails_the_roles_argument_spec(good: dict[str, Any], tmp_path: Path) -> None:
    good["signer_checkpoint_interval"] = "often"
    good["signer_pin_source"] = "usb-stick"
    problems = _problems(tmp_path, good)
    assert any(p.startswith("signer: ") and "signer_checkpoint_interval" in p for p in problems)
    assert any("signer_pin_source" in p and "usb-stick" in p for p in problems), problems


def test_a_harden_role_spec_is_checked_too(good: dict[str, Any], tmp_path: Path) -> None:
    good["ssh_rollback_seconds"] = "soon"
    assert any(p.startswith("ssh: ") and "ssh_rollback_seconds" in p
               for p in _problems(tmp_path, good))


def test_a_failing_lookup_is_the_hosts_error_with_the_variable(
    good: dict[str, Any], tmp_path: Path
) -> None:
    good["preflight_operator_public_keys"] = [
        "{{ lookup('ansible.builtin.file', '/nonexistent/id_ed25519.pub') }}"
    ]
    problems = _problems(tmp_path, good)
    assert problems == [
        "preflight_operator_public_keys: The 'file' lookup had an issue accessing the file "
        "'/nonexistent/id_ed25519.pub'. file not found"
    ]


def test_one_custodian_key_under_two_names(good: dict[str, Any], tmp_path: Path,
                                          keys: dict[str, str]) -> None:
    good["signer_custodians"][1]["ssh_key"] = keys["alice"].replace("alice@test", "bob@test")
    assert _problems(tmp_path, good) == [
        "signer_custodians: one SSH key under 2 names: custodian alice, custodian bob"
    ]


def test_one_custodian_key_in_another_encoding_under_two_names(good: dict[str, Any],
                                                               tmp_path: Path) -> None:
    """The same RSA key, its exponent written with a leading zero byte under the second name:
    ssh-keygen reads both lines as one key, so they are one key holder."""
    from tests.signer.test_config import rsa_key_lines

    line, again = rsa_key_lines()
    good["signer_custodians"][0]["ssh_key"] = line + " alice@test"
    good["signer_custodians"][1]["ssh_key"] = again + " bob@test"
    assert _problems(tmp_path, good) == [
        "signer_custodians: one SSH key under 2 names: custodian alice, custodian bob"
    ]


def test_a_custodian_holding_the_build_key(good: dict[str, Any], tmp_path: Path,
                                          keys: dict[str, str]) -> None:
    good["signer_custodians"][1]["ssh_key"] = keys["build"]
    assert _problems(tmp_path, good) == [
        "signer_custodians: one SSH key under 2 names: client build, custodian bob"
    ]


def test_a_profile_names_an_undefined_client(good: dict[str, Any], tmp_path: Path) -> None:
    good["signer_profiles"][0]["clients"] = ["build", "ci"]
    assert _problems(tmp_path, good) == [
        "signer_profiles[dev].clients: 'ci' is not in signer_clients"
    ]


def test_a_profile_names_an_undefined_custodian(good: dict[str, Any], tmp_path: Path) -> None:
    good["signer_profiles"][1]["custodians"] = ["alice", "carol"]
    assert _problems(tmp_path, good) == [
        "signer_profiles[release].custodians: 'carol' is not in signer_custodians"
    ]


def test_more_approvals_than_custodians(good: dict[str, Any], tmp_path: Path) -> None:
    good["signer_profiles"][1]["approvals"] = 3
    assert _problems(tmp_path, good) == [
        "signer_profiles[release].approvals: 3 approvals but 2 custodians"
    ]


@pytest.mark.parametrize(
    ("var", "index", "bad"),
    [("signer_clients", 0, "Build"), ("signer_custodians", 0, "alice smith"),
     ("signer_profiles", 0, "-dev")],
)
def test_names_follow_the_signers_rule(good: dict[str, Any], tmp_path: Path, var: str,
                                       index: int, bad: str) -> None:
    old = good[var][index]["name"]
    good[var][index]["name"] = bad
    for p in good["signer_profiles"]:  # keep the references consistent: only the name is bad
        for ref in ("clients", "custodians"):
            p[ref] = [bad if n == old else n for n in p.get(ref, [])]
    problems = _problems(tmp_path, good)
    assert problems == [f"{var}: name {bad!r} is not a signer name ([a-z][a-z0-9_-]{{0,63}})"]


def test_a_key_entry_with_two_lines(good: dict[str, Any], tmp_path: Path,
                                    keys: dict[str, str]) -> None:
    good["signer_custodians"][0]["ssh_key"] = keys["alice"] + "\n" + keys["carol"]
    assert _problems(tmp_path, good) == [
        "signer_custodians[alice].ssh_key: more than one line (one public key per entry)"
    ]


def test_a_key_that_ssh_keygen_cannot_read(good: dict[str, Any], tmp_path: Path) -> None:
    good["base_admin_users"][0]["public_keys"].append("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBAD x")
    assert _problems(tmp_path, good) == [
        "base_admin_users[admin].public_keys[1]: not a valid public key (ssh-keygen cannot read it)"
    ]


def test_a_placeholder_is_not_a_key(good: dict[str, Any], tmp_path: Path) -> None:
    good["preflight_operator_public_keys"] = ["ssh-ed25519 AAAA...replace... me@workstation"]
    assert _problems(tmp_path, good) == [
        "preflight_operator_public_keys[0]: not an OpenSSH public key line "
        "(type, base64 key, optional comment)"
    ]


def test_a_host_that_no_play_runs_on(good: dict[str, Any], tmp_path: Path) -> None:
    assert _problems(tmp_path, good, group="signers") == [
        "no play runs on this host (the plays run on: signing_hosts)"
    ]


def test_the_cli_lists_each_problem_on_one_line_and_fails(
    good: dict[str, Any], tmp_path: Path
) -> None:
    good["signer_profiles"][1]["approvals"] = 3
    good["signer_profiles"][0]["clients"] = ["ci"]
    inv = _write(tmp_path, good)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "inventory.check", "-i", inv],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"inventory.check: {HOST}: signer_profiles[dev].clients: 'ci' is not in signer_clients",
        f"inventory.check: {HOST}: signer_profiles[release].approvals: 3 approvals but 2 "
        "custodians",
        f"inventory.check: inventory {inv}: 1 host: 2 problem(s) on 1 host(s)",
        "inventory.check: the inventory does not pass inventory.check; nothing was run",
    ]


def test_production_example_passes() -> None:
    """The example every real inventory starts from passes the check that every task runs."""
    result = inventory_check.check(str(ROOT / "inventory" / "production.example"))
    assert result.ok, "\n".join(result.lines())


def test_an_unusable_inventory_is_an_inventory_error(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text("all:\n  hosts:\n   a: [\n")
    with pytest.raises(hostvars.InventoryError, match=r"YAML: .* line 4, column 1"):
        inventory_check.check(str(tmp_path))


def _vault_pass(tmp: Path, text: str = "vault-pw-for-the-test") -> Path:
    vpf = tmp / f"vault-pass-{len(text)}"
    vpf.write_text(text + "\n")
    return vpf


def test_a_vaulted_become_password_needs_the_right_vault_password(
    good: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vpf = _vault_pass(tmp_path)
    vaulted = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-vault"), "encrypt_string",
         "--vault-password-file", str(vpf), "--name", "ansible_become_password", "--", "s3cret"],
        capture_output=True, text=True, check=True).stdout
    inv = _write(tmp_path, good)
    (Path(inv) / "group_vars" / "all").mkdir(parents=True)
    (Path(inv) / "group_vars" / "all" / "become.yml").write_text(vaulted)
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
    assert inventory_check.check(inv).problems[HOST] == [
        "ansible_become_password: Attempting to decrypt but no vault secrets found"
        " (give --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE)"]
    wrong = _vault_pass(tmp_path, "wrong")
    assert inventory_check.check(inv, vault_password_file=str(wrong)).problems[HOST] == [
        "ansible_become_password: Decryption failed (no vault secrets were found that could "
        "decrypt) (give --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE)"]
    assert inventory_check.check(inv, vault_password_file=str(vpf)).ok
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(vpf))  # honoured like Ansible does
    assert inventory_check.check(inv).ok


def test_a_vault_file_without_its_password(good: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    vpf = _vault_pass(tmp_path)
    inv = _write(tmp_path, good)
    secret = Path(inv) / "group_vars" / "all" / "vault.yml"
    secret.parent.mkdir(parents=True)
    secret.write_text("token_so_pin: '12345678'\n")
    subprocess.run([str(Path(sys.executable).parent / "ansible-vault"), "encrypt",
                    "--vault-password-file", str(vpf), str(secret)], check=True,
                   capture_output=True)
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
    assert inventory_check.check(inv).problems[HOST] == [
        "variables: a vault file needs its password"
        " (give --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE)"]
    assert inventory_check.check(inv, vault_password_file=str(vpf)).ok


def test_a_renamed_variable_is_refused_with_its_new_name(good: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """roles/auditing became roles/auditd: an inventory still setting auditing_remote_server
    would lose its collector without a word."""
    good["auditing_remote_server"] = "192.0.2.60"
    problems = _problems(tmp_path, good)
    assert any(p.startswith("auditing_remote_server: renamed to auditd_remote_server")
               for p in problems), problems


CARD = {"name": "card", "module": "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
        "label": "EV token", "serial": "0123abcd"}
CARD_PROFILE = {"name": "ev", "token": "card", "algorithm": "rsa2048-pkcs1", "formats": ["raw"],
                "max_size": 1024, "clients": ["build"], "approvals": 0, "budget_count": 10,
                "budget_window": 60, "cert": "file", "cert_file": "/srv/ca/ev.pem",
                "key": "pkcs11:token=EV%20token;serial=0123abcd;object=sign;type=private"}


def test_a_profile_on_a_card_passes(good: dict[str, Any], tmp_path: Path) -> None:
    good["token_cards"] = [CARD]
    good["signer_profiles"].append(dict(CARD_PROFILE))
    assert _problems(tmp_path, good) == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"token": "other"}, "signer_profiles[ev].token: 'other' is not in token_cards"),
    ({"key": "sign"}, "signer_profiles[ev].key: the card key's PKCS#11 URI is required"),
    ({"cert": "ca"}, "signer_profiles[ev].cert: a card profile takes its certificate from its "
                     "CA (cert: file, cert_file: the certificate on the controller)"),
])
def test_a_card_profile_names_its_card_key_and_certificate(good: dict[str, Any], tmp_path: Path,
                                                            change: dict[str, str],
                                                            problem: str) -> None:
    good["token_cards"] = [CARD]
    good["signer_profiles"].append({**CARD_PROFILE, **change})
    assert _problems(tmp_path, good) == [problem]


@pytest.mark.parametrize(("card", "problems"), [
    ({"pin_source": "prompt", "pin_shares": 2}, []),
    ({"pin_source": "prompt"}, []),  # the whole PIN from one custodian
    ({"pin_source": "prompt", "pin_shares": 2, "pin_share_holders": ["alice", "bob"]}, []),
    ({"pin_source": "prompt", "pin_shares": 1},
     ["token_cards[card].pin_shares: 1: k-of-n shares need k >= 2 (release profile 'ev')"]),
    ({"pin_source": "prompt", "pin_shares": 3},
     ["token_cards[card].pin_shares: 3 shares needed but 2 holders (release profile 'ev')"]),
    ({"pin_source": "prompt", "pin_shares": 2, "pin_share_holders": ["alice", "mallory"]},
     ["token_cards[card].pin_share_holders: 'mallory' is not in signer_custodians"]),
    ({"pin_shares": 2}, ["token_cards[card].pin_shares: needs token_cards[card].pin_source: "
                         "prompt"]),
    ({"pin_source": "usb"}, ["value of pin_source must be one of: file, prompt, got: usb"]),
])
def test_a_cards_pin_shares_follow_the_hosts_rules(good: dict[str, Any], tmp_path: Path,
                                                   card: dict[str, Any],
                                                   problems: list[str]) -> None:
    """A card whose custodians unlock it (pin_source prompt, pin_shares k of
    pin_share_holders): refused as the host token's would be, k > n or k < 2 for a card that
    holds a release profile's key."""
    good["token_cards"] = [{**CARD, **card}]
    good["signer_profiles"].append({**CARD_PROFILE, "approvals": 2,
                                    "custodians": ["alice", "bob"]})
    found = _problems(tmp_path, good)
    assert len(found) == len(problems), found
    for f, want in zip(found, problems, strict=True):
        assert want in f, found


def _example_uncommented(tmp_path: Path, group: str, profile: str) -> tuple[Path, str]:
    """A copy of production.example with the commented profile `profile` of `group`'s
    signer.yml (and the `token_cards` after it) uncommented, as an operator would: the copy
    and the file's new text."""
    import shutil

    inv = tmp_path / "inv"
    shutil.copytree(ROOT / "inventory" / "production.example", inv)
    f = inv / "group_vars" / group / "signer.yml"
    lines = f.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"  # - name: {profile}"))
    out = lines[:start]
    for ln in lines[start:]:
        if ln.startswith("  # ") or ln.startswith("#   ") or ln == "# token_cards:":
            ln = ln.replace("  # ", "  ", 1) if ln.startswith("  # ") else ln[2:]
        out.append(ln)
    f.write_text("\n".join(out) + "\n")
    return inv, f.read_text()


def test_the_commented_card_release_profile_passes_when_uncommented(tmp_path: Path) -> None:
    """production.example's commented release profile on a card, whose PIN 2 custodians'
    shares give (pin_source prompt), uncommented as an operator would: inventory.check accepts
    it."""
    inv, text = _example_uncommented(tmp_path, "release_signers", "card-release")
    assert "- name: card-release\n    token: card-release" in text
    assert "    pin_source: prompt" in text and "token_cards:\n  - name: card-release" in text
    result = inventory_check.check(str(inv))
    assert result.ok, "\n".join(result.lines())


def test_the_commented_ev_profile_of_the_example_passes_when_uncommented(tmp_path: Path) -> None:
    """production.example's commented hardware profile (win-ev on its EV token), uncommented
    as an operator would: inventory.check accepts it."""
    inv, text = _example_uncommented(tmp_path, "online_signers", "win-ev")
    assert "- name: win-ev\n    token: ev" in text and "token_cards:\n  - name: ev" in text
    result = inventory_check.check(str(inv))
    assert result.ok, "\n".join(result.lines())


def test_split_pin_with_token_splits_the_cards_pin_for_its_holders(
        good: dict[str, Any], tmp_path: Path) -> None:
    """`invoke token.split-pin --token card`: the card's PIN (its pin_src on the controller),
    its own k and holders, the shares under token_pin_dir/shares/card, each opened by its
    holder's key alone, naming the card; a card that is not in token_cards is refused."""
    import shutil

    from invoke.exceptions import Exit as InvokeExit

    from signer import shares
    from toolkit.runner.pin_ceremony import split_pin

    if shutil.which("age") is None:
        pytest.skip("age not installed (apt install age)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for c in good["signer_custodians"]:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(keys / c["name"])], check=True)
        c["ssh_key"] = (keys / f"{c['name']}.pub").read_text().strip()
    pins = Path(good["token_pin_dir"])
    pins.mkdir(mode=0o700)
    card_pin = pins / "card-user-pin"
    card_pin.write_text("card-pin-123456\n")
    card_pin.chmod(0o600)
    good["token_cards"] = [{**CARD, "pin_source": "prompt", "pin_shares": 2}]
    good["signer_profiles"].append({**CARD_PROFILE, "approvals": 2,
                                    "custodians": ["alice", "bob"]})
    inv = _write(tmp_path, good)
    made = split_pin(inv, None, None, None, token="card")
    assert sorted(p.name for p in made) == ["alice.share.age", "bob.share.age"]
    assert all(p.parent == pins / "shares" / "card" for p in made)
    got = [shares.parse(subprocess.run(["age", "-d", "-i", str(keys / who), str(p)],
                                       capture_output=True, check=True).stdout)
           for who, p in zip(("alice", "bob"), sorted(made), strict=True)]
    assert {s.token for s in got} == {"card"} and shares.combine(got) == b"card-pin-123456"
    with pytest.raises(InvokeExit, match="--token nope: not in token_cards"):
        split_pin(inv, None, None, str(tmp_path / "other"), token="nope")
    with pytest.raises(InvokeExit, match="takes the whole PIN"):  # the host's token: file PIN
        split_pin(inv, None, None, str(tmp_path / "host"))
