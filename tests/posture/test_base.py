"""Base posture (BASE-01..07) and the machine-checkable physical controls (PHY-03)."""

from __future__ import annotations

import re
import shlex
import uuid
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from testinfra.backend.base import CommandResult
    from testinfra.host import Host

    from tests.posture.conftest import Expected

ABSENT = ["telnet", "inetutils-telnet", "rsh-client", "ftp", "nis", "avahi-daemon",
          "cups-daemon", "rpcbind"]


@pytest.fixture(scope="module")
def installed(host: Host) -> set[str]:
    """Which of ABSENT dpkg has installed, asked once for the module (one round trip instead
    of eight), with testinfra's rule for "installed": a want of install or hold, and
    "ok installed". Each case asserts on its own package."""
    out = host.run("dpkg-query -f '${Package} ${Status}\\n' -W " + " ".join(ABSENT)).stdout
    return {words[0].split(":")[0] for words in (line.split() for line in out.splitlines())
            if len(words) >= 4 and words[1] in ("install", "hold")
            and words[2:4] == ["ok", "installed"]}


@pytest.mark.control("BASE-01")
@pytest.mark.parametrize("package", ABSENT)
def test_unneeded_packages_are_absent(installed: set[str], package: str) -> None:
    assert package not in installed


@pytest.mark.control("BASE-01")
@pytest.mark.parametrize("unit", ["ctrl-alt-del.target", "debug-shell.service"])
def test_console_escape_units_are_masked(host: Host, unit: str) -> None:
    assert host.check_output(f"systemctl is-enabled {unit} || true") == "masked"


@pytest.mark.control("BASE-02")
def test_time_is_synchronised_from_the_configured_servers(host: Host) -> None:
    assert host.service("systemd-timesyncd.service").is_running
    servers = host.check_output("timedatectl show-timesync -p SystemNTPServers --value")
    assert servers.strip(), "no NTP server configured: timesyncd would use the distro pool"
    # the configured servers are in the firewall's NTP allow-list (anything else is dropped)
    ntp = host.check_output("nft list set inet signhost ntp4") + host.check_output(
        "nft list set inet signhost ntp6")
    for server in servers.split():
        assert server in ntp, f"{server} is not in the firewall's NTP allow-list"


@pytest.mark.control("BASE-03")
def test_security_updates_are_applied_automatically(host: Host, expected: Expected) -> None:
    assert host.package("unattended-upgrades").is_installed
    conf = host.check_output("apt-config dump")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in conf
    assert 'APT::Periodic::Update-Package-Lists "1";' in conf
    assert "-security" in conf  # the security origin is allowed
    # base_apt_timers false: the host's image masks the timers (nothing else runs apt); the
    # configuration above is what a timer would use.
    if expected["base_apt_timers"]:
        assert host.service("apt-daily-upgrade.timer").is_enabled


@pytest.mark.control("BASE-04")
def test_journal_is_persistent(host: Host) -> None:
    machine = host.file("/etc/machine-id").content_string.strip()
    journal = host.file(f"/var/log/journal/{machine}")
    assert journal.is_directory
    assert host.run(f"ls {journal.path}/system.journal").rc == 0


def _admin(expected: Expected, name: str) -> dict[str, Any]:
    return next(u for u in expected["base_admin_users"] if u["name"] == name)


@pytest.mark.control("BASE-05")
def test_admin_keys_are_private_and_sudo_is_logged(host: Host, expected: Expected,
                                                   admin_user: str) -> None:
    admin = _admin(expected, admin_user)
    home = host.user(admin_user).home
    # The account has exactly the inventory's keys, in a file only it can write.
    keys = host.file(f"{home}/.ssh/authorized_keys")
    assert keys.exists and keys.user == admin_user and keys.mode == 0o600
    with host.sudo():
        lines = [ln.strip() for ln in keys.content_string.splitlines() if ln.strip()]
    assert lines == [k.strip() for k in admin["public_keys"]], lines
    # Every sudo of an admin lands in the sudo log with the command it asked for: run without
    # a password where the inventory says so (base_sudo_nopasswd), refused and still logged
    # where sudo wants a password or the admin has no sudo.
    marker = f"signhost-posture-{uuid.uuid4().hex[:12]}"
    with host.sudo(admin_user):
        # From the admin's home: the channel's own working directory is the connecting
        # admin's, and sudo logs the directory it was asked from.
        r = host.run(f"cd {home} && sudo -n /bin/echo {marker}")
    log = f"grep -F -B1 {marker} {expected['base_sudo_logfile']}"
    if not admin.get("sudo", True):
        assert r.rc != 0, f"{admin_user} has sudo, the inventory gives it none"
        entry = " ".join(host.check_output(log).split())
        assert "NOT in sudoers" in entry and f"COMMAND=/bin/echo {marker}" in entry, entry
        return
    if expected["base_sudo_nopasswd"]:
        assert r.rc == 0, r.stderr
        why = ""
    else:
        assert r.rc != 0, f"{admin_user} used sudo without a password"
        why = "a password is required ; "
    # sudo wraps its log file at 80 columns: the entry's first line is the one before.
    entry = " ".join(host.check_output(log).split())
    want = f"{admin_user} : {why}PWD={home} ; USER=root ; COMMAND=/bin/echo {marker}"
    assert want in entry, entry
    assert host.run("visudo -c").rc == 0


@pytest.mark.control("BASE-05")
def test_local_passwords_are_hashed_with_many_rounds(host: Host) -> None:
    defs = host.file("/etc/login.defs").content_string.splitlines()
    assert "SHA_CRYPT_MIN_ROUNDS 65536" in defs and "SHA_CRYPT_MAX_ROUNDS 65536" in defs


@pytest.mark.control("BASE-06")
def test_ssh_shows_the_login_banner_before_authentication(host: Host) -> None:
    r = host.run("ssh -n -o BatchMode=yes -o StrictHostKeyChecking=no "
                 "-o UserKnownHostsFile=/dev/null -o PubkeyAuthentication=no nobody@127.0.0.1 true; true")
    assert "Authorised access only" in r.stderr, r.stderr
    assert "Authorised access only" in host.file("/etc/issue").content_string


AIDE_CHECK = "aide --config /etc/aide/signhost.conf --check"


@pytest.fixture(scope="module")
def aide_now(host: Host, expected: Expected) -> CommandResult:
    """The daily check's report as it is now, before the probe below (one full check: tens of
    seconds on a small host)."""
    assert host.file(expected["base_aide_database"]).exists
    before = host.run(AIDE_CHECK)
    assert before.rc < 14, before.stdout[-2000:] + before.stderr
    return before


@pytest.mark.control("BASE-07")
def test_nothing_differs_from_the_aide_baseline(aide_now: CommandResult) -> None:
    """The baseline is the record of what the toolkit left (provision builds it; harden and
    deploy take in their own changes, and only those): on a host nobody has touched since, the
    daily check reports nothing. Each entry listed is a change made outside the toolkit, or
    one that a harden or deploy found and left for a person to look at."""
    assert aide_now.rc == 0, f"differs from the AIDE baseline: {_aide_entries(aide_now.stdout)}"


@pytest.mark.control("BASE-07")
def test_aide_detects_a_change_in_a_watched_path(host: Host, expected: Expected,
                                                 aide_now: CommandResult) -> None:
    """A file added where AIDE watches with the signing host's rule is reported; removed again,
    it leaves nothing behind: the daily check reports afterwards exactly what it reported
    before (the probe directory's own entry is not watched, only what is inside it).

    The check with the probe in place is limited to the probe's directory (`--limit`: the same
    configuration, rule and database, only the other paths are not hashed again); the check
    after it is the full daily check, compared with the full one before."""
    before = aide_now
    probe_dir = str(expected["base_aide_probe_dir"])
    probe = f"{probe_dir}/aide-probe-{uuid.uuid4().hex[:8]}"
    host.check_output(f"echo probe > {probe}")
    try:
        during = host.run(f"{AIDE_CHECK} --limit {shlex.quote(re.escape(probe_dir) + '/')}")
    finally:
        host.run(f"rm -f {probe}")
    after = host.run(AIDE_CHECK)
    assert during.rc != 0 and probe in during.stdout, during.stdout[-2000:]
    assert after.rc == before.rc and _aide_entries(after.stdout) == _aide_entries(before.stdout), (
        f"the probe left a trace: before {_aide_entries(before.stdout)}, "
        f"after {_aide_entries(after.stdout)}")
    assert host.service("signhost-aide-check.timer").is_enabled


def _aide_entries(report: str) -> list[str]:
    """The added, removed and changed entries of an AIDE report (its summary lines)."""
    return sorted(line for line in report.splitlines()
                  if line[:1].islower() and ": /" in line)


@pytest.mark.control("PHY-03")
def test_secure_boot_is_enabled(host: Host) -> None:
    # PHY-03 applies to production hosts: the conftest skips it elsewhere with the waiver.
    out = host.run("mokutil --sb-state")
    assert "SecureBoot enabled" in out.stdout, out.stdout + out.stderr


@pytest.mark.control("PHY-03")
def test_root_filesystem_is_encrypted(host: Host) -> None:
    tree = host.check_output("lsblk -s -n -o TYPE \"$(findmnt -n -o SOURCE /)\"")
    assert "crypt" in tree.split(), tree
