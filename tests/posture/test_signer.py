"""Posture of the signer service on the host: the daemon's sandbox, the token store, the PIN
file, the forced-command accounts, the validated configuration, and the key's residency.

Behaviour first (the daemon's network namespace holds only `lo`, root cannot export the key,
a broken configuration is rejected); unit properties and file modes where behaviour cannot
be observed from outside.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from toolkit.controls.auditors import threshold

if TYPE_CHECKING:
    from testinfra.backend.base import CommandResult
    from testinfra.host import Host

    from tests.posture.conftest import Expected

PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
# The bound `invoke audit` holds the same figure to: SGN-06's, in threat-model/controls/.
EXPOSURE = threshold("SGN-06", "systemd-analyze", "exposure")


# Names and paths come from the host's inventory (the roles' defaults underneath).
def _unit(expected: Expected) -> str:
    return f"{expected['signer_service']}.service"


def _signer(expected: Expected) -> str:
    return f"{expected['signer_venv']}/bin/signer"


def _softhsm(expected: Expected) -> bool:
    return bool(expected["token_backend"] == "softhsm")


def _token_env(expected: Expected) -> str:
    """The environment a PKCS#11 client needs for the host's token (SoftHSM2: its config)."""
    return f"SOFTHSM2_CONF={expected['token_softhsm_conf']} " if _softhsm(expected) else ""


def _only_softhsm(expected: Expected) -> None:
    if not _softhsm(expected):
        pytest.skip(f"does not apply: token_backend is {expected['token_backend']}, "
                    "there is no SoftHSM2 store on this host")


def _daemon_pid(host: Host, expected: Expected) -> int:
    unit = _unit(expected)
    pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
    assert pid.isdigit() and int(pid) > 0, f"{unit} is not running"
    return int(pid)


@pytest.mark.control("SGN-06")
def test_signer_daemon_runs_as_its_own_user_without_capabilities(host: Host,
                                                                 expected: Expected) -> None:
    pid = _daemon_pid(host, expected)
    with host.sudo():
        status = host.file(f"/proc/{pid}/status").content_string
    uid_line = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert uid_line, status
    uid = int(uid_line.group(1))
    daemon = expected["signer_daemon_user"]
    assert host.user(daemon).uid == uid
    assert host.user(daemon).shell in ("/usr/sbin/nologin", "/bin/false")
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        caps = re.search(rf"^{cap}:\s+([0-9a-f]+)", status, re.M)
        assert caps, f"no {cap} in {status}"
        assert int(caps.group(1), 16) == 0, cap
    assert re.search(r"^NoNewPrivs:\s+1", status, re.M)
    assert re.search(r"^Seccomp:\s+2", status, re.M)


@pytest.mark.control("SGN-06")
def test_signer_daemon_has_no_network_but_loopback(host: Host, expected: Expected) -> None:
    pid = _daemon_pid(host, expected)
    with host.sudo():
        dev = host.file(f"/proc/{pid}/net/dev").content_string
    ifaces = {line.split(":")[0].strip() for line in dev.splitlines()[2:] if ":" in line}
    assert ifaces == {"lo"}


@pytest.mark.control("SGN-06")
def test_signer_daemon_sees_the_system_read_only(host: Host, expected: Expected) -> None:
    pid = _daemon_pid(host, expected)
    with host.sudo():
        mounts = host.file(f"/proc/{pid}/mountinfo").content_string
    opts = {}
    for line in mounts.splitlines():
        f = line.split()
        opts[f[4]] = f[5].split(",")
    assert "ro" in opts["/"], opts["/"]
    assert "ro" in opts.get("/etc", opts["/"])
    assert "rw" in opts[expected["signer_daemon_home"]]


# The signer unit's sandbox: systemd property, the value `systemctl show` must give.
SANDBOX = [
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
]


@pytest.mark.control("SGN-06")
@pytest.mark.parametrize(("prop", "want"), SANDBOX)
def test_signer_unit_sandbox_property(unit_properties: dict[str, str], prop: str,
                                     want: str) -> None:
    assert unit_properties.get(prop) == want


@pytest.fixture(scope="module")
def unit_properties(host: Host, expected: Expected) -> dict[str, str]:
    """The signer unit's sandbox properties as systemd has them loaded, in one `systemctl show`
    (one round trip instead of twelve); each case asserts on its own. A property systemd does
    not show is absent here, and its case fails."""
    props = [p for p, _ in SANDBOX]
    out = host.check_output(f"systemctl show {' '.join(f'-p {p}' for p in props)} "
                            f"{_unit(expected)}")
    shown = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {p: shown[p] for p in props if p in shown}


@pytest.mark.control("SGN-06")
def test_signer_unit_exposure_is_within_its_threshold(host: Host, expected: Expected) -> None:
    with host.sudo():
        out = host.check_output(f"systemd-analyze security --no-pager {_unit(expected)}")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert m, out[-300:]
    assert EXPOSURE.met(float(m.group(1))), f"exposure {m.group(1)}, threshold {EXPOSURE.text}"


@pytest.mark.control("TOK-02")
def test_token_store_belongs_to_the_daemon_user_only(host: Host, expected: Expected) -> None:
    _only_softhsm(expected)
    owner, path = expected["token_owner"], expected["token_softhsm_store"]
    with host.sudo():
        store = host.file(path)
        assert store.is_directory
        assert (store.user, store.group, store.mode) == (owner, owner, 0o700)
        # Every object file inside too: no other account can read the token.
        others = host.check_output(f"find {path} ! -user {owner} -o -perm /077")
    assert others == ""


def _token_slots(host: Host, expected: Expected, account: str) -> CommandResult:
    return host.run(
        f"sudo -n -u {account} env {_token_env(expected)}"
        f"pkcs11-tool --module {expected['token_module']} --list-token-slots"
    )


@pytest.fixture(scope="module")
def owners_slots(host: Host, expected: Expected) -> CommandResult:
    """The positive control of the case below, run once for the module (not once per account):
    the same command as the token's owner."""
    return _token_slots(host, expected, expected["token_owner"])


@pytest.mark.control("TOK-02")
def test_other_accounts_cannot_open_the_token(host: Host, expected: Expected,
                                              owners_slots: CommandResult,
                                              forced_command_account: str) -> None:
    # The same command as the token's owner sees the token: the module loads and the command
    # works on this host, so the other account's empty answer means it was kept out.
    owner = owners_slots
    label = re.compile(rf"(?m)^\s*token label\s*:\s*{re.escape(expected['token_label'])}\s*$")
    assert owner.rc == 0 and label.search(owner.stdout), owner.stdout + owner.stderr
    other = _token_slots(host, expected, forced_command_account)
    assert "token label" not in other.stdout, other.stdout


# pcscd runs as root and drives the token's reader. Debian 12 ships its socket 0666 and the
# daemon without polkit, so the socket's mode is what keeps other accounts away from the token.
CONNECT_PROBE = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
    " print('connected')"
)


@pytest.mark.control("TOK-02")
@pytest.mark.parametrize("account", ["build client", "nobody"])
def test_other_accounts_cannot_reach_pcscd(host: Host, expected: Expected,
                                           client_account: Callable[[str], str],
                                           account: str) -> None:
    if account == "build client":
        if not expected["signer_clients"]:
            pytest.skip("does not apply: the inventory has no build client")
        account = client_account(expected["signer_clients"][0]["name"])
    # Off (no token reader needed): nothing listens. On: the socket is the token owner's.
    r = host.run(f"sudo -n -u {account} python3 -c {shlex.quote(CONNECT_PROBE)} {PCSCD_SOCKET}")
    assert r.rc != 0, f"{account} connected to pcscd"
    assert "connected" not in r.stdout
    assert re.search(r"PermissionError|FileNotFoundError|ConnectionRefusedError", r.stderr), (
        r.stderr
    )


@pytest.mark.control("TOK-02")
def test_token_owner_reaches_pcscd_from_inside_the_daemon_sandbox(host: Host,
                                                                  expected: Expected) -> None:
    if not expected["token_pcscd"]:
        pytest.skip("does not apply: token_pcscd is false, the token needs no reader")
    assert host.run("systemctl is-active --quiet pcscd.socket").rc == 0, "pcscd.socket is not active"
    owner = expected["token_owner"]
    with host.sudo():
        sock = host.file(PCSCD_SOCKET)
        assert sock.is_socket
        assert (sock.user, sock.group) == ("root", owner)
        assert sock.mode & 0o007 == 0, oct(sock.mode)
    # The daemon's own mount and network namespaces (read-only /run, PrivateNetwork), its uid
    # and gid: pcscd answers the PC/SC handshake (SCardEstablishContext) and lists readers.
    pid = _daemon_pid(host, expected)
    uid, gid = host.user(owner).uid, host.group(owner).gid
    with host.sudo():
        boxed = host.run(
            f"nsenter --target {pid} --mount --net --setuid {uid} --setgid {gid}"
            " opensc-tool --list-readers"
        )
    assert boxed.rc == 0, boxed.stdout + boxed.stderr
    assert "establish" not in (boxed.stdout + boxed.stderr).lower()


@pytest.mark.control("TOK-02")
def test_pcscd_runs_without_capabilities_ip_or_new_privileges(host: Host,
                                                             expected: Expected) -> None:
    """pcscd (root) parses what readers and cards send: the running process, woken by the
    token owner as the daemon wakes it, holds no capability, cannot gain one, is under a
    syscall filter, and its unit denies every IP address."""
    if not expected["token_pcscd"]:
        pytest.skip("does not apply: token_pcscd is false, the token needs no reader")
    if not expected.get("token_pcscd_sandbox", True):
        pytest.skip("does not apply: token_pcscd_sandbox is false in the inventory")
    with host.sudo(expected["token_owner"]):
        woke = host.run("opensc-tool --list-readers")
    assert woke.rc == 0, woke.stdout + woke.stderr
    with host.sudo():
        pid = host.run("systemctl show -P MainPID pcscd.service").stdout.strip()
        assert pid not in ("", "0"), "pcscd is not running after a client connected"
        status = dict(line.split(":", 1) for line in
                      host.file(f"/proc/{pid}/status").content_string.splitlines()
                      if ":" in line)
        shown = host.run("systemctl show -p IPAddressDeny -p RestrictAddressFamilies "
                         "-p ProtectSystem pcscd.service").stdout
    unit = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert int(status["CapEff"].strip(), 16) == 0, status["CapEff"]
    assert int(status["CapBnd"].strip(), 16) == 0, status["CapBnd"]
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2", "no syscall filter"
    assert unit.get("ProtectSystem") == "strict", shown
    assert "0.0.0.0/0" in unit.get("IPAddressDeny", ""), shown
    assert set(unit.get("RestrictAddressFamilies", "").split()) == {"AF_UNIX", "AF_NETLINK"}, shown


@pytest.mark.control("TOK-02")
def test_pin_file_is_readable_by_the_daemon_user_only(host: Host, expected: Expected,
                                                      client_account: Callable[[str], str]) -> None:
    pin_file = expected["token_pin_file"]
    with host.sudo():
        f = host.file(pin_file)
        config = host.file(expected["signer_config"]).content_string
        if expected["token_pin_source"] == "prompt":
            # No PIN on the host at all: the daemon starts locked until a custodian unlocks it.
            assert not f.exists, f"{pin_file} exists although the PIN is entered by custodians"
            assert 'pin_source = "prompt"' in config, "the daemon is not configured to prompt"
            return
        assert f.exists, f"{pin_file} is missing (token_pin_source file)"
        assert (f.user, f.mode) == (expected["token_owner"], 0o600)
        assert f'pin_source = "file:{pin_file}"' in config
    for c in expected["signer_clients"]:
        assert host.run(f"sudo -n -u {client_account(c['name'])} cat {pin_file}").rc != 0


@pytest.mark.control("TOK-04", "TOK-01")
def test_configured_keys_are_resident_and_non_extractable(host: Host, expected: Expected) -> None:
    with host.sudo(expected["token_owner"]):
        r = host.run(f"env {_token_env(expected)}{_signer(expected)} keys check "
                     f"--config {expected['signer_config']}")
    assert r.rc == 0, r.stdout + r.stderr


# Root, with the PIN, asks the token for the private value of every profile's key (python-pkcs11
# from the signer's venv) and tries pkcs11-tool's export: both must come back empty-handed. The
# private value is CKA_VALUE for an EC key, CKA_PRIVATE_EXPONENT for an RSA key (it has no
# CKA_VALUE: asking for one is refused as AttributeTypeInvalid and proves nothing).
EXPORT_PROBE = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
module, pin_file, token_label, *labels = sys.argv[1:]
lib = pkcs11.lib(module)
tok = lib.get_token(token_label=token_label)
with tok.open(user_pin=open(pin_file).read().strip()) as s:
    for label in labels:
        k = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        print(label, "extractable", k[Attribute.EXTRACTABLE])
        # The secret part: CKA_VALUE of an EC key, CKA_PRIVATE_EXPONENT of an RSA key (which
        # has no CKA_VALUE: asking for it proves nothing).
        secret = Attribute.PRIVATE_EXPONENT if k.key_type == KeyType.RSA else Attribute.VALUE
        try:
            v = k[secret]
            print(label, "VALUE-READ", len(v))
        except pkcs11.exceptions.PKCS11Error as e:
            print(label, "refused", type(e).__name__)
"""


@pytest.mark.control("TOK-04")
def test_root_cannot_export_the_signing_key(host: Host, expected: Expected) -> None:
    if expected["token_pin_source"] == "prompt":
        pytest.skip("does not apply: token_pin_source prompt, no PIN on the host to log in with")
    pin_file, module, token = expected["token_pin_file"], expected["token_module"], expected["token_label"]
    # The keys on the host's own token, by the labels deploy gave them; a card's keys (`token:`)
    # are out of root's reach altogether (pcscd answers the daemon's user only).
    labels = [str(p["name"]) for p in expected["signer_profiles"] if not p.get("token")]
    assert labels, "the inventory has no signer_profiles: no key to try"
    env = _token_env(expected)
    with host.sudo():
        probe = host.run(
            f"{env}{expected['signer_venv']}/bin/python -c {shlex.quote(EXPORT_PROBE)} "
            f"{module} {pin_file} {shlex.quote(token)} {shlex.join(labels)}"
        )
        base = (
            f"P=$(cat {pin_file}) {env}pkcs11-tool --module {module}"
            f" --token-label {shlex.quote(token)} --login --pin env:P"
        )
        listed = host.run(f"{base} --list-objects --type privkey")
        # Every key's read attempt in one command (one round trip instead of four per key):
        # a file left with anything in it names its key.
        attempts = "; ".join(
            f"O=/root/posture-export-{i}.key; {base} --read-object --type privkey "
            f"--label {shlex.quote(label)} --output-file $O >/dev/null 2>&1; "
            f"test -s $O && echo LEAKED {i}; rm -f $O"
            for i, label in enumerate(labels))
        tried = host.run(attempts)
        leaked = [labels[int(w.split()[1])] for w in tried.stdout.splitlines()
                  if w.startswith("LEAKED ")]
    assert probe.rc == 0, probe.stderr
    for label in labels:
        assert f"{label} extractable False" in probe.stdout, probe.stdout
        assert f"{label} refused AttributeSensitive" in probe.stdout, probe.stdout
    assert "VALUE-READ" not in probe.stdout
    assert listed.rc == 0, listed.stderr
    assert "never extractable" in listed.stdout and "sensitive" in listed.stdout
    assert not leaked, f"exported: {leaked}"


# What the forced command runs (signer/gateway.py FORCED_COMMAND_CODE, the role's
# signer_gateway_code).
GATEWAY_CODE = "from signer.gateway import cli; cli()"


def _forced_command(expected: Expected, role: str, name: str) -> str:
    return (f"{expected['signer_venv']}/bin/python -I -c '{GATEWAY_CODE}' --{role} {name} "
            f"--socket {expected['signer_socket']}")


def _authorized_lines(expected: Expected, account: str) -> list[str]:
    """The lines the inventory gives `account`: a build client's own key on its account, a
    custodian's own key on a custodian's."""
    prefix = expected["signer_client_account_prefix"]
    role, entries = "client", [c for c in expected["signer_clients"]
                               if f"{prefix}{c['name']}" == account]
    if not entries:
        role = "custodian"
        entries = [c for c in expected["signer_custodians"] if c["name"] == account]
    return [
        f'restrict,from="{",".join(e["from"])}",command="{_forced_command(expected, role, e["name"])}" '
        f'{str(e["ssh_key"]).strip()}'
        for e in entries
    ]


# Each account's ~/.ssh/authorized_keys: its owner, mode and content, or why it cannot be read.
AUTHORIZED_KEYS = """
import json, os, pwd, stat, sys
out = {}
for account in json.loads(sys.argv[1]):
    try:
        path = os.path.join(pwd.getpwnam(account).pw_dir, ".ssh", "authorized_keys")
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            out[account] = {"user": pwd.getpwuid(st.st_uid).pw_name,
                            "mode": stat.S_IMODE(st.st_mode), "content": f.read()}
    except (KeyError, OSError) as e:
        out[account] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def authorized_keys(host: Host, forced_command_accounts: list[str]) -> dict[str, dict[str, Any]]:
    """Every forced-command account's authorized_keys (owner, mode, content), read in one round
    trip for the module (four per account before); each case asserts on its own account's."""
    with host.sudo():
        out = host.check_output(shlex.join(["python3", "-c", AUTHORIZED_KEYS,
                                            json.dumps(forced_command_accounts)]))
    keys: dict[str, dict[str, Any]] = json.loads(out)
    return keys


@pytest.mark.control("SGN-01")
def test_forced_command_accounts_only_have_restricted_keys(
        expected: Expected, authorized_keys: dict[str, dict[str, Any]],
        forced_command_account: str) -> None:
    account = forced_command_account
    ak = authorized_keys[account]
    assert "error" not in ak, f"{account}: {ak.get('error')}"
    assert ak["user"] == "root" and not ak["mode"] & 0o022
    lines = [ln for ln in ak["content"].splitlines() if ln and not ln.startswith("#")]
    venv = re.escape(expected["signer_venv"])
    for line in lines:
        assert re.match(
            rf'^restrict,from="[^"]+",command="{venv}/bin/python -I -c \'[^\'"]*\' '
            r'--(client|custodian) [a-z][a-z0-9_-]* --socket \S+" ',
            line,
        ), line
    assert len(lines) == 1, f"{account}: one key, one principal ({len(lines)} lines)"
    # exactly the inventory's keys, each with its own name and from=
    assert sorted(lines) == sorted(_authorized_lines(expected, account))


@pytest.mark.control("SGN-08")
def test_a_broken_signer_config_is_rejected_by_the_validator(host: Host,
                                                             expected: Expected) -> None:
    signer, config = _signer(expected), expected["signer_config"]
    with host.sudo():
        good = host.run(f"{signer} config check {config}")
        bad = host.run(
            f"sed 's/^approvals = .*/approvals = \"two\"/' {config} > /root/bad.toml"
            f" && {signer} config check /root/bad.toml; rc=$?; rm -f /root/bad.toml;"
            " exit $rc"
        )
    assert good.rc == 0, good.stdout + good.stderr
    assert bad.rc == 78, bad.stdout + bad.stderr
    assert "approvals" in bad.stdout + bad.stderr


@pytest.mark.control("SGN-06")
def test_signer_socket_is_reachable_by_the_gateway_group_only(host: Host,
                                                              expected: Expected) -> None:
    with host.sudo():
        s = host.file(expected["signer_socket"])
        assert s.is_socket
        assert (s.user, s.group) == (expected["signer_daemon_user"], expected["signer_gateway_group"])
        assert s.mode & 0o007 == 0


@pytest.mark.control("SGN-02")
def test_every_client_and_custodian_is_bound_to_its_own_account(
        host: Host, expected: Expected, client_account: Callable[[str], str]) -> None:
    """The deployed policy names, for each principal, the one local account it may speak
    through (the daemon checks it with SO_PEERCRED)."""
    with host.sudo():
        text = host.file(expected["signer_config"]).content_string
    cfg = tomllib.loads(text)
    bound = []
    for c in expected["signer_clients"]:
        assert cfg["clients"][c["name"]].get("account") == client_account(c["name"]), c["name"]
        bound.append(cfg["clients"][c["name"]]["account"])
    for c in expected["signer_custodians"]:
        assert cfg["custodians"][c["name"]].get("account") == c["name"], c["name"]
        bound.append(cfg["custodians"][c["name"]]["account"])
    assert len(set(bound)) == len(bound), f"two principals share an account: {sorted(bound)}"
    for account in bound:  # each exists, and is in the socket's group (else it is refused)
        assert host.user(account).exists, account
        assert expected["signer_gateway_group"] in host.user(account).groups, account


@pytest.mark.control("SGN-01")
def test_no_forced_command_account_outside_the_inventory(
        host: Host, expected: Expected, client_account: Callable[[str], str]) -> None:
    """A retired build client or custodian (or the shared account of earlier releases) keeps
    no account with a key into the gateway: every account whose primary group is the gateway
    group is one the inventory names."""
    group = expected["signer_gateway_group"]
    gid = host.check_output(f"getent group {group}").split(":")[2]
    members = sorted(line.split(":")[0] for line in host.check_output("getent passwd").splitlines()
                     if line.split(":")[3] == gid)
    wanted = sorted([client_account(c["name"]) for c in expected["signer_clients"]]
                    + [c["name"] for c in expected["signer_custodians"]])
    assert members == wanted, f"accounts in {group} that the inventory does not name: " \
        f"{sorted(set(members) - set(wanted))}; missing: {sorted(set(wanted) - set(members))}"


@pytest.mark.control("SGN-02")
def test_a_build_clients_account_cannot_speak_as_a_custodian(
        host: Host, expected: Expected, client_account: Callable[[str], str]) -> None:
    """A build client that escaped its forced command runs as its own account: claiming a
    custodian's name from there is refused by the daemon, and the refusal is audited."""
    custodians = expected["signer_custodians"]
    if not custodians or not expected["signer_clients"]:
        pytest.skip("does not apply: the inventory needs a custodian and a build client")
    name = custodians[0]["name"]
    account = client_account(expected["signer_clients"][0]["name"])
    cmd = f"SSH_ORIGINAL_COMMAND=requests {_forced_command(expected, 'custodian', name)}"
    with host.sudo():
        before = host.run(f"wc -l < {expected['signer_audit_log']}").stdout.strip()
    with host.sudo(account):
        r = host.run(cmd)
    assert r.rc != 0, r.stdout + r.stderr
    assert "account" in r.stderr, r.stderr
    with host.sudo():
        tail = host.run(f"tail -n +{int(before) + 1} {expected['signer_audit_log']}").stdout
    assert '"deny"' in tail and name in tail, tail
