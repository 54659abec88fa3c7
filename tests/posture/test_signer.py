"""Posture of the signer service on the host: the daemon's sandbox, the token store, the PIN
file, the forced-command accounts, the validated configuration, and the key's residency.

Behaviour first (the daemon's network namespace holds only `lo`, root cannot export the key,
a broken configuration is rejected); unit properties and file modes where behaviour cannot
be observed from outside.
"""

from __future__ import annotations

import re
import shlex

import pytest

CONFIG = "/etc/signer/signer.toml"
SIGNER = "/opt/signer/venv/bin/signer"
UNIT = "signerd.service"
SOFTHSM_CONF = "/etc/signer/softhsm2.conf"
TOKEN_STORE = "/var/lib/signer/token"
PIN_FILE = "/etc/signer/pin"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
EXPOSURE_MAX = 2.0


def _daemon_pid(host) -> int:
    pid = host.check_output(f"systemctl show -p MainPID --value {UNIT}")
    assert pid.isdigit() and int(pid) > 0, f"{UNIT} is not running"
    return int(pid)


@pytest.mark.control("SGN-06")
def test_signer_daemon_runs_as_its_own_user_without_capabilities(host):
    pid = _daemon_pid(host)
    with host.sudo():
        status = host.file(f"/proc/{pid}/status").content_string
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    assert host.user("signer").uid == uid
    assert host.user("signer").shell in ("/usr/sbin/nologin", "/bin/false")
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(re.search(rf"^{cap}:\s+([0-9a-f]+)", status, re.M).group(1), 16) == 0, cap
    assert re.search(r"^NoNewPrivs:\s+1", status, re.M)
    assert re.search(r"^Seccomp:\s+2", status, re.M)


@pytest.mark.control("SGN-06")
def test_signer_daemon_has_no_network_but_loopback(host):
    pid = _daemon_pid(host)
    with host.sudo():
        dev = host.file(f"/proc/{pid}/net/dev").content_string
    ifaces = {line.split(":")[0].strip() for line in dev.splitlines()[2:] if ":" in line}
    assert ifaces == {"lo"}


@pytest.mark.control("SGN-06")
def test_signer_daemon_sees_the_system_read_only(host):
    pid = _daemon_pid(host)
    with host.sudo():
        mounts = host.file(f"/proc/{pid}/mountinfo").content_string
    opts = {}
    for line in mounts.splitlines():
        f = line.split()
        opts[f[4]] = f[5].split(",")
    assert "ro" in opts["/"], opts["/"]
    assert "ro" in opts.get("/etc", opts["/"])
    assert "rw" in opts["/var/lib/signer"]


@pytest.mark.control("SGN-06")
@pytest.mark.parametrize(
    ("prop", "want"),
    [
        ("PrivateNetwork", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
    ],
)
def test_signer_unit_sandbox_property(host, prop, want):
    assert host.check_output(f"systemctl show -p {prop} --value {UNIT}") == want


@pytest.mark.control("SGN-06")
def test_signer_unit_exposure_is_at_most_two(host):
    with host.sudo():
        out = host.check_output(f"systemd-analyze security --no-pager {UNIT}")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert m, out[-300:]
    assert float(m.group(1)) <= EXPOSURE_MAX, f"exposure {m.group(1)}"


@pytest.mark.control("TOK-02")
def test_token_store_belongs_to_the_daemon_user_only(host):
    with host.sudo():
        store = host.file(TOKEN_STORE)
        assert store.is_directory
        assert (store.user, store.group, store.mode) == ("signer", "signer", 0o700)
        # Every object file inside too: no other account can read the token.
        others = host.check_output(f"find {TOKEN_STORE} ! -user signer -o -perm /077")
    assert others == ""


@pytest.mark.control("TOK-02")
def test_other_accounts_cannot_open_the_token(host):
    r = host.run(
        f"sudo -n -u sign env SOFTHSM2_CONF={SOFTHSM_CONF} "
        f"pkcs11-tool --module {MODULE} --list-token-slots"
    )
    assert "token label" not in r.stdout


# pcscd runs as root and drives the token's reader. Debian 12 ships its socket 0666 and the
# daemon without polkit, so the socket's mode is what keeps other accounts away from the token.
CONNECT_PROBE = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
    " print('connected')"
)


def _pcscd_listening(host) -> bool:
    return host.run("systemctl is-active --quiet pcscd.socket").rc == 0


@pytest.mark.control("TOK-02")
@pytest.mark.parametrize("account", ["sign", "nobody"])
def test_other_accounts_cannot_reach_pcscd(host, account):
    # Off (no token reader needed): nothing listens. On: the socket is the token owner's.
    r = host.run(f"sudo -n -u {account} python3 -c {shlex.quote(CONNECT_PROBE)} {PCSCD_SOCKET}")
    assert r.rc != 0, f"{account} connected to pcscd"
    assert "connected" not in r.stdout
    assert re.search(r"PermissionError|FileNotFoundError|ConnectionRefusedError", r.stderr), (
        r.stderr
    )


@pytest.mark.control("TOK-02")
def test_token_owner_reaches_pcscd_from_inside_the_daemon_sandbox(host):
    if not _pcscd_listening(host):
        pytest.skip("pcscd is off on this host (token_pcscd false): the token needs no reader")
    with host.sudo():
        sock = host.file(PCSCD_SOCKET)
        assert sock.is_socket
        assert (sock.user, sock.group) == ("root", "signer")
        assert sock.mode & 0o007 == 0, oct(sock.mode)
    # The daemon's own mount and network namespaces (read-only /run, PrivateNetwork), its uid
    # and gid: pcscd answers the PC/SC handshake (SCardEstablishContext) and lists readers.
    pid = _daemon_pid(host)
    uid, gid = host.user("signer").uid, host.group("signer").gid
    with host.sudo():
        boxed = host.run(
            f"nsenter --target {pid} --mount --net --setuid {uid} --setgid {gid}"
            " opensc-tool --list-readers"
        )
    assert boxed.rc == 0, boxed.stdout + boxed.stderr
    assert "establish" not in (boxed.stdout + boxed.stderr).lower()


@pytest.mark.control("TOK-02")
def test_pin_file_is_readable_by_the_daemon_user_only(host):
    with host.sudo():
        if not host.file(PIN_FILE).exists:
            assert 'pin_source = "prompt"' in host.file(CONFIG).content_string
            return
        f = host.file(PIN_FILE)
        assert (f.user, f.mode) == ("signer", 0o600)
    assert host.run(f"sudo -n -u sign cat {PIN_FILE}").rc != 0


@pytest.mark.control("TOK-04", "TOK-01")
def test_configured_keys_are_resident_and_non_extractable(host):
    with host.sudo("signer"):
        r = host.run(f"env SOFTHSM2_CONF={SOFTHSM_CONF} {SIGNER} keys check --config {CONFIG}")
    assert r.rc == 0, r.stdout + r.stderr


# Root, with the PIN, asks the token for the private value of the dev key (python-pkcs11 from
# the signer's venv) and tries pkcs11-tool's export: both must come back empty-handed.
EXPORT_PROBE = """
import sys, pkcs11
from pkcs11 import Attribute, ObjectClass
lib = pkcs11.lib(sys.argv[1])
tok = lib.get_token(token_label="signer")
with tok.open(user_pin=open(sys.argv[2]).read().strip()) as s:
    k = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="dev")
    print("extractable", k[Attribute.EXTRACTABLE])
    try:
        v = k[Attribute.VALUE]
        print("VALUE-READ", len(v))
    except pkcs11.exceptions.PKCS11Error as e:
        print("refused", type(e).__name__)
"""


@pytest.mark.control("TOK-04")
def test_root_cannot_export_the_signing_key(host):
    with host.sudo():
        if not host.file(PIN_FILE).exists:
            pytest.skip("pin_source prompt: no PIN on the host to log in with")
        probe = host.run(
            f"SOFTHSM2_CONF={SOFTHSM_CONF} /opt/signer/venv/bin/python -c "
            f"'{EXPORT_PROBE}' {MODULE} {PIN_FILE}"
        )
        base = (
            f"P=$(cat {PIN_FILE}) SOFTHSM2_CONF={SOFTHSM_CONF} pkcs11-tool --module {MODULE}"
            " --token-label signer --login --pin env:P"
        )
        listed = host.run(f"{base} --list-objects --type privkey")
        host.run(f"{base} --read-object --type privkey --label dev --output-file /root/dev.key")
        leftover = host.file("/root/dev.key")
        leaked = leftover.exists and leftover.size > 0
        host.run("rm -f /root/dev.key")
    assert probe.rc == 0, probe.stderr
    assert "extractable False" in probe.stdout
    assert "refused AttributeSensitive" in probe.stdout, probe.stdout
    assert "VALUE-READ" not in probe.stdout
    assert listed.rc == 0, listed.stderr
    assert "never extractable" in listed.stdout and "sensitive" in listed.stdout
    assert not leaked


@pytest.mark.control("SGN-01")
@pytest.mark.parametrize("account", ["sign", "alice", "bob"])
def test_forced_command_accounts_only_have_restricted_keys(host, account):
    with host.sudo():
        ak = host.file(f"/home/{account}/.ssh/authorized_keys")
        assert ak.user == "root" and not ak.mode & 0o022
        lines = [ln for ln in ak.content_string.splitlines() if ln and not ln.startswith("#")]
    assert lines
    for line in lines:
        assert re.match(
            r'^restrict,from="[^"]+",command="/opt/signer/venv/bin/signer gateway '
            r'--(client|custodian) [a-z][a-z0-9_-]*( --config \S+)?" ',
            line,
        ), line


@pytest.mark.control("SGN-08")
def test_a_broken_signer_config_is_rejected_by_the_validator(host):
    with host.sudo():
        good = host.run(f"{SIGNER} config check {CONFIG}")
        bad = host.run(
            f"sed 's/^approvals = .*/approvals = \"two\"/' {CONFIG} > /root/bad.toml"
            f" && {SIGNER} config check /root/bad.toml; rc=$?; rm -f /root/bad.toml;"
            " exit $rc"
        )
    assert good.rc == 0, good.stdout + good.stderr
    assert bad.rc == 78, bad.stdout + bad.stderr
    assert "approvals" in bad.stdout + bad.stderr


@pytest.mark.control("SGN-06")
def test_signer_socket_is_reachable_by_the_gateway_group_only(host):
    with host.sudo():
        s = host.file("/run/signer/signer.sock")
        assert s.is_socket
        assert (s.user, s.group) == ("signer", "signer-gw")
        assert s.mode & 0o007 == 0
