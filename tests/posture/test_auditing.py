"""Auditing posture (AUD-01..04): auditd runs with the rules, a change to a watched file
produces an event carrying its key, and the audit trails reach a collector off the host."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import uuid
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testinfra.host import Host

    from tests.posture.conftest import Expected

KEYS = ["signhost-token", "signhost-signer-config", "signhost-signer-bin", "signhost-ssh",
        "signhost-firewall", "signhost-usb", "signhost-sudoers", "signhost-accounts",
        "signhost-modules", "signhost-time"]


def _write_to_a_watched_file(host: Host, directory: str) -> tuple[str, str]:
    """Open a file directly under `directory` for writing, as any change to it starts, and
    return (pid of the opening process, the file's name) for ausearch.

    The file is one that is already there, opened for appending and closed with nothing
    written: the audit watch sees the write access, and the directory and the file keep their
    contents and timestamps, so the AIDE baseline (which covers most watched directories)
    does not change under the posture test (creating and removing a probe file changed the
    directory's mtime: `invoke deploy` after `invoke verify` then re-baselined, changed=1,
    and the daily AIDE check reported it). Only an empty directory gets a probe file, created
    and removed."""
    probe = shlex.quote(f"{directory}/zz-posture-probe.{uuid.uuid4().hex[:8]}")
    script = (f"f=$(find {shlex.quote(directory)} -mindepth 1 -maxdepth 1 -type f -print -quit)"
              '; if [ -n "$f" ]; then echo "$$ $f"; exec 3>>"$f"; '
              f'else echo "$$ "{probe}; : >{probe}; rm -f {probe}; fi')
    out = host.check_output(f"sh -c {shlex.quote(script)}")
    pid, path = out.strip().split(" ", 1)
    return pid, path.rsplit("/", 1)[1]


@pytest.mark.control("AUD-01")
def test_auditd_runs_and_is_enabled(host: Host) -> None:
    svc = host.service("auditd.service")
    assert svc.is_running and svc.is_enabled
    assert "enabled 1" in host.check_output("auditctl -s") or \
        "enabled 2" in host.check_output("auditctl -s")


class Rules:
    """The kernel's loaded audit rules (`auditctl -l`) and the compiled file auditd loads at
    boot, read once for the module: the cases below assert on them, key by key."""

    def __init__(self, loaded: str, at_boot: str) -> None:
        self.loaded, self.at_boot = loaded, at_boot


@pytest.fixture(scope="module")
def rules(host: Host) -> Rules:
    return Rules(host.check_output("auditctl -l"),
                 host.file("/etc/audit/audit.rules").content_string)


@pytest.mark.control("AUD-01")
@pytest.mark.parametrize("key", KEYS)
def test_rules_are_loaded_and_persist_across_reboots(rules: Rules, key: str) -> None:
    assert f"-k {key}" in rules.loaded or f"key={key}" in rules.loaded
    # augenrules compiles rules.d into audit.rules, which auditd loads at boot
    assert f"-k {key}" in rules.at_boot


@pytest.mark.control("AUD-02")
@pytest.mark.parametrize(
    ("directory", "key"),
    [("/etc/ssh/sshd_config.d", "signhost-ssh"),
     ("/etc/sudoers.d", "signhost-sudoers"),
     ("/etc/usbguard", "signhost-usb"),
     ("/etc/nftables.d", "signhost-firewall")],
)
def test_writing_a_watched_file_produces_a_keyed_event(host: Host, directory: str,
                                                       key: str) -> None:
    # (A probe file, where one is needed, has a name none of the services reads: sudo skips
    # names with a dot; sshd has no Include.)
    pid, name = _write_to_a_watched_file(host, directory)
    out = host.run(f"ausearch --input-logs -k {key} -p {pid} -f {shlex.quote(name)} -i")
    assert name in out.stdout, out.stderr


@pytest.mark.control("AUD-03")
def test_module_loading_is_audited(host: Host) -> None:
    rules = host.check_output("auditctl -l")
    assert "finit_module" in rules and "init_module" in rules and "delete_module" in rules
    host.run("modprobe dummy; modprobe -r dummy")
    out = host.run("ausearch --input-logs -k signhost-modules -ts recent -i")
    assert "finit_module" in out.stdout or "init_module" in out.stdout, out.stderr


@pytest.mark.control("AUD-03")
def test_clock_changes_are_audited(rules: Rules) -> None:
    loaded = rules.loaded
    assert "settimeofday" in loaded and "clock_settime" in loaded and "key=signhost-time" in loaded


@pytest.mark.control("AUD-04")
def test_audit_events_go_to_the_collector(host: Host, expected: Expected, is_lab: bool) -> None:
    server = expected["auditd_remote_server"]
    if is_lab and not server:
        pytest.skip("no audisp-remote receiver for this test host (auditd_remote_server is "
                    "empty): its collector takes the signer audit log only (tested below)")
    assert server, "no log collector in the inventory (auditd_remote_server is empty)"
    conf = host.file("/etc/audit/plugins.d/au-remote.conf").content_string
    assert "active = yes" in conf.splitlines()
    remote = host.file("/etc/audit/audisp-remote.conf").content_string.splitlines()
    assert f"remote_server = {server}" in remote, remote
    assert host.process.filter(comm="audisp-remote")


def _collector_copy(expected: Expected) -> list[str]:
    """The collector's copy of the host's signer audit log, read the way the inventory says
    (verify_audit_collector_copy.argv, run on the controller)."""
    argv = [str(a) for a in expected["verify_audit_collector_copy"]["argv"]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shlex.join(argv)}: {proc.stderr.strip()[-300:]}"
    return proc.stdout.splitlines()


@pytest.mark.control("AUD-04")
def test_the_signer_audit_log_is_forwarded_over_a_live_tls_session(host: Host,
                                                                   expected: Expected) -> None:
    collector, port = expected["signer_audit_collector"], expected["signer_audit_collector_port"]
    assert collector, "no collector in the inventory (signer_audit_collector is empty)"
    svc = host.service("rsyslog.service")
    assert svc.is_running and svc.is_enabled
    # rsyslog tails the log the daemon writes (the active file and its closed segments,
    # <stem>.<seq><ext>), and holds a RELP session with the collector (a connection refused or
    # a TLS peer it does not accept leaves none).
    stem, ext = os.path.splitext(expected["signer_audit_log"])
    assert f'file="{stem}*{ext}"' in host.check_output("cat /etc/rsyslog.d/*.conf")
    sessions = host.check_output(f"ss -Htnp state established dst {collector} dport = :{port}")
    assert "rsyslogd" in sessions, f"no session from rsyslogd to {collector}:{port}"


@pytest.mark.control("AUD-04")
def test_the_collector_holds_the_hosts_latest_audit_entry(host: Host, expected: Expected) -> None:
    # Right after a rotation the active file is empty: the latest entry closes the newest
    # segment (<stem>.<first seq><ext>).
    log = expected["signer_audit_log"]
    stem, ext = os.path.splitext(log)
    latest = host.check_output(
        f"f={shlex.quote(log)}; [ -s \"$f\" ] || f=$(ls -1v {shlex.quote(stem)}.*{shlex.quote(ext)}"
        " 2>/dev/null | tail -n 1); tail -n 1 \"$f\"")
    assert latest, "the host's audit log is empty"
    seq = json.loads(latest)["seq"]
    # Forwarding takes a moment (inotify, the queue, the network): wait for it, bounded.
    deadline = time.monotonic() + 60
    copy = _collector_copy(expected)
    while latest not in copy and time.monotonic() < deadline:
        time.sleep(2)
        copy = _collector_copy(expected)
    assert latest in copy, (f"the collector's copy lacks the host's latest entry (seq {seq}); "
                            f"its last is {copy[-1][:120] if copy else '(empty)'}")


@pytest.mark.control("AUD-02")
@pytest.mark.parametrize(
    ("directory", "key"),
    [
        ("/etc/signer/certs", "signhost-signer-config"),
        ("/opt/signer/venv", "signhost-signer-bin"),
        ("/var/lib/signer/state", "signhost-token"),
    ],
)
def test_a_write_under_a_deployed_signer_directory_is_audited(host: Host, directory: str,
                                                              key: str) -> None:
    # These directories appear with `invoke deploy`, after harden loaded the rules: only rules
    # loaded again since then watch them recursively (a probe one level down proves it).
    assert host.file(directory).is_directory, f"{directory} missing: run `invoke deploy` first"
    pid, name = _write_to_a_watched_file(host, directory)
    out = host.run(f"ausearch --input-logs -k {key} -p {pid} -f {shlex.quote(name)} -i")
    assert name in out.stdout, out.stderr
