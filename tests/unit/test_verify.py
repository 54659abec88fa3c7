"""`invoke verify` without a VM: targets from inventories, the pytest command, and the whole
pipeline (posture conftest + result plugin + report) against the local machine through
testinfra's local backend, with a throw-away test file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from toolkit.assurance import report, report_signing, verify
from toolkit.controls import registry

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parents[2]

DEMO = """
import pytest

@pytest.mark.control("NET-01")
def test_host_answers(host, is_lab, expected):
    assert host.run("true").rc == 0
    assert is_lab is False and expected["signer_client_account_prefix"] == "sign-"

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
        "toolkit.assurance.pytest_verify",
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
    # The host's facts, read once through the suite's own connection (here: local).
    facts = run["host_facts"]
    assert facts["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert facts["kernel"].startswith("Linux ") and facts["os"] and facts["hostname"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", facts["clock"])

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
    from hostaccess import connection, hostvars

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
    from hostaccess import connection, hostvars

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


def _fake_run(*tests: tuple[str, str, str]) -> dict[str, Any]:
    return {"tests": [{"nodeid": f"tests/posture/{n}", "outcome": o, "duration": 0.1,
                       "controls": [c], "lab_only": None, "message": ""} for n, o, c in tests],
            "duration": 2.0, "exitstatus": 0, "collect_errors": [],
            "host_facts": {"os": "Debian GNU/Linux 12 (bookworm)", "kernel": "Linux 6.1.0",
                           "boot_id": "b-1", "hostname": "h1", "clock": "2026-12-01T17:00:00Z"}}


PASSING = ("test_ssh.py::test_root_login_is_refused", "passed", "SSH-02")
FAILING = ("test_ssh.py::test_root_login_is_refused", "failed", "SSH-02")
UNREACHABLE = {"tests": [], "exitstatus": 4, "duration": 1.0,
               "error": "run stopped: unreachable: ssh://h1: Connection refused"}


def _runs(monkeypatch: pytest.MonkeyPatch, *runs: dict[str, Any]) -> None:
    """verify.run_tests answers these runs in turn, without a host."""
    queue = list(runs)
    monkeypatch.setattr(verify, "run_tests", lambda *a, **k: queue.pop(0))


def _one_host(tmp_path: Path) -> str:
    return _inventory(tmp_path, "all:\n  hosts:\n    h1: {ansible_host: 127.0.0.1, ansible_port: 9}\n")


def test_each_run_gets_its_own_directory_and_latest_points_to_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inv, reports = _one_host(tmp_path), tmp_path / "reports"
    _runs(monkeypatch, _fake_run(PASSING), _fake_run(FAILING))
    assert verify.verify(inv, report_dir=reports) == 0
    assert verify.verify(inv, report_dir=reports, diff=True) == 1
    runs = sorted(p.name for p in (reports / "h1").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all(re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", r) for r in runs), runs
    latest = reports / "h1" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == runs[1]  # relative: copyable
    assert sorted(p.name for p in latest.iterdir()) == [
        "SHA256SUMS", "h1.html", "h1.json", "h1.junit.xml", "h1.md"]
    model = json.loads((latest / "h1.json").read_text())
    assert model["schema_version"] == report.SCHEMA_VERSION and model["run"] == runs[1]
    assert model["provenance"]["inventory"] == str(Path(inv).resolve())
    assert model["provenance"]["operator"]["user"]
    assert model["provenance"]["host_facts"]["boot_id"] == "b-1"
    assert model["signature"]["signed"] is False
    assert model["changes"]["previous"]["run"] == runs[0]
    assert ("control", "SSH-02", "passed", "failed") in [
        (i["what"], i["id"], i["before"], i["after"]) for i in model["changes"]["items"]]
    assert "Changes since the previous run" in (latest / "h1.md").read_text()
    out = capsys.readouterr().out
    assert "==> changes since the previous run" in out
    assert "  control SSH-02: passed -> failed" in out
    assert "(NOT signed: no signing key given" in out
    index = json.loads((reports / "index.json").read_text())
    assert index["hosts"][0]["report"] == str(reports / "h1" / runs[1] / "h1.md")
    assert f"[h1/{runs[1]}/h1.md](h1/{runs[1]}/h1.md)" in (reports / "index.md").read_text()
    assert not list((reports / "h1").glob(".*"))  # no staging directory left behind


def test_an_unreachable_host_keeps_its_last_good_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inv, reports = _one_host(tmp_path), tmp_path / "reports"
    _runs(monkeypatch, _fake_run(PASSING), UNREACHABLE)
    assert verify.verify(inv, report_dir=reports) == 0
    latest = reports / "h1" / "latest"
    good, target = (latest / "h1.md").read_text(), os.readlink(latest)
    assert verify.verify(inv, report_dir=reports) == verify.UNREACHABLE_EXIT
    assert os.readlink(latest) == target and (latest / "h1.md").read_text() == good
    assert len([p for p in (reports / "h1").iterdir() if p.name[0].isdigit()]) == 1
    record = json.loads((reports / "h1" / "unreachable.json").read_text())
    assert record["verdict"] == "UNREACHABLE" and "Connection refused" in record["reason"]
    index = json.loads((reports / "index.json").read_text())
    assert index["hosts"] == [{"host": "h1", "verdict": "UNREACHABLE", "report": None}]
    # Reached again: the record goes, a new run becomes latest.
    _runs(monkeypatch, _fake_run(PASSING))
    assert verify.verify(inv, report_dir=reports) == 0
    assert not (reports / "h1" / "unreachable.json").exists()
    assert os.readlink(latest) != target


def _key(tmp_path: Path, name: str) -> Path:
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True)
    return key


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_a_signed_run_verifies_and_a_tampered_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inv, reports = _one_host(tmp_path), tmp_path / "reports"
    key = _key(tmp_path, "ops")
    _runs(monkeypatch, _fake_run(PASSING))
    assert verify.verify(inv, report_dir=reports, sign_key=str(key)) == 0
    latest = reports / "h1" / "latest"
    model = json.loads((latest / "h1.json").read_text())
    assert model["signature"]["signed"] is True
    assert model["signature"]["key"].startswith("SHA256:")
    assert "signed by the operator's key SHA256:" in (latest / "h1.md").read_text()
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"ops@example.org {(tmp_path / 'ops.pub').read_text()}")
    ok = report_signing.check(reports / "h1", allowed)  # a host's directory: its latest run
    assert ok.principals == ("ops@example.org",)
    assert set(ok.files) == {"h1.json", "h1.md", "h1.html", "h1.junit.xml"}
    md = latest / "h1.md"
    md.write_text(md.read_text().replace("PASS", "PASS (reviewed)"))
    with pytest.raises(report_signing.NotVerified, match=r"h1\.md was changed after it was signed"):
        report_signing.check(latest, allowed)


def test_a_signing_key_that_cannot_sign_stops_verify_before_any_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _runs(monkeypatch)  # any run would fail: the queue is empty
    inv = _one_host(tmp_path)
    (tmp_path / "not-a-key").write_text("hello\n")
    for key, why in (("missing", "no such file"), ("not-a-key", "not an SSH key")):
        with pytest.raises(verify.VerifyError, match=f"signing key.*{why}"):
            verify.verify(inv, report_dir=tmp_path / "r", sign_key=str(tmp_path / key))
    assert not (tmp_path / "r").exists()


def test_the_signing_key_can_come_from_the_inventory(tmp_path: Path) -> None:
    inv = _inventory(tmp_path, "all:\n  hosts:\n    h1:\n"
                               "      verify_report_signing_key: ~/.ssh/id_ed25519\n")
    assert verify.resolve_targets(inv, None)[0].signing_key == "~/.ssh/id_ed25519"
