"""SSH posture (SSH-01..07): what sshd accepts, proved by trying it.

Most tests run the OpenSSH client on the host itself against 127.0.0.1: the firewall allows
loopback, so what is tried is sshd's own decision, and the suite needs nothing but the
host. Forwarding needs an authenticated session: those tests log in from the controller the
way the suite itself does (the admin's connection, `admin_ssh`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testinfra.host import Host

    from tests.posture.conftest import AdminSsh, Expected

SSH_LOCAL = (
    "ssh -n -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
    "-o ConnectTimeout=20"
)


class Attempt:
    def __init__(self, rc: int, stderr: str) -> None:
        self.rc, self.stderr = rc, stderr


def an_admin(expected: Expected) -> str:
    admins = expected["base_admin_users"]
    assert admins, "the inventory has no base_admin_users"
    return str(admins[0]["name"])


def an_admin_address(expected: Expected) -> str:
    """An address of the first admin network (where an admin connects from), else TEST-NET-1."""
    for net in expected["firewall_admin_networks"]:
        network = ipaddress.ip_network(str(net), strict=False)
        # iter(): for a /32 (or /128) hosts() is a list holding the one address, not an iterator.
        return str(next(iter(network.hosts()), network.network_address))
    return "192.0.2.1"


def local_attempt(host: Host, expected: Expected, options: str, user: str | None = None) -> Attempt:
    """An SSH login attempt from the host to itself, without keys, with the given options
    (as an admin unless `user` is given).

    The client's exit status is reported on stderr: testinfra treats 255 from its own ssh
    as a transport error."""
    user = user or an_admin(expected)
    r = host.run(f"{SSH_LOCAL} -o PubkeyAuthentication=no -o IdentitiesOnly=yes "
                 f"-o IdentityFile=/dev/null {options} {user}@127.0.0.1 true; echo \"rc=$?\" >&2")
    err, _, rc = r.stderr.rstrip().rpartition("rc=")
    return Attempt(int(rc), err)


def sshd_effective_lines(host: Host, expected: Expected) -> list[tuple[str, str]]:
    """sshd's effective configuration for an admin's connection from an admin network."""
    out = host.check_output(f"/usr/sbin/sshd -T -C user={an_admin(expected)},host=probe,"
                            f"addr={an_admin_address(expected)}")
    return [(k.lower(), v) for k, _, v in (line.partition(" ") for line in out.splitlines())]


def sshd_effective(host: Host, expected: Expected) -> dict[str, str]:
    conf: dict[str, str] = {}
    for key, value in sshd_effective_lines(host, expected):
        conf.setdefault(key, value)
    return conf


@pytest.fixture(scope="module")
def effective(host: Host, expected: Expected) -> dict[str, str]:
    """`sshd_effective`, read once for the module (`sshd -T` costs a round trip and a few
    hundred ms of an emulated host's time); the cases below assert on it, option by option."""
    return sshd_effective(host, expected)


@pytest.mark.control("SSH-01")
@pytest.mark.parametrize("methods", ["password", "keyboard-interactive"])
def test_password_and_keyboard_interactive_logins_are_refused(host: Host, expected: Expected,
                                                              methods: str) -> None:
    r = local_attempt(host, expected, f"-o PreferredAuthentications={methods}")
    assert r.rc == 255, r.stderr
    # The server lists what it would accept: public keys, nothing else.
    assert "Permission denied (publickey)" in r.stderr, r.stderr


@pytest.mark.control("SSH-02")
def test_root_login_is_refused(host: Host, expected: Expected) -> None:
    assert sshd_effective(host, expected)["permitrootlogin"] == "no"
    r = local_attempt(host, expected, "-o PreferredAuthentications=password,keyboard-interactive",
                      user="root")
    assert r.rc == 255 and "Permission denied" in r.stderr, r.stderr


@pytest.mark.control("SSH-03")
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("disableforwarding", "yes"),
        ("allowtcpforwarding", "no"),
        ("allowagentforwarding", "no"),
        ("allowstreamlocalforwarding", "no"),
        ("x11forwarding", "no"),
        ("permittunnel", "no"),
        ("gatewayports", "no"),
    ],
)
def test_no_forwarding_or_tunnel_is_configured(effective: dict[str, str], option: str,
                                               value: str) -> None:
    assert effective[option] == value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.control("SSH-03")
def test_remote_forwarding_is_refused(admin_ssh: AdminSsh) -> None:
    r = subprocess.run(
        admin_ssh("-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:22",
                  remote=["true"]),
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 255, r.stderr
    assert "forwarding failed" in r.stderr, r.stderr


def _stop(proc: subprocess.Popen[str]) -> str:
    """Stop the ssh client (SIGTERM, then SIGKILL to its process group if it has not gone
    within 2 s) and return what it wrote on stderr.

    OpenSSH's client (9.2 at least) can miss a SIGTERM that lands outside its poll and only
    notices it at the next ServerAliveInterval tick: 15 s of nothing, on one run in two of the
    -D case. What the test proves is over by then; the client only has to be gone. The group
    (the client runs in its own session) takes a ProxyJump's ssh along with it.
    """
    proc.terminate()
    try:
        return proc.communicate(timeout=2)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=30)[1]


@pytest.mark.control("SSH-03")
@pytest.mark.parametrize("kind", ["-L", "-D"])
def test_local_and_dynamic_forwarding_are_refused(admin_ssh: AdminSsh, kind: str) -> None:
    """The client opens the local port; sshd must refuse the channel when it is used."""
    port = _free_port()
    spec = f"127.0.0.1:{port}:127.0.0.1:22" if kind == "-L" else f"127.0.0.1:{port}"
    proc = subprocess.Popen(admin_ssh("-N", kind, spec),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        got = b""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    if kind == "-D":  # SOCKS5: no auth, then CONNECT 127.0.0.1:22
                        s.sendall(b"\x05\x01\x00")
                        s.recv(2)
                        s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x16")
                    s.settimeout(30)
                    got = s.recv(64)
                break
            except ConnectionRefusedError:  # the client is still logging in
                time.sleep(0.2)
        else:
            pytest.fail("the ssh client never opened its local port")
    finally:
        err = _stop(proc)
    assert not got.startswith(b"SSH-"), "a forwarded connection reached sshd through the tunnel"
    if kind == "-D":
        assert got[:2] != b"\x05\x00", "the SOCKS request succeeded"
    assert proc.returncode is not None, err


@pytest.mark.control("SSH-04")
def test_only_allow_listed_accounts_may_log_in(host: Host, expected: Expected) -> None:
    # sshd -T prints one `allowusers` line per entry
    allowed = [v for k, v in sshd_effective_lines(host, expected) if k == "allowusers"]
    assert allowed, "AllowUsers is empty: every account may log in"
    assert "root" not in allowed
    for user in allowed:
        assert host.user(user.split("@")[0]).exists, f"AllowUsers names a missing account {user}"
    # exactly the inventory's list: no account is let in that the inventory does not name
    assert sorted(allowed) == sorted(str(u) for u in expected["ssh_allowed_users"])


@pytest.mark.control("SSH-05")
@pytest.mark.parametrize(
    "weak",
    [
        "KexAlgorithms=diffie-hellman-group14-sha256",
        "KexAlgorithms=diffie-hellman-group-exchange-sha256",
        "KexAlgorithms=ecdh-sha2-nistp256",
        "Ciphers=aes128-ctr",
        "Ciphers=chacha20-poly1305@openssh.com",
        "Ciphers=aes256-cbc",
        "HostKeyAlgorithms=ecdsa-sha2-nistp256",
        "HostKeyAlgorithms=ssh-rsa",
    ],
)
def test_weak_algorithms_are_refused(host: Host, expected: Expected, weak: str) -> None:
    r = local_attempt(host, expected, f"-o {weak}")
    assert r.rc == 255
    assert "no matching" in r.stderr, r.stderr


MLKEM = "mlkem768x25519-sha256"
SNTRUP = "sntrup761x25519-sha512@openssh.com"
CLASSICAL = "curve25519-sha256@libssh.org"


@pytest.mark.control("SSH-05")
def test_key_exchange_is_post_quantum_first_as_far_as_the_hosts_openssh_goes(
        host: Host, expected: Expected) -> None:
    """The exchanges sshd offers follow the host's OpenSSH (ML-KEM from 9.9, Debian 13, then
    sntrup761) and the inventory's interop decision for clients without a post-quantum exchange
    (threat-model/README.md: ssh_kex_classical_clients; auto admits them only where the host
    has no ML-KEM)."""
    version = host.check_output("dpkg-query --showformat='${Version}' --show openssh-server")
    m = re.match(r"(?:\d+:)?(\d+)\.(\d+)", version)
    assert m, f"cannot read the OpenSSH version from {version!r}"
    mlkem = (int(m[1]), int(m[2])) >= (9, 9)
    offered = sshd_effective(host, expected)["kexalgorithms"].split(",")
    explicit = [str(k) for k in expected["ssh_kex_algorithms"] or []]
    if explicit:
        assert offered == explicit
        return
    choice = expected["ssh_kex_classical_clients"]
    classical = choice == "allow" or (choice == "auto" and not mlkem)
    assert offered == ([MLKEM] if mlkem else []) + [SNTRUP] + ([CLASSICAL] if classical else []), (
        f"OpenSSH {m[1]}.{m[2]}, ssh_kex_classical_clients={choice}")


@pytest.mark.control("SSH-05")
def test_weak_dh_moduli_are_removed(host: Host) -> None:
    sizes = [int(line.split()[4]) for line in host.file("/etc/ssh/moduli").content_string.splitlines()
             if line and not line.startswith("#")]
    assert sizes and min(sizes) >= 3071


@pytest.mark.control("SSH-06", "SSH-01")
def test_a_password_drop_in_cannot_enable_password_logins(host: Host, expected: Expected) -> None:
    """sshd, reading the installed sshd_config with a password drop-in in sshd_config.d (what
    a package or cloud-init leaves), still allows public keys only. The drop-in is written in a
    private mount namespace, on a tmpfs over the directory: `sshd -T` there reads the same
    files as the daemon does at a reload, and the host's directory is never written (it is
    watched by auditd and AIDE: a probe would stay in the daily check's report)."""
    dropin = "/etc/ssh/sshd_config.d/50-cloud-init.conf"
    assert not host.file(dropin).exists, f"{dropin} exists already; not touching it"
    user, addr = an_admin(expected), an_admin_address(expected)
    inner = (f"mount -t tmpfs -o mode=0755 signhost-probe /etc/ssh/sshd_config.d && "
             f"printf 'PasswordAuthentication yes\\nKbdInteractiveAuthentication yes\\n"
             f"PermitRootLogin yes\\n' > {dropin} && "
             f"/usr/sbin/sshd -T -C user={user},host=probe,addr={addr}")
    out = host.check_output(f"unshare --mount --propagation private sh -c {shlex.quote(inner)}")
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value)
    assert conf["passwordauthentication"] == "no"
    assert conf["kbdinteractiveauthentication"] == "no"
    assert conf["permitrootlogin"] == "no"
    assert not host.file(dropin).exists
    # and the running daemon offers public keys only
    r = local_attempt(host, expected, "-o PreferredAuthentications=password,keyboard-interactive")
    assert "Permission denied (publickey)" in r.stderr, r.stderr


@pytest.mark.control("SSH-07")
def test_installed_sshd_config_is_valid(host: Host) -> None:
    assert host.run("/usr/sbin/sshd -t").rc == 0


@pytest.mark.control("SSH-07", "NET-04")
def test_no_roll_back_is_left_pending(host: Host) -> None:
    """A run that finished confirmed its changes: no roll-back timer is still armed."""
    helper = host.file("/usr/local/sbin/signhost-rollback")
    assert helper.exists and helper.mode == 0o755 and helper.user == "root"
    timers = host.check_output("systemctl list-timers --all --no-legend 'signhost-rollback-*'")
    assert timers.strip() == "" or "0 timers" in timers, timers

