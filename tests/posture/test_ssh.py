"""SSH posture (SSH-01..07): what sshd accepts, proved by trying it.

Most tests run the OpenSSH client on the host itself against 127.0.0.1: the firewall allows
loopback, so what is tried is sshd's own decision, and the suite needs nothing but the
host (lab or production). Forwarding needs an authenticated session: those tests log in
from the controller with the admin key and are lab-only.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

SSH_LOCAL = (
    "ssh -n -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
    "-o ConnectTimeout=20"
)


class Attempt:
    def __init__(self, rc: int, stderr: str) -> None:
        self.rc, self.stderr = rc, stderr


def local_attempt(host, options: str, user: str = "admin") -> Attempt:  # type: ignore[no-untyped-def]
    """An SSH login attempt from the host to itself, without keys, with the given options.

    The client's exit status is reported on stderr: testinfra treats 255 from its own ssh
    as a transport error."""
    r = host.run(f"{SSH_LOCAL} -o PubkeyAuthentication=no -o IdentitiesOnly=yes "
                 f"-o IdentityFile=/dev/null {options} {user}@127.0.0.1 true; echo \"rc=$?\" >&2")
    err, _, rc = r.stderr.rstrip().rpartition("rc=")
    return Attempt(int(rc), err)


def sshd_effective(host) -> dict[str, str]:  # type: ignore[no-untyped-def]
    out = host.check_output("/usr/sbin/sshd -T -C user=admin,host=probe,addr=10.0.2.2")
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value)
    return conf


@pytest.mark.control("SSH-01")
@pytest.mark.parametrize("methods", ["password", "keyboard-interactive"])
def test_password_and_keyboard_interactive_logins_are_refused(host, methods) -> None:  # type: ignore[no-untyped-def]
    r = local_attempt(host, f"-o PreferredAuthentications={methods}")
    assert r.rc == 255, r.stderr
    # The server lists what it would accept: public keys, nothing else.
    assert "Permission denied (publickey)" in r.stderr, r.stderr


@pytest.mark.control("SSH-02")
def test_root_login_is_refused(host) -> None:  # type: ignore[no-untyped-def]
    assert sshd_effective(host)["permitrootlogin"] == "no"
    r = local_attempt(host, "-o PreferredAuthentications=password,keyboard-interactive", user="root")
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
def test_no_forwarding_or_tunnel_is_configured(host, option, value) -> None:  # type: ignore[no-untyped-def]
    assert sshd_effective(host)[option] == value


def _controller_ssh(lab) -> list[str]:  # type: ignore[no-untyped-def]
    return ["ssh", "-F", str(lab.ssh_config), "-o", "ControlPath=none", "-o", "BatchMode=yes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.control("SSH-03")
def test_remote_forwarding_is_refused(lab) -> None:  # type: ignore[no-untyped-def]
    if lab is None:
        pytest.skip("needs the lab's admin session from the controller")
    r = subprocess.run(
        [*_controller_ssh(lab), "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:22",
         lab.ssh_alias, "true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 255, r.stderr
    assert "forwarding failed" in r.stderr, r.stderr


@pytest.mark.control("SSH-03")
@pytest.mark.parametrize("kind", ["-L", "-D"])
def test_local_and_dynamic_forwarding_are_refused(lab, kind) -> None:  # type: ignore[no-untyped-def]
    """The client opens the local port; sshd must refuse the channel when it is used."""
    if lab is None:
        pytest.skip("needs the lab's admin session from the controller")
    port = _free_port()
    spec = f"127.0.0.1:{port}:127.0.0.1:22" if kind == "-L" else f"127.0.0.1:{port}"
    proc = subprocess.Popen([*_controller_ssh(lab), "-N", kind, spec, lab.ssh_alias],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
                time.sleep(1)
        else:
            pytest.fail("the ssh client never opened its local port")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert not got.startswith(b"SSH-"), "a forwarded connection reached sshd through the tunnel"
    if kind == "-D":
        assert got[:2] != b"\x05\x00", "the SOCKS request succeeded"
    assert proc.returncode is not None, err


@pytest.mark.control("SSH-04")
def test_only_allow_listed_accounts_may_log_in(host) -> None:  # type: ignore[no-untyped-def]
    allowed = sshd_effective(host).get("allowusers", "").split()
    assert allowed, "AllowUsers is empty: every account may log in"
    assert "root" not in allowed
    for user in allowed:
        assert host.user(user.split("@")[0]).exists, f"AllowUsers names a missing account {user}"


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
def test_weak_algorithms_are_refused(host, weak) -> None:  # type: ignore[no-untyped-def]
    r = local_attempt(host, f"-o {weak}")
    assert r.rc == 255
    assert "no matching" in r.stderr, r.stderr


@pytest.mark.control("SSH-05")
def test_weak_dh_moduli_are_removed(host) -> None:  # type: ignore[no-untyped-def]
    sizes = [int(line.split()[4]) for line in host.file("/etc/ssh/moduli").content_string.splitlines()
             if line and not line.startswith("#")]
    assert sizes and min(sizes) >= 3071


@pytest.mark.control("SSH-06", "SSH-01")
def test_a_password_drop_in_cannot_enable_password_logins(host) -> None:  # type: ignore[no-untyped-def]
    dropin = "/etc/ssh/sshd_config.d/50-cloud-init.conf"
    assert not host.file(dropin).exists, f"{dropin} exists already; not touching it"
    host.check_output(f"printf 'PasswordAuthentication yes\\nKbdInteractiveAuthentication yes\\n"
                      f"PermitRootLogin yes\\n' > {dropin} && systemctl reload ssh.service")
    try:
        time.sleep(1)
        conf = sshd_effective(host)
        assert conf["passwordauthentication"] == "no"
        assert conf["kbdinteractiveauthentication"] == "no"
        assert conf["permitrootlogin"] == "no"
        r = local_attempt(host, "-o PreferredAuthentications=password,keyboard-interactive")
        assert "Permission denied (publickey)" in r.stderr, r.stderr
    finally:
        host.run(f"rm -f {dropin} && systemctl reload ssh.service")


@pytest.mark.control("SSH-07")
def test_installed_sshd_config_is_valid(host) -> None:  # type: ignore[no-untyped-def]
    assert host.run("/usr/sbin/sshd -t").rc == 0


@pytest.mark.control("SSH-07", "NET-04")
def test_no_roll_back_is_left_pending(host) -> None:  # type: ignore[no-untyped-def]
    """A run that finished confirmed its changes: no roll-back timer is still armed."""
    helper = host.file("/usr/local/sbin/signhost-rollback")
    assert helper.exists and helper.mode == 0o755 and helper.user == "root"
    timers = host.check_output("systemctl list-timers --all --no-legend 'signhost-rollback-*'")
    assert timers.strip() == "" or "0 timers" in timers, timers

