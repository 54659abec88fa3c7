"""`invoke verify` without a VM: targets from inventories, the pytest command, and the whole
pipeline (posture conftest + result plugin + report) against the local machine through
testinfra's local backend, with a throw-away test file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
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


def test_no_target_and_no_host_skips_with_the_reason(suite: pytest.Pytester) -> None:
    run = run_suite(suite, inventory=None)  # inventory/lab, its host's ssh config absent
    assert {t["outcome"] for t in run["tests"]} == {"skipped"}
    assert "does not exist; is the host up?" in run["tests"][0]["message"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_unreachable_host_stops_the_run_with_one_line(suite: pytest.Pytester) -> None:
    config = suite.path / "ssh_config"
    config.write_text("Host *\n  BatchMode yes\n  ConnectTimeout 3\n")
    run = run_suite(suite, "--target=ssh://nowhere.invalid", f"--ssh-config={config}")
    assert run["tests"] == [] or all(t["outcome"] != "passed" for t in run["tests"])
    assert run["error"].startswith("run stopped: cannot reach ssh://nowhere.invalid")


# --- targets --------------------------------------------------------------------------------


def test_default_inventory_is_the_lab_and_needs_it_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNLAB_STATE", str(tmp_path / "none"))
    assert verify.is_lab_inventory(None)
    assert verify.is_lab_inventory(str(ROOT / "inventory" / "lab"))
    assert not verify.is_lab_inventory("inventory/production")
    with pytest.raises(verify.VerifyError, match="no running lab"):
        verify.resolve_targets(None, None, tmp_path)


def test_lab_target_uses_the_labs_ssh_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNLAB_STATE", str(tmp_path))
    lab_json = tmp_path / "lab.json"
    facts = {
        "instance": "lab0",
        "state_dir": str(tmp_path),
        "ssh": {"config": str(tmp_path / "ssh_config"), "alias": "signhost"},
    }
    lab_json.write_text(json.dumps(facts))
    since = lab_json.stat().st_mtime
    assert verify.resolve_targets(None, None, tmp_path) == [
        verify.Target("signhost", "ssh://signhost", "lab", tmp_path / "ssh_config", since)
    ]
    # Another instance reports under its own name: parallel labs do not overwrite reports.
    lab_json.write_text(json.dumps({**facts, "instance": "lab3"}))
    [t] = verify.resolve_targets(None, "signhost", tmp_path)
    assert (t.name, t.spec) == ("signhost-lab3", "ssh://signhost")
    with pytest.raises(verify.VerifyError, match="no host matches"):
        verify.resolve_targets(None, "other*", tmp_path)


def fake_inventory(monkeypatch: pytest.MonkeyPatch, hostvars: dict[str, Any]) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        out = json.dumps({"_meta": {"hostvars": hostvars}})
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(verify.subprocess, "run", run)
    return calls


def test_production_inventory_gets_a_generated_ssh_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_inventory(
        monkeypatch,
        {
            "sign1": {
                "ansible_host": "10.0.0.5",
                "ansible_port": 2222,
                "ansible_user": "ops",
                "ansible_ssh_private_key_file": "/keys/ops",
            },
            "sign2": {"ansible_ssh_common_args": "-F /etc/ssh/sign2.conf"},
            "labhost": {"verify_kind": "lab"},
        },
    )
    targets = verify.resolve_targets("inventory/prod", "sign*", tmp_path)
    assert calls[0][-5:] == ["-i", "inventory/prod", "--list", "--limit", "sign*"]
    assert targets == [
        verify.Target("labhost", "ssh://labhost", "lab", tmp_path / ".ssh_config"),
        verify.Target("sign1", "ssh://sign1", "production", tmp_path / ".ssh_config"),
        verify.Target("sign2", "ssh://sign2", "production", Path("/etc/ssh/sign2.conf")),
    ]
    config = (tmp_path / ".ssh_config").read_text()
    assert (
        "Host sign1\n  HostName 10.0.0.5\n  Port 2222\n  User ops\n  IdentityFile /keys/ops"
        in config
    )
    assert "ControlMaster auto" in config and "ControlPersist" in config
    assert (tmp_path / ".ssh_config").stat().st_mode & 0o077 == 0


def test_templated_connection_vars_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_inventory(monkeypatch, {"sign1": {"ansible_host": "{{ lookup('env', 'X') }}"}})
    with pytest.raises(verify.VerifyError, match="Jinja"):
        verify.resolve_targets("inventory/prod", None, tmp_path)


def test_auditor_figures_older_than_the_lab_vm_are_not_merged(tmp_path: Path) -> None:
    (tmp_path / "signhost.auditors.json").write_text('{"lynis": {"figures": {}}}')
    now = (tmp_path / "signhost.auditors.json").stat().st_mtime
    fresh = verify.Target("signhost", "ssh://signhost", "lab", None, since=now - 10)
    stale = verify.Target("signhost", "ssh://signhost", "lab", None, since=now + 10)
    assert verify.load_auditors(tmp_path, fresh) == {"lynis": {"figures": {}}}
    assert verify.load_auditors(tmp_path, stale) is None


def test_pytest_command() -> None:
    t = verify.Target("signhost", "ssh://signhost", "lab", Path("/s/ssh_config"))
    cmd = verify.pytest_command(t, Path("/r/x.json"), "ssh and not slow")
    assert cmd[1:4] == ["-m", "pytest", "tests/posture"]
    for arg in (
        "--target=ssh://signhost",
        "--target-kind=lab",
        "--ssh-config=/s/ssh_config",
        "--verify-json=/r/x.json",
        "-v",
    ):
        assert arg in cmd
    assert cmd[-2:] == ["-k", "ssh and not slow"]


@pytest.mark.skipif(shutil.which("sudo") is not None, reason="needs a machine without sudo")
def test_a_host_where_sudo_fails_stops_the_run_with_one_line(suite: pytest.Pytester) -> None:
    out = suite.path / "results.json"
    suite.runpytest_subprocess(
        "tests/posture", "-p", "toolkit.pytest_verify", f"--verify-json={out}",
        "--target=local://", "--target-kind=production",
        f"--inventory={suite.path / 'inventory-production'}",
    )  # fmt: skip
    run = json.loads(out.read_text())
    assert run["error"].startswith("run stopped: local://: sudo does not give root")
