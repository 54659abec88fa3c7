"""`invoke verify` without a VM: targets from inventories, the pytest command, and the whole
pipeline (posture conftest + result plugin + report) against the local machine through
testinfra's local backend, with a throw-away test file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from toolkit import registry, report, verify

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parents[2]

DEMO = """
import pytest

@pytest.mark.control("NET-01")
def test_host_answers(host, is_lab, expected):
    assert host.run("true").rc == 0
    assert is_lab is False and expected["signer_gateway_user"] == "sign"

@pytest.mark.control("SSH-01")
def test_a_failing_check(host):
    assert host.run("false").rc == 0, "password login was accepted"

@pytest.mark.lab_only("needs the intruder namespace")
@pytest.mark.control("NET-02")
def test_from_the_intruder(host):
    raise AssertionError("must not run on production")

@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.control("NET-01")
def test_param(host, name):
    assert name
"""

INI = """
[pytest]
markers =
    control(*ids): control
    lab_only(reason): lab only
addopts = --strict-markers
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("SIGNLAB_STATE", str(pytester.path / "no-lab"))
    monkeypatch.delenv("SIGNLAB_REQUIRE_LAB", raising=False)
    pytester.makeini(INI)
    posture = pytester.mkdir("tests").joinpath("posture")
    posture.mkdir()
    shutil.copy(ROOT / "tests" / "posture" / "conftest.py", posture / "conftest.py")
    (posture / "test_demo.py").write_text(DEMO)
    # The target's inventory (the posture conftest reads its expectations from it).
    for kind in ("production", "lab"):
        inv = pytester.mkdir(f"inventory-{kind}")
        (inv / "hosts.yml").write_text(f"all:\n  hosts:\n    local:\n      verify_kind: {kind}\n")
    return pytester


def run_suite(suite: pytest.Pytester, *args: str, inventory: str | None = "production"
              ) -> dict[str, Any]:
    out = suite.path / "results.json"
    inv = [f"--inventory={suite.path / f'inventory-{inventory}'}"] if inventory else []
    suite.runpytest_subprocess(
        "tests/posture",
        "-p",
        "toolkit.pytest_verify",
        f"--verify-json={out}",
        "-v",
        "--no-sudo",
        *inv,
        *args,
    )
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_pipeline_against_a_production_kind_host(suite: pytest.Pytester) -> None:
    run = run_suite(suite, "--target=local://", "--target-kind=production")
    by = {t["nodeid"]: t for t in run["tests"]}
    assert by["tests/posture/test_demo.py::test_host_answers"]["outcome"] == "passed"
    failing = by["tests/posture/test_demo.py::test_a_failing_check"]
    assert failing["outcome"] == "failed"
    assert "password login was accepted" in failing["message"]
    lab_only = by["tests/posture/test_demo.py::test_from_the_intruder"]
    assert lab_only["outcome"] == "skipped"
    assert lab_only["message"] == "lab only: needs the intruder namespace"
    assert by["tests/posture/test_demo.py::test_param[b]"]["controls"] == ["NET-01"]

    # The real registry, but the control catalogue of this run only: NET-01 passes, SSH-01 fails.
    reg = registry.load()
    m = report.build(reg, [], run, host="local", kind="production", target="local://")
    if "NET-01" in reg.controls and "SSH-01" in reg.controls:
        assert m["controls"]["SSH-01"]["status"] == "failed"
    assert not m["ok"]


def test_the_kind_of_host_comes_from_its_inventory(suite: pytest.Pytester) -> None:
    (suite.path / "tests" / "posture" / "test_demo.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.control('NET-01')\n"
        "def test_kind(host, is_lab):\n"
        "    assert is_lab\n"
    )
    run = run_suite(suite, "--target=local://", inventory="lab")
    assert [t["outcome"] for t in run["tests"]] == ["passed"]


def test_a_target_kind_its_inventory_contradicts_is_refused(suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess(
        "tests/posture", "--no-sudo", "--target=local://", "--target-kind=production",
        f"--inventory={suite.path / 'inventory-lab'}",
    )  # fmt: skip
    assert result.ret != 0
    assert "is a lab host (verify_kind)" in result.stderr.str()


def test_a_host_that_is_not_up_stops_the_run_as_unreachable(suite: pytest.Pytester) -> None:
    """Run by hand against an inventory whose host is not there: one line, nothing passes or
    skips as if it had been checked."""
    run = run_suite(suite, inventory=None)  # inventory/lab, its host's ssh config absent
    assert run["tests"] == []
    assert run["error"].startswith("run stopped: unreachable: ssh://"), run["error"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_unreachable_host_stops_the_run_with_one_line(suite: pytest.Pytester) -> None:
    config = suite.path / "ssh_config"
    config.write_text("Host *\n  BatchMode yes\n  ConnectTimeout 3\n")
    run = run_suite(suite, "--target=ssh://nowhere.invalid", f"--ssh-config={config}")
    assert run["tests"] == [] or all(t["outcome"] != "passed" for t in run["tests"])
    assert run["error"].startswith("run stopped: unreachable: ssh://nowhere.invalid")


# --- targets --------------------------------------------------------------------------------


def test_default_inventory_is_the_lab_and_needs_it_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNLAB_STATE", str(tmp_path / "none"))
    with pytest.raises(verify.VerifyError, match=r"lab\.json"):
        verify.resolve_targets(None, None)


def _inventory(tmp_path: Path, text: str) -> str:
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "hosts.yml").write_text(text)
    return str(tmp_path / "inv")


PROD = """
all:
  children:
    signing_hosts:
      hosts:
        sign1:
          ansible_host: 10.0.0.5
          ansible_port: 2222
          ansible_user: ops
          ansible_ssh_private_key_file: /keys/ops
          ansible_ssh_common_args: "-o ProxyJump=jump@bastion.example:2200 -F {{ cfg }}"
          cfg: /etc/ssh/sign.conf
        sign2:
          ansible_become_password: s3cret
          verify_kind: lab
          verify_report_name: "{{ inventory_hostname }}-report"
"""


def test_targets_come_from_the_inventory_as_ansible_templates_it(tmp_path: Path) -> None:
    inv = _inventory(tmp_path, PROD)
    targets = verify.resolve_targets(inv, "sign*")
    assert [(t.name, t.host, t.kind) for t in targets] == [
        ("sign1", "sign1", "production"),
        ("sign2-report", "sign2", "lab"),
    ]
    assert targets[1].become_password == "s3cret" and "s3cret" not in repr(targets[1])
    with pytest.raises(verify.VerifyError, match="no host matches --limit 'nope'"):
        verify.resolve_targets(inv, "nope")


def test_the_connection_is_the_one_ansible_would_use(tmp_path: Path) -> None:
    """User, port, key and the inventory's ssh args (ProxyJump, -F), templated, all kept."""
    from toolkit import connection, hostvars

    inv = hostvars.load(_inventory(tmp_path, PROD))
    ep = connection.endpoint(inv, "sign1")
    argv = list(ep.argv)
    assert argv[0] == "ssh" and argv[-1] == "10.0.0.5"
    joined = " ".join(argv)
    for part in ("-o ProxyJump=jump@bastion.example:2200", "-F /etc/ssh/sign.conf",
                 "-o User=ops", "-o Port=2222", "-i /keys/ops", "BatchMode=yes",
                 "ControlPersist=300s"):  # the last from ansible.cfg's ssh_args
        assert part in joined, (part, joined)
    assert ep.become_password is None
    assert connection.endpoint(inv, "sign2").become_password == "s3cret"


def test_a_vaulted_become_password_is_decrypted_with_the_vault_password_file(
    tmp_path: Path,
) -> None:
    from toolkit import connection, hostvars

    vault_pw = tmp_path / "vault-pass"
    vault_pw.write_text("vault-secret\n")
    enc = subprocess.run(
        [sys.executable, "-m", "ansible.cli.vault", "encrypt_string", "--vault-password-file",
         str(vault_pw), "sudo-secret", "--name", "ansible_become_password"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    inv_dir = tmp_path / "vinv"
    (inv_dir / "host_vars").mkdir(parents=True)
    (inv_dir / "hosts.yml").write_text("all:\n  hosts:\n    h1: {ansible_host: 10.0.0.9}\n")
    (inv_dir / "host_vars" / "h1.yml").write_text(enc)
    inv = hostvars.load(str(inv_dir), vault_password_file=str(vault_pw))
    assert connection.endpoint(inv, "h1").become_password == "sudo-secret"
    with pytest.raises(hostvars.InventoryError, match="ansible_become_password"):
        connection.endpoint(hostvars.load(str(inv_dir)), "h1")


def test_pytest_command() -> None:
    t = verify.Target("signhost", "signhost", "inventory/lab", "lab")
    cmd = verify.pytest_command(t, Path("/r/x.json"), "ssh and not slow", password_fd=7)
    assert cmd[1:4] == ["-m", "pytest", "tests/posture"]
    for arg in (
        "--target=ssh://signhost",
        "--target-kind=lab",
        "--inventory=inventory/lab",
        "--inventory-host=signhost",
        "--become-password-fd=7",
        "--verify-json=/r/x.json",
        "-v",
    ):
        assert arg in cmd
    assert cmd[-2:] == ["-k", "ssh and not slow"]


def test_an_unreachable_host_keeps_its_last_good_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inv = _inventory(tmp_path, "all:\n  hosts:\n    h1: {ansible_host: 127.0.0.1, ansible_port: 9}\n")
    good = tmp_path / "reports"
    good.mkdir()
    (good / "h1.md").write_text("the last good report\n")
    monkeypatch.setattr(verify, "run_tests", lambda *a, **k: {
        "tests": [], "exitstatus": 4, "duration": 1.0,
        "error": "run stopped: unreachable: ssh://h1: Connection refused"})
    assert verify.verify(inv, report_dir=good) == verify.UNREACHABLE_EXIT
    assert (good / "h1.md").read_text() == "the last good report\n"
    record = json.loads((good / "h1.unreachable.json").read_text())
    assert record["verdict"] == "UNREACHABLE" and "Connection refused" in record["reason"]
    index = json.loads((good / "index.json").read_text())
    assert index["hosts"] == [{"host": "h1", "verdict": "UNREACHABLE", "report": None}]
