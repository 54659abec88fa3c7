"""The signer role validates the values of its authorized_keys lines before it writes anything.

A newline in a key used to add a line of the inventory's choosing (no `restrict`, no forced
command) and a quote in a name or a `from` pattern ended the option early. The role's check
runs here for real: one local ansible-playbook run includes `signer` `tasks_from: validate`
once per case (block/rescue), the way the deploy play does before the token role; the rule
itself and inventory.check's use of it are tested directly."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolkit.runner import inventory_check

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "roles/signer/filter_plugins/signer_authorized_keys.py"
# The production example's keys: real OpenSSH public keys (ed25519 and a FIDO2 one).
BUILD = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHaMB9v2DK9XRCVduv8pPF0qwvNBivtqxgjkXhw+M5BT "
         "jenkins01@build")
CAROL = ("sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIHGlfnL7HQ9Z"
         "ZUvEfAK/AS64olnaOPLaMuBRspW/ygbEAAAABHNzaDo= carol@workstation")


def _rule() -> Any:
    spec = importlib.util.spec_from_file_location("signer_authorized_keys", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _client(**kw: Any) -> dict[str, Any]:
    return {"name": "build", "ssh_key": BUILD, "from": ["198.51.100.10", "2001:db8::/64"], **kw}


def _custodian(**kw: Any) -> dict[str, Any]:
    return {"name": "carol", "ssh_key": CAROL, "from": ["192.0.2.0/24"], **kw}


# case -> (signer_clients, signer_custodians, extra vars, what the failure must name)
CASES: dict[str, tuple[list[Any], list[Any], dict[str, str], str | None]] = {
    "good": ([_client()], [_custodian()], {}, None),
    "trailing-newline-is-trimmed": ([_client(ssh_key=BUILD + "\n")], [_custodian()], {}, None),
    "newline-in-key": ([_client(ssh_key=BUILD + "\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHaMB9v2"
                                "DK9XRCVduv8pPF0qwvNBivtqxgjkXhw+M5BT evil")],
                       [_custodian()], {}, "signer_clients[build].ssh_key: more than one line"),
    "quote-in-name": ([_client(name='build",command="/bin/sh')], [_custodian()], {},
                      "signer_clients[0].name"),
    "unknown-key-type": ([_client()], [_custodian(ssh_key="ssh-dss AAAAB3NzaC1kc3MAAACBAP carol")],
                         {}, "signer_custodians[carol].ssh_key: unknown key type 'ssh-dss'"),
    "key-blob-of-another-type": ([_client(ssh_key=BUILD.replace("ssh-ed25519", "ssh-rsa", 1))],
                                 [_custodian()], {}, "signer_clients[build].ssh_key: the key says"),
    "options-before-the-key": ([_client(ssh_key='command="/bin/sh" ' + BUILD)], [_custodian()],
                               {}, "signer_clients[build].ssh_key: unknown key type"),
    "quote-in-from": ([_client(**{"from": ['198.51.100.10",command="/bin/sh']})], [_custodian()],
                      {}, "signer_clients[build].from"),
    "empty-from": ([_client()], [_custodian(**{"from": []})], {},
                   "signer_custodians[carol].from: a non-empty list"),
    "space-in-venv": ([_client()], [_custodian()], {"signer_venv": "/opt/signer/venv --x"},
                      "signer_venv"),
    "space-in-socket": ([_client()], [_custodian()], {"signer_socket": "/run/s.sock --x"},
                        "signer_socket"),
    "client-account-too-long": ([_client(name="b" * 28)], [_custodian()], {},
                                "its account 'sign-" + "b" * 28 + "' is longer than 32"),
    "client-account-is-a-custodians": ([_client()], [_custodian(name="sign-build")], {},
                                       "account 'sign-build': two forced-command accounts"),
    "bad-account-prefix": ([_client()], [_custodian()],
                           {"signer_client_account_prefix": "Sign "},
                           "signer_client_account_prefix"),
}


def _play(out: Path) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for case, (clients, custodians, extra, _) in CASES.items():
        record = "{{ outcome | combine({%s: %s}) }}"
        tasks.append({
            "name": case,
            "block": [
                {"ansible.builtin.include_role": {"name": "signer", "tasks_from": "validate"},
                 "vars": {"signer_clients": clients, "signer_custodians": custodians, **extra}},
                {"ansible.builtin.set_fact": {"outcome": record % (json.dumps(case), "'ok'")}},
            ],
            "rescue": [
                {"ansible.builtin.set_fact": {
                    "outcome": record % (json.dumps(case), "ansible_failed_result.msg")}},
            ],
        })
    tasks.append({"ansible.builtin.copy": {"content": "{{ outcome | to_json }}",
                                           "dest": str(out), "mode": "0600"}})
    return [{"hosts": "localhost", "connection": "local", "gather_facts": False,
             "vars": {"outcome": {}}, "tasks": tasks}]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("validate")
    (d / "play.yml").write_text(yaml.safe_dump(_play(d / "outcomes.json"), width=1000))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROOT / "roles"))
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", "localhost,", str(d / "play.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    result: dict[str, str] = json.loads((d / "outcomes.json").read_text())
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_the_role_refuses_a_bad_entry_by_name_before_writing(outcomes: dict[str, str],
                                                              case: str) -> None:
    want = CASES[case][3]
    got = outcomes[case]
    if want is None:
        assert got == "ok", got
        return
    assert got.startswith("signer: refusing to write authorized_keys: "), got
    assert want in got, got


def test_the_check_comes_before_anything_is_written() -> None:
    """First in the role, and in the deploy play before anything writes (after the read-only
    platform check), before the token role writes files."""
    main = yaml.safe_load((ROOT / "roles/signer/tasks/main.yml").read_text())
    assert main[0]["ansible.builtin.import_tasks"] == "validate.yml"
    assert "always" in main[0]["tags"]
    [play] = yaml.safe_load((ROOT / "playbooks/deploy.yml").read_text())
    included = [(t["ansible.builtin.include_role"]["name"],
                 t["ansible.builtin.include_role"].get("tasks_from"))
                for t in play["pre_tasks"] if "ansible.builtin.include_role" in t]
    assert included[:2] == [("preflight", "platform"), ("signer", "validate")]
    # the roles that write come after every pre-task, the token first
    [deploy] = play["tasks"]
    assert [t["ansible.builtin.import_role"]["name"] for t in deploy["block"]] == ["token", "signer"]


@pytest.mark.parametrize(("pattern", "ok"), [
    ("198.51.100.10", True), ("2001:db8::/64", True), ("*.build.example.org", True),
    ("!10.0.0.1", True), ('10.0.0.1"', False), ("10.0.0.1,10.0.0.2", False),
    ("10.0.0.1 ", False), ("", False), ("10.0.0.1\n", False),
])
def test_from_patterns(pattern: str, ok: bool) -> None:
    assert (_rule().from_problems([pattern]) == []) is ok


def test_inventory_check_applies_the_roles_from_rule() -> None:
    problems = inventory_check.cross_rules(
        [_client(**{"from": ['10.0.0.1",command="/bin/sh']})], [_custodian()], [])
    assert any(p.startswith("signer_clients[build].from: ") for p in problems), problems
    assert inventory_check.cross_rules([_client()], [_custodian()], []) == []
