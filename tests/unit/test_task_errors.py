"""Bad input and unreachable hosts, through the real `invoke` command line.

Each failure: one line that names the problem, its exit code from toolkit.exitcodes (the
README's "Exit codes" table), and never a traceback. The unreachable host is a real one:
127.0.0.1 port 9, where nothing listens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit import exitcodes

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
INVENTORY_TASKS = ["provision", "harden", "deploy", "verify", "audit", "token.csr",
                   "inventory.check"]


def _invoke(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([INVOKE, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stderr.strip().splitlines() or [""])[-1]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(d / "k.pem"), "-out",
                    str(d / "c.pem"), "-subj", "/CN=test", "-days", "1"],
                   check=True, capture_output=True)
    return d / "c.pem"


def _task(name: str, cert: Path) -> list[str]:
    return ["token.import-cert", str(cert)] if name == "token.import-cert" else [name]


ALL = [*INVENTORY_TASKS, "token.import-cert"]


@pytest.mark.parametrize("name", ALL)
def test_a_missing_inventory(name: str, cert: Path, tmp_path: Path) -> None:
    proc = _invoke(*_task(name, cert), "-i", str(tmp_path / "nope"))
    assert proc.returncode == exitcodes.BAD_INPUT
    assert _last_line(proc) == f"{name}: inventory {tmp_path / 'nope'}: no such file or directory"


@pytest.mark.parametrize("name", ALL)
def test_a_yaml_error_in_the_inventory(name: str, cert: Path, tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text("all:\n  hosts:\n   a: [\n")
    proc = _invoke(*_task(name, cert), "-i", str(tmp_path))
    assert proc.returncode == exitcodes.BAD_INPUT
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _last_line(proc).startswith(f"{name}: inventory {tmp_path}: ")
    assert f"YAML: did not find expected node content at {tmp_path}/hosts.yml line 4, column 1" \
        in _last_line(proc)


@pytest.mark.parametrize("name", ALL)
def test_a_limit_that_matches_nothing(name: str, cert: Path, tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text("all:\n  children:\n    signing_hosts:\n"
                                        "      hosts:\n        h1: {}\n")
    proc = _invoke(*_task(name, cert), "-i", str(tmp_path), "--limit", "zz")
    assert proc.returncode == exitcodes.BAD_INPUT
    assert proc.stderr.strip() == f"{name}: inventory {tmp_path}: no host matches --limit 'zz'"


@pytest.mark.parametrize("name", ["provision", "harden", "deploy", "verify", "audit",
                                  "token.csr"])
def test_every_task_stops_on_an_inventory_that_fails_the_check(name: str, tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text("all:\n  children:\n    signing_hosts:\n"
                                        "      hosts:\n        h1:\n"
                                        "          signer_pin_source: usb-stick\n")
    proc = _invoke(name, "-i", str(tmp_path))
    assert proc.returncode == exitcodes.BAD_INPUT
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith(f"{name}: h1: signer: ") and "signer_pin_source" in line
               for line in lines), proc.stderr
    assert lines[-1] == f"{name}: the inventory does not pass inventory.check; nothing was run"
    assert "PLAY" not in proc.stdout  # nothing ran


def test_import_cert_with_a_missing_file(tmp_path: Path) -> None:
    proc = _invoke("token.import-cert", str(tmp_path / "release.pem"))
    assert proc.returncode == exitcodes.BAD_INPUT
    assert proc.stderr.strip() == (
        f"token.import-cert: {tmp_path / 'release.pem'}: No such file or directory")


def test_import_cert_with_a_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "x.pem").write_text("hello\n")
    proc = _invoke("token.import-cert", str(tmp_path / "x.pem"))
    assert proc.returncode == exitcodes.BAD_INPUT
    assert proc.stderr.strip() == f"token.import-cert: {tmp_path / 'x.pem'} is not a PEM certificate"


@pytest.mark.parametrize("workers", ["abc", "0", "-2"])
def test_verify_workers_must_be_a_positive_number(workers: str) -> None:
    proc = _invoke("verify", "-w", workers)
    assert proc.returncode == exitcodes.BAD_INPUT
    assert proc.stderr.strip() == f"verify: --workers wants a whole number >= 1, got {workers!r}"


def test_audit_only_names_known_auditors() -> None:
    proc = _invoke("audit", "--only", "lynis,nmap")
    assert proc.returncode == exitcodes.BAD_INPUT
    assert proc.stderr.strip() == "audit: --only nmap: unknown; choose from lynis, ssh-audit, systemd"


@pytest.mark.parametrize("name", ["token.csr", "inventory.check", "harden"])
def test_dash_h_is_help(name: str) -> None:
    proc = _invoke(name, "-h")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"Usage: inv[oke] [--core-opts] {name}")
    assert "--inventory" in proc.stdout


def test_dash_h_in_place_of_a_certificate_points_to_help() -> None:
    proc = _invoke("token.import-cert", "-h")
    assert proc.returncode == exitcodes.BAD_INPUT
    assert proc.stderr.strip() == ("token.import-cert: '-h' is an option, not a certificate file; "
                                   "help: invoke --help token.import-cert")


# --- unreachable ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inventory that passes inventory.check, whose one host does not answer."""
    d = tmp_path_factory.mktemp("unreachable")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "op")],
                   check=True)
    key = (d / "op.pub").read_text().strip()
    host = {
        "ansible_host": "127.0.0.1",
        "ansible_port": 9,  # discard: nothing listens
        "ansible_user": "admin",
        "ansible_ssh_timeout": 5,
        "ansible_become": True,
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={d / 'known_hosts'}",
        "token_pin_dir": str(d / "pins"),
        "firewall_admin_networks": ["127.0.0.0/8"],
        "preflight_operator_public_keys": [key],
        "base_admin_users": [{"name": "admin", "public_keys": [key], "sudo": True}],
    }
    inv = d / "inv"
    inv.mkdir()
    (inv / "hosts.yml").write_text(yaml.safe_dump(
        {"all": {"children": {"signing_hosts": {"hosts": {"h1": host}}}}}))
    return inv


@pytest.mark.parametrize(("name", "args"), [
    ("provision", []), ("harden", []), ("deploy", ["--check"]),
])
def test_an_unreachable_host_in_a_play(name: str, args: list[str], unreachable: Path) -> None:
    proc = _invoke(name, "-i", str(unreachable), *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == exitcodes.UNREACHABLE, out
    assert f"==> {name}: h1: UNREACHABLE: the run could not connect to it; nothing about its " \
        "controls is known from this run" in proc.stdout
    assert _last_line(proc).startswith(f"{name}: unreachable: h1; see ")
    # Nothing is claimed for it: neither "partly hardened" nor controls applied or not.
    assert "partly" not in out and "controls applied" not in out and "controls:" not in out


def test_an_unreachable_host_for_token_csr(unreachable: Path) -> None:
    proc = _invoke("token.csr", "-i", str(unreachable))
    assert proc.returncode == exitcodes.UNREACHABLE
    assert _last_line(proc).startswith("token.csr: h1: unreachable: ")
    assert "port 9" in _last_line(proc)


def test_token_import_cert_wants_one_host(cert: Path, unreachable: Path, tmp_path: Path) -> None:
    two = yaml.safe_load((unreachable / "hosts.yml").read_text())
    hosts = two["all"]["children"]["signing_hosts"]["hosts"]
    hosts["h2"] = hosts["h1"]
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(two))
    proc = _invoke("token.import-cert", str(cert), "-i", str(tmp_path))
    assert proc.returncode == exitcodes.BAD_INPUT
    assert _last_line(proc) == (
        "token.import-cert: --limit must select one host; the inventory selects h1, h2")


def test_ask_become_pass_asks_once_on_the_command_line(unreachable: Path) -> None:
    """No terminal here: getpass reads the answer from stdin, after its prompt on stderr."""
    proc = subprocess.run(
        [INVOKE, "harden", "-i", str(unreachable), "--ask-become-pass"], cwd=ROOT,
        input="pw-typed-once\n", capture_output=True, text=True, timeout=600,
        start_new_session=True)  # no controlling terminal
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert out.count("sudo password (become): ") == 1
    assert "pw-typed-once" not in out
    assert proc.returncode == exitcodes.UNREACHABLE, out


def test_lab_reset_of_a_lab_that_is_not_up_is_not_ready() -> None:
    from lab import lifecycle

    name = "lab7"
    if lifecycle.is_up(lifecycle.instance(name)):
        pytest.skip(f"{name} is up here")
    proc = _invoke("lab.reset", "--instance", name)
    assert proc.returncode == exitcodes.NOT_READY
    assert proc.stderr.strip() == f"lab.reset: lab {name} is not up: run `invoke lab.up`"


@pytest.mark.parametrize("name", ["harden", "token.csr", "inventory.check"])
def test_a_vault_file_without_its_password(name: str, unreachable: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    inv = tmp_path / "inv"
    shutil.copytree(unreachable, inv)
    secret = inv / "group_vars" / "all" / "vault.yml"
    secret.parent.mkdir(parents=True)
    secret.write_text("ansible_become_password: s3cret\n")
    (tmp_path / "vpw").write_text("vault-pw\n")
    subprocess.run([str(Path(sys.executable).parent / "ansible-vault"), "encrypt",
                    "--vault-password-file", str(tmp_path / "vpw"), str(secret)],
                   check=True, capture_output=True)
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
    proc = _invoke(name, "-i", str(inv))
    assert proc.returncode == exitcodes.BAD_INPUT
    assert (f"{name}: h1: variables: a vault file needs its password"
            " (give --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE)") \
        in proc.stderr.splitlines()
    missing = _invoke(name, "-i", str(inv), "--vault-password-file", str(tmp_path / "nope"))
    assert missing.returncode == exitcodes.BAD_INPUT
    assert missing.stderr.strip() == (
        f"{name}: vault password: The vault password file {tmp_path / 'nope'} was not found")


def test_deploy_expect_unchanged_with_an_unreachable_host(unreachable: Path) -> None:
    """Its first step (the daemon's invocation id, ad hoc) meets the host first."""
    proc = _invoke("deploy", "-i", str(unreachable), "--expect-unchanged")
    assert proc.returncode == exitcodes.UNREACHABLE, proc.stdout + proc.stderr
    assert _last_line(proc).startswith(
        "deploy: unreachable while reading the signer daemon's invocation id: h1 | UNREACHABLE!")


def test_verify_with_an_unreachable_host(unreachable: Path, tmp_path: Path) -> None:
    proc = _invoke("verify", "-i", str(unreachable), "--report-dir", str(tmp_path))
    assert proc.returncode == exitcodes.UNREACHABLE, proc.stdout + proc.stderr
    assert "h1: UNREACHABLE" in proc.stdout
    assert _last_line(proc) == "verify: a host could not be reached (see above)"
