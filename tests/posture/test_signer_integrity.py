"""What the signer's own tests prove on the controller, proven on the deployed host: no token
PIN in any log the host keeps, the live audit log vouched for by the installed audit
certificate, the deployed policy the inventory's, the daemon refusing (and auditing) a
request made from the wrong account, and the installed gateway refusing a malformed command.

Each test leaves at most what it proves behind: an audit `deny` entry, never a signature, a
queued request or a change of state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from toolkit.assurance.log_search import (
    SHARE_MARKER,
    Findings,
    Secret,
    search_host_logs,
)

if TYPE_CHECKING:
    from testinfra.host import Host

    from tests.posture.conftest import Expected

REQUEST_ID = "0" * 32  # a well-formed request id no one has


def _signer(expected: Expected) -> str:
    return f"{expected['signer_venv']}/bin/signer"


@contextlib.contextmanager
def _unlogged() -> Iterator[None]:
    """testinfra logs every command's result (stdout included) at debug level: not this one."""
    logger = logging.getLogger("testinfra")
    was, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was


# --- no PIN in any log (TOK-03) --------------------------------------------------------------

def _known_pins(host: Host, expected: Expected) -> tuple[dict[str, Secret], list[str]]:
    """The token's PINs from where the token role keeps them, and where each was looked for.

    On the host: the daemon's PIN file (pin_source file), read through the root channel; its
    content comes back on the channel's output, which nothing logs (the command line, which
    the host logs, is `cat PATH`). On the controller: the token role's PIN directory
    (token_pin_dir: user-pin, and so-pin where the role initialised the token). And any
    custodian's share of the PIN, by its marker (SHARE_MARKER), on every host: a share that
    reached a log is found whether or not this host takes shares.
    """
    pins: dict[str, Secret] = {"a custodian's PIN share (its marker)": Secret(SHARE_MARKER)}
    looked: list[str] = ["PIN shares by their marker"]
    if expected["token_pin_source"] == "file":
        path = expected["token_pin_file"]
        looked.append(f"{path} on the host")
        with _unlogged(), host.sudo():
            r = host.run(f"cat -- {shlex.quote(path)}")
        secret = Secret(r.stdout_bytes.strip()) if r.rc == 0 else Secret(b"")
        del r  # nothing that holds the PIN stays in a frame a traceback could show
        if len(secret):
            pins["user PIN (the daemon's PIN file)"] = secret
    pin_dir = expected.get("token_pin_dir")
    if pin_dir:
        for name, label in (("user-pin", "user PIN"), ("so-pin", "SO PIN")):
            path = Path(str(pin_dir)) / name
            looked.append(f"{path} on the controller")
            try:
                secret = Secret(path.read_bytes().strip())
            except OSError:
                continue
            if len(secret) and not any(secret.same_as(s) for s in pins.values()):
                pins[f"{label} ({path.name} on the controller)"] = secret
    # Each card's PIN ([tokens.*], token_cards), from its pin_src on the controller: a card
    # its custodians unlock has no PIN file on the host, and its PIN must reach no log either.
    for card in expected.get("token_cards") or []:
        name = str(card.get("name"))
        src = card.get("pin_src") or (Path(str(pin_dir)) / f"{name}-user-pin"
                                      if pin_dir else None)
        if src is None:
            continue
        looked.append(f"{src} on the controller (card {name})")
        try:
            secret = Secret(Path(str(src)).read_bytes().strip())
        except OSError:
            continue
        if len(secret) and not any(secret.same_as(s) for s in pins.values()):
            pins[f"card {name}'s user PIN (on the controller)"] = secret
    return pins, looked


def _log_sources(expected: Expected) -> list[str]:
    """Log files outside the journal: /var/log (the audit log and sudo's log included, wherever
    auditd.conf and the inventory put them) and the signer's own audit log."""
    paths = ["/var/log", str(expected["signer_audit_log"])]
    sudo_log = expected.get("base_sudo_logfile")
    if sudo_log:
        paths.append(str(sudo_log))
    return paths


def _search_host_logs(host: Host, expected: Expected, pins: dict[str, Secret]) -> Findings:
    """The host's journal and log files, searched on the controller (log_search)."""

    def run(command: str) -> tuple[int, bytes, str]:
        with host.sudo():
            r = host.run(command)
        return r.rc, r.stdout_bytes, r.stderr

    return search_host_logs(run, _log_sources(expected), pins)


@pytest.mark.control("TOK-03")
def test_no_token_pin_appears_in_any_log_of_the_host(host: Host, expected: Expected) -> None:
    """Sudo's command lines, auditd's execve records, every unit's and user's journal: the
    PINs reach the host only through channels no log records (stdin, a file the daemon's user
    alone reads). Compared on the controller: a search on the host would put the PIN on a
    command line there. No PIN or log text is ever printed, only where a hit is. Custodians'
    PIN shares are looked for on every host, by their marker: with no PIN known here (looked
    for in `_known_pins`' places) the search still proves that no share reached a log."""
    pins, _looked = _known_pins(host, expected)
    found = _search_host_logs(host, expected, pins)
    assert found.searched > 0, "no log was searched"
    assert not found.unsearched, "logs that could not be searched: " + "; ".join(found.unsearched)
    assert not found.hits, (f"{len(found.hits)} place(s) in the host's logs hold a token PIN: "
                            + "; ".join(found.hits[:20]))


@pytest.mark.control("BASE-05")
def test_no_sudo_password_appears_in_any_log_of_the_host(host: Host, expected: Expected,
                                                         become_password: Secret | None) -> None:
    """The admin's sudo password (ansible-vault, or asked once) reaches sudo only on its
    standard input or terminal: through Ansible's become (Mitogen answers sudo's prompt on a
    pty), the verify suite's root channel (`sudo -S`) and the outside auditors. Every run
    before this one on the host left its traces in the logs searched here."""
    if not become_password:
        pytest.skip("does not apply: sudo on this host asks no password (the inventory gives "
                    "none and none was asked for)")
    found = _search_host_logs(host, expected, {"the admin's sudo password": become_password})
    assert found.searched > 0, "no log was searched"
    assert not found.unsearched, "logs that could not be searched: " + "; ".join(found.unsearched)
    assert not found.hits, (f"{len(found.hits)} place(s) in the host's logs hold the sudo "
                            "password: " + "; ".join(found.hits[:20]))


# --- the live audit log (SGN-05) -------------------------------------------------------------

def _audit_verify(host: Host, expected: Expected, log: str) -> tuple[int, str]:
    """`signer audit verify --cert AUDIT-CERT --live LOG` as the daemon's user (its files)."""
    cmd = (f"{_signer(expected)} audit verify --cert {shlex.quote(expected['signer_audit_cert'])} "
           f"--live {log}")
    with host.sudo(expected["signer_daemon_user"]):
        r = host.run(cmd)
    return r.rc, (r.stdout + r.stderr).strip()


@pytest.mark.control("SGN-05")
def test_the_live_audit_log_is_vouched_for_by_the_installed_audit_certificate(
        host: Host, expected: Expected) -> None:
    """The hash chain and every checkpoint's signature, checked against the audit key's
    certificate installed on the host; the tail after the last checkpoint is reported, not
    failed (the daemon is running)."""
    log = shlex.quote(expected["signer_audit_log"])
    rc, said = _audit_verify(host, expected, log)
    if rc != 0 and "no checkpoint" in said and expected["token_pin_source"] == "prompt":
        pytest.skip("does not apply yet: the daemon has been locked since it was deployed "
                    "(pin_source prompt) and no custodian has unlocked it, so no checkpoint "
                    f"is signed: {said}")
    assert rc == 0, said
    assert re.search(r"ok: seq 0\.\.\d+, [1-9]\d* checkpoint\(s\) verified", said), said


@pytest.mark.control("SGN-05")
def test_a_copy_of_the_audit_log_without_its_first_entry_is_refused(host: Host,
                                                                    expected: Expected) -> None:
    """The same verifier on the host is not a formality: a copy with its first line cut is
    refused and the first missing sequence number named (the live log is not touched)."""
    log = shlex.quote(expected["signer_audit_log"])
    with host.sudo(expected["signer_daemon_user"]):
        # an explicit /tmp: the root channel's TMPDIR (pam_tmpdir) is not the daemon user's
        copy = host.run(f"t=$(mktemp /tmp/signhost-posture-audit.XXXXXX) && "
                        f"sed 1d {log} > \"$t\" && echo \"$t\"")
    assert copy.rc == 0, copy.stderr
    tmp = shlex.quote(copy.stdout.strip())
    try:
        rc, said = _audit_verify(host, expected, tmp)
    finally:
        with host.sudo():
            host.run(f"rm -f -- {tmp}")
    assert rc == 1, said
    assert "first bad seq 0" in said, said


# --- the deployed policy is the inventory's (SGN-02, SGN-03, SGN-04) -------------------------

PROFILE_FIELDS = ("algorithm", "formats", "max_size", "clients", "approvals", "custodians",
                  "budget_count", "budget_window", "max_queued", "request_ttl",
                  "require_timestamp")


def _deployed(host: Host, expected: Expected) -> dict[str, Any]:
    with host.sudo():
        return tomllib.loads(host.file(expected["signer_config"]).content_string)


@pytest.mark.control("SGN-02", "SGN-03", "SGN-04")
def test_the_deployed_policy_is_the_inventorys(host: Host, expected: Expected,
                                               client_account: Callable[[str], str]) -> None:
    """Profiles (who may use each, approvals and custodians, budget), clients and custodians
    (their keys and the account each is bound to): every value the inventory gives is the one
    the daemon's configuration has, and nothing is there that the inventory does not list."""
    cfg = _deployed(host, expected)
    wrong: list[str] = []
    profiles = {str(p["name"]): p for p in expected["signer_profiles"]}
    deployed = cfg.get("profiles", {})
    if set(deployed) != set(profiles):
        wrong.append(f"profiles: deployed {sorted(deployed)}, inventory {sorted(profiles)}")
    for name, want in profiles.items():
        got = deployed.get(name, {})
        for key in PROFILE_FIELDS:
            if key in want and got.get(key) != want[key]:
                wrong.append(f"profiles.{name}.{key}: deployed {got.get(key)!r}, "
                             f"inventory {want[key]!r}")
    for section, entries, account in (
            ("clients", expected["signer_clients"], lambda c: client_account(c["name"])),
            ("custodians", expected["signer_custodians"], lambda c: c["name"])):
        listed = {str(c["name"]): c for c in entries}
        have = cfg.get(section, {})
        if set(have) != set(listed):
            wrong.append(f"{section}: deployed {sorted(have)}, inventory {sorted(listed)}")
        for name, c in listed.items():
            got = have.get(name, {})
            if got.get("ssh_key") != str(c["ssh_key"]).strip():
                wrong.append(f"{section}.{name}.ssh_key differs from the inventory's")
            if got.get("account") != account(c):
                wrong.append(f"{section}.{name}.account: deployed {got.get('account')!r}, "
                             f"want {account(c)!r}")
    assert not wrong, "; ".join(wrong)


@pytest.mark.control("SGN-02", "SGN-03", "SGN-04", "SGN-08")
def test_the_daemon_runs_the_deployed_policy(host: Host, expected: Expected) -> None:
    """The running daemon read the configuration that is on disk: it started after the file
    was last written (a policy change that was never applied would leave the old one running)."""
    unit, config = f"{expected['signer_service']}.service", expected["signer_config"]
    with host.sudo():
        started = host.check_output(f"date -d \"$(systemctl show -p ExecMainStartTimestamp "
                                    f"--value {unit})\" +%s")
        written = host.check_output(f"stat -c %Y {shlex.quote(config)}")
    assert int(started) >= int(written), (
        f"{unit} started at {time.strftime('%F %T', time.gmtime(int(started)))} UTC, before "
        f"{config} was written at {time.strftime('%F %T', time.gmtime(int(written)))} UTC")


# --- refusals from the wrong account (SGN-02) ------------------------------------------------

def _audit_lines(host: Host, expected: Expected) -> int:
    with host.sudo():
        return int(host.check_output(f"wc -l < {shlex.quote(expected['signer_audit_log'])}"))


def _audit_after(host: Host, expected: Expected,
                 before: int) -> list[dict[str, Any]]:
    with host.sudo():
        tail = host.check_output(
            f"tail -n +{before + 1} {shlex.quote(expected['signer_audit_log'])}")
    return [json.loads(line) for line in tail.splitlines() if line.strip()]


GATEWAY_CODE = "from signer.gateway import cli; cli()"  # the role's forced command runs it


def _gateway(expected: Expected, role: str, name: str, command: str) -> str:
    """The forced command as the role writes it, with SSH_ORIGINAL_COMMAND as sshd sets it."""
    return (f"SSH_ORIGINAL_COMMAND={shlex.quote(command)} {expected['signer_venv']}/bin/python "
            f"-I -c {shlex.quote(GATEWAY_CODE)} --{role} {name} "
            f"--socket {expected['signer_socket']} </dev/null")


def _other_accounts(expected: Expected, client: str,
                    client_account: Callable[[str], str]) -> list[str]:
    """Accounts in the socket's group that are not `client`'s own: every other build client's,
    and a custodian's."""
    others = [client_account(c["name"]) for c in expected["signer_clients"]
              if c["name"] != client]
    return others + [str(c["name"]) for c in expected["signer_custodians"][:1]]


# Runs (account, command) pairs on the host as root, two at a time (the gateway's start-up is
# most of each one's time), each as its account the way `host.sudo(account)` runs one
# (`runuser -u ACCOUNT -- /bin/sh -c`), and returns each one's exit status and output, the
# account's uid, and the audit log's lines that appeared meanwhile: one round trip for them all.
AS_ACCOUNTS = """
import json, pwd, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
log, tries = sys.argv[1], json.loads(sys.argv[2])
def lines():
    with open(log, "rb") as f:
        return f.read().splitlines()
def run(t):
    account, cmd = t
    p = subprocess.run(["runuser", "-u", account, "--", "/bin/sh", "-c", cmd],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return {"uid": pwd.getpwnam(account).pw_uid, "rc": p.returncode, "out": p.stdout,
            "err": p.stderr}
before = len(lines())
with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(run, tries))
print(json.dumps({"results": results, "audit": [l.decode() for l in lines()[before:]]}))
"""


def _as_accounts(host: Host, expected: Expected,
                 jobs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """AS_ACCOUNTS: each job's result (uid, rc, out, err) and the audit entries it left."""
    with host.sudo():
        out = host.check_output(shlex.join(["python3", "-c", AS_ACCOUNTS,
                                            str(expected["signer_audit_log"]),
                                            json.dumps(jobs)]))
    done = json.loads(out)
    return done["results"], [json.loads(line) for line in done["audit"] if line.strip()]


@pytest.mark.control("SGN-02")
def test_a_build_clients_name_is_refused_from_any_other_account(
        host: Host, expected: Expected, client_account: Callable[[str], str]) -> None:
    """Each build client speaks through its own account: from another client's account, or a
    custodian's (both in the socket's group), its name is refused by the daemon (SO_PEERCRED:
    the name is bound to the client's account), and each refusal is audited. The command is a
    read (`status`), so nothing else changes. Every (client, account) try runs in one round
    trip (AS_ACCOUNTS); each is told apart in the audit log by its client and its uid."""
    tries = [(str(c["name"]), account) for c in expected["signer_clients"]
             for account in _other_accounts(expected, str(c["name"]), client_account)]
    if not tries:
        pytest.skip("does not apply: the inventory needs a build client and another account "
                    "(a second client or a custodian)")
    jobs = [(account, _gateway(expected, "client", client, f"status {REQUEST_ID}"))
            for client, account in tries]
    results, audit = _as_accounts(host, expected, jobs)
    for (client, account), r in zip(tries, results, strict=True):
        assert r["rc"] == 77, f"{client} from {account}: {r['out']}{r['err']}"
        assert "account" in r["err"] and r["out"] == "", r["err"]
        denials = [e for e in audit if e.get("event") == "deny" and e.get("client") == client
                   and f"connected as uid {r['uid']}," in str(e.get("reason"))]
        assert len(denials) == 1, (f"{client} from {account} (uid {r['uid']}): "
                                   f"{len(denials)} denials in {audit}")


CONNECT_PROBE = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
                 "s.connect(sys.argv[1]); print('connected')")


@pytest.mark.control("SGN-02")
def test_an_account_outside_the_gateway_group_cannot_reach_the_daemon(host: Host,
                                                                      expected: Expected) -> None:
    """Any other local account (here `nobody`) does not even reach the daemon: the socket
    refuses the connection, so nothing can be asked and nothing is logged."""
    before = _audit_lines(host, expected)
    with host.sudo("nobody"):
        r = host.run(f"python3 -c {shlex.quote(CONNECT_PROBE)} "
                     f"{shlex.quote(expected['signer_socket'])}")
    assert r.rc != 0 and "connected" not in r.stdout, r.stdout
    assert "PermissionError" in r.stderr, r.stderr
    assert _audit_lines(host, expected) == before, _audit_after(host, expected, before)


# --- strict request parsing at the door (SGN-07) ---------------------------------------------

BAD_COMMANDS = [
    ("sh -i", "unknown command"),
    ("sign --profile {profile}; id", "unknown option"),
    ("sign --profile $(id)", "bad profile name"),
    ("sign --profile {profile} --name 'a\nb'", "control"),
    ("status ../../etc/passwd", "bad request id"),
]


@pytest.mark.control("SGN-07")
@pytest.mark.parametrize(("command", "text"), BAD_COMMANDS, ids=[c for c, _ in BAD_COMMANDS])
def test_the_installed_gateway_refuses_a_bad_command_in_one_line(
        host: Host, expected: Expected, client_account: Callable[[str], str], command: str,
        text: str) -> None:
    """The forced command as deployed, run as the client's account the way sshd runs it: a
    command that is not exactly one of the signer's gets exit 64, one line on stderr, nothing on
    stdout, and never reaches the daemon (nothing is audited)."""
    if not expected["signer_clients"] or not expected["signer_profiles"]:
        pytest.skip("does not apply: the inventory needs a build client and a profile")
    client = str(expected["signer_clients"][0]["name"])
    command = command.format(profile=expected["signer_profiles"][0]["name"])
    # (Three round trips: through AS_ACCOUNTS, one try costs more in python3's start-up.)
    before = _audit_lines(host, expected)
    with host.sudo(client_account(client)):
        r = host.run(_gateway(expected, "client", client, command))
    assert r.rc == 64, r.stdout + r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("signer: ") and text in r.stderr, r.stderr
    assert _audit_lines(host, expected) == before, _audit_after(host, expected, before)
