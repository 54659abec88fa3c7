"""SSH clients other than a recent OpenSSH reach the signer (SSH-05, issue 11 point 8).

Build servers are often CI agents that speak SSH through a library, not through OpenSSH.
paramiko (Python: Fabric, Ansible's paramiko connection, home-grown deploy scripts) is the
one tried here, from the build client's network namespace with its key (the client and profile
of the inventory under test, as `test_signer_e2e` picks them), exactly as that module does it
with OpenSSH. paramiko has no post-quantum key exchange, so it gets
in only through the classical one the ssh role adds for such clients when the inventory allows
them (`ssh_kex_classical_clients`: allow, or auto on a host whose OpenSSH has no ML-KEM, i.e.
Debian 12); where the inventory refuses them (auto on Debian 13) it is refused, and that is
what the test proves there. Weaker exchanges stay out either way.

The client runs as a small script under the controller's venv Python inside the namespace
(`ip netns exec`), and answers with one JSON object on stdout: what was negotiated, the
remote command's exit status, stdout and stderr.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lab.state import LabState
from lab.target import Party, Target
from toolkit.assurance.outside_auditors import parse_ssh_audit

if TYPE_CHECKING:
    from tests.lab.conftest import AdminSsh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"

# The client: host, user, key, known_hosts, key exchange(s) (comma-separated, "" for
# paramiko's defaults), remote command; the artifact on stdin. Host key checked against the
# lab's known_hosts (never accepted blindly), only the given key offered, no agent.
CLIENT = r"""
import base64, json, socket, sys
import paramiko

host, user, key, known_hosts, kex, command = sys.argv[1:7]
out = {"paramiko": paramiko.__version__}
try:
    t = paramiko.Transport(socket.create_connection((host, 22), timeout=30))
    if kex:
        t.get_security_options().kex = kex.split(",")
    t.start_client(timeout=60)
    out.update(cipher=t.local_cipher, mac=t.local_mac, hostkey=t.host_key_type)
    if not paramiko.HostKeys(known_hosts).check(host, t.get_remote_server_key()):
        raise paramiko.SSHException(f"host key of {host} not in {known_hosts}")
    t.auth_publickey(user, paramiko.PKey.from_path(key))
    chan = t.open_session(timeout=30)
    chan.exec_command(command)
    chan.sendall(sys.stdin.buffer.read())
    chan.shutdown_write()
    stdout, stderr = chan.makefile("rb").read(), chan.makefile_stderr("rb").read()
    out.update(rc=chan.recv_exit_status(), stdout=base64.b64encode(stdout).decode(),
               stderr=stderr.decode(errors="replace"))
    t.close()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def _paramiko(lab: LabState, target: Target, client: Party, command: str, data: bytes = b"", *,
              kex: str = "") -> dict[str, Any]:
    if command.startswith("sign ") and data and "--size" not in command:
        command += f" --size {len(data)}"  # as `signer submit` declares it (required)
    argv = [str(PYTHON), "-c", CLIENT, lab.vm_ipv4, target.account(client), str(client.key),
            str(lab.state_dir / "known_hosts"), kex, command]
    r = lab.netns_run(str(client.netns_host), argv, input=data, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


def _openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def dev_pubkey(target: Target, signing: tuple[Party, str],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    cert = target.token_dir / f"{signing[1]}.pem"
    if not cert.exists():
        pytest.fail(f"{cert} is missing: run `invoke deploy` on this lab first")
    r = _openssl("x509", "-in", str(cert), "-pubkey", "-noout")
    assert r.returncode == 0, r.stderr.decode()
    pub = tmp_path_factory.mktemp("dev") / "dev.pub"
    pub.write_bytes(r.stdout)
    return pub


@pytest.fixture(scope="module")
def classical_allowed(admin_ssh: AdminSsh) -> tuple[bool, str]:
    """Whether sshd on the host offers the classical exchange, and its list. That the list is
    the inventory's decision for this host's OpenSSH is the posture test's to prove
    (test_key_exchange_is_post_quantum_first_as_far_as_the_hosts_openssh_goes); here the
    clients are held to what sshd offers."""
    r = admin_ssh("/usr/sbin/sshd -T", sudo=True, check=True)
    offered = next((line.split(" ", 1)[1] for line in r.stdout.splitlines()
                    if line.startswith("kexalgorithms ")), "")
    assert offered, r.stdout[-2000:]
    return "curve25519-sha256@libssh.org" in offered.split(","), f"sshd offers {offered}"


@pytest.mark.control("SSH-05")
def test_a_client_without_a_post_quantum_exchange_is_refused_where_the_inventory_says_so(
        lab: LabState, target: Target, signing: tuple[Party, str],
        classical_allowed: tuple[bool, str]) -> None:
    allowed, why = classical_allowed
    if allowed:
        pytest.skip(f"the inventory admits such clients here ({why}): the signature test "
                    "below proves they get in")
    client, profile = signing
    r = _paramiko(lab, target, client, f"sign --profile {profile} --format raw", b"artifact")
    assert "rc" not in r, f"sshd accepted paramiko without a post-quantum exchange ({why}): {r}"
    assert "no acceptable kex algorithm" in r.get("error", ""), r


@pytest.mark.control("SSH-05", "SGN-09")
@pytest.mark.parametrize(
    "kex",
    [
        "",  # paramiko's own preferences, what a CI agent uses without tuning
        "curve25519-sha256@libssh.org",  # the classical exchange every SSH library has
    ],
)
def test_a_paramiko_build_client_gets_a_raw_signature_that_openssl_verifies(
        lab: LabState, target: Target, signing: tuple[Party, str], dev_pubkey: Path, tmp_path: Path,
        kex: str, classical_allowed: tuple[bool, str]) -> None:
    allowed, why = classical_allowed
    if not allowed:
        pytest.skip(f"the inventory refuses clients without a post-quantum exchange here ({why}):"
                    " the refusal test above proves it")
    art = tmp_path / "artifact.bin"
    art.write_bytes(secrets.token_bytes(4096))
    client, profile = signing
    r = _paramiko(lab, target, client, f"sign --profile {profile} --format raw",
                  art.read_bytes(), kex=kex)
    assert "error" not in r, r
    assert r["rc"] == 0, r["stderr"]
    # What the inventory lets sshd offer (the ssh role's defaults unless it overrides them).
    assert r["hostkey"] in target.values["ssh_host_key_algorithms"], r
    assert r["cipher"] in target.values["ssh_ciphers"], r
    sig = tmp_path / "artifact.sig"
    sig.write_bytes(base64.b64decode(r["stdout"]))
    ok = _openssl("dgst", "-sha256", "-verify", str(dev_pubkey), "-signature", str(sig), str(art))
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
    art.write_bytes(art.read_bytes() + b"\0")
    bad = _openssl("dgst", "-sha256", "-verify", str(dev_pubkey), "-signature", str(sig), str(art))
    assert bad.returncode != 0


@pytest.mark.control("SSH-05")
@pytest.mark.parametrize(
    "weak",
    [
        "diffie-hellman-group14-sha256",  # 2048-bit group
        "diffie-hellman-group-exchange-sha256",  # server-chosen groups, no post-quantum part
        "ecdh-sha2-nistp256",  # NIST P-256
    ],
)
def test_paramiko_restricted_to_a_weak_key_exchange_is_refused(lab: LabState, target: Target,
                                                               signing: tuple[Party, str],
                                                               weak: str) -> None:
    client, profile = signing
    r = _paramiko(lab, target, client, f"sign --profile {profile} --format raw", b"artifact",
                  kex=weak)
    assert "rc" not in r, f"sshd accepted {weak}: {r}"
    assert "no acceptable kex algorithm" in r.get("error", ""), r


@pytest.mark.control("SSH-05")
def test_ssh_audit_finds_nothing_but_the_inventorys_interop_choice(
        lab: LabState, classical_allowed: tuple[bool, str]) -> None:
    """ssh-audit (the current release, from PyPI) from the build network: no failure, and no
    warning except the one the inventory chose to accept (the classical exchange for clients
    without a post-quantum one: threat-model/README.md). On Debian 13 with the default
    inventory that is 0 fail, 0 warn."""
    exe = PYTHON.parent / "ssh-audit"
    assert exe.exists(), f"{exe} is missing: scripts/bootstrap installs it (dev dependency)"
    r = lab.netns_run("build", [str(exe), "-j", "--skip-rate-test", "-t", "30", lab.vm_ipv4],
                      timeout=180)
    found = parse_ssh_audit(json.loads(r.stdout))
    allowed, why = classical_allowed
    accepted = [d for d in found["details"]
                if d.startswith("warn (kex) curve25519-sha256@libssh.org:")] if allowed else []
    assert found["figures"]["fail"] == 0, found["details"]
    assert [d for d in found["details"] if d not in accepted] == [], (why, found["details"])
    assert found["figures"]["warn"] == len(accepted), (why, found["details"])
