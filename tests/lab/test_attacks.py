"""Attacks from the lab network against the hardened VM (NET-01, NET-04, SSH-07).

The intruder shares the VM's segment and must get no ping reply (the TCP probes from the
intruder and the build host are posture tests now: tests/posture/test_firewall.py, from the
inventory's vantage points). The roll-back tests apply a ruleset, then an sshd_config, that lock the
controller out and watch the host come back by itself; the failed run must say which controls
it left unapplied.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lab.state import LabState
from lab.target import Target
from tests.lab.aide import HELPER, limit, root
from toolkit.runner.ansible_run import PlaybookResult, PlayOptions, build_command, run_playbook

if TYPE_CHECKING:
    from tests.lab.conftest import WaitFor

pytestmark = pytest.mark.lab


@pytest.mark.control("NET-01")
def test_intruder_gets_no_ping_reply(lab: LabState) -> None:
    r = lab.netns_run("intruder", ["ping", "-c", "2", "-W", "2", lab.vm_ipv4], timeout=30)
    assert r.returncode != 0, r.stdout


def _admin_ssh_ok(target: Target) -> bool:
    """A new login as the inventory's admin (its way in, no shared master connection)."""
    argv = target.admin_argv("-o", "ControlPath=none", "-o", "ConnectTimeout=10",
                             "-o", "BatchMode=yes")
    r = subprocess.run([*argv, "true"], capture_output=True, timeout=60)
    return r.returncode == 0


def _ssh_root(target: Target, command: str) -> str:
    return str(target.admin_run(command, sudo=True, timeout=60).stdout)


# Seconds before an unconfirmed change comes back (the roles' default: 120). The play's probe
# must have failed before it: a ruleset that drops the controller fails the probe only at its
# ConnectTimeout (20 s); an sshd that lets nobody in refuses the probe within seconds.
ROLLBACK_WINDOW = {"firewall": 45, "ssh": 25}


def _lock_out_and_watch_it_roll_back(target: Target, wait_for: WaitFor, role: str, dest: str,
                                     log: Path) -> PlaybookResult:
    """Apply `role` with its self-test hook that locks the controller out: the play cannot log in
    again and fails, and the host puts `dest` back by itself within the roll-back window."""
    assert _admin_ssh_ok(target), "the lab VM must be reachable before the test"
    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    since = _ssh_root(target, "date +%s").strip()
    cmd = build_command("harden.yml", PlayOptions(
        inventory=target.inventory, vault_password_file=target.vault_password_file,
        tags=f"preflight,{role}",
        extra_vars={f"{role}_selftest_lock_out_admins": "true",
                    f"{role}_rollback_seconds": str(ROLLBACK_WINDOW[role])}))
    started = time.monotonic()
    result = run_playbook(cmd, log)
    assert result.returncode != 0, f"the lockout {role} change was confirmed: the hook did nothing"
    assert not _admin_ssh_ok(target), "the controller could still log in: nothing was locked out"
    left = started + ROLLBACK_WINDOW[role] + 120 - time.monotonic()
    assert wait_for(lambda: _admin_ssh_ok(target), left, 5), \
        "the host did not come back: no roll-back"
    # This run's roll-back of this file, not an older entry of the journal.
    journal = _ssh_root(target, f"journalctl -t signhost-rollback --no-pager --since @{since}")
    assert f"ROLLED BACK: {dest} restored" in journal, journal
    # The test's own writes, exactly, into the AIDE baseline (the roll-back put the file back
    # but left its directory's times changed): the tests after this one start from a host
    # whose daily check has nothing to report, as after the pipeline's harden and deploy.
    if target.values["base_aide"]:
        root(target, f"{HELPER} take {limit([dest, os.path.dirname(dest)], whole=False)}")
    return result


@pytest.mark.slow
@pytest.mark.control("NET-04", "SSH-07")
def test_a_lockout_ruleset_rolls_itself_back(target: Target, wait_for: WaitFor,
                                             tmp_path: Path) -> None:
    """A ruleset without the admin network comes back to the previous one by itself."""
    assert target.admin_networks4, f"{target.inventory}: no IPv4 admin network"
    _lock_out_and_watch_it_roll_back(target, wait_for, "firewall",
                                     "/etc/nftables.d/signhost.nft", tmp_path / "lockout.log")
    rules = _ssh_root(target, "nft -j list set inet signhost admin4")
    assert target.admin_networks4[0].split("/")[0] in json.dumps(json.loads(rules)), rules


@pytest.mark.slow
@pytest.mark.control("SSH-07")
def test_a_lockout_sshd_config_rolls_itself_back(target: Target, wait_for: WaitFor,
                                                 tmp_path: Path) -> None:
    """An sshd_config that lets nobody in (it passes `sshd -t`) comes back to the previous one by
    itself, and the failed run says the ssh controls are not in place."""
    allow_before = [ln for ln in _ssh_root(target, "sshd -T").splitlines()
                    if ln.startswith("allowusers ")]
    assert allow_before, "sshd -T shows no AllowUsers before the test"
    result = _lock_out_and_watch_it_roll_back(target, wait_for, "ssh", "/etc/ssh/sshd_config",
                                              tmp_path / "ssh-lockout.log")
    # The failed run tells the operator exactly what is and is not in place.
    [host] = result.controls
    assert host.failed_at is not None and host.failed_at["role"] == "ssh", host.failed_at
    assert host.roles["preflight"] == "applied" and host.roles["ssh"] == "failed", host.roles
    assert host.controls.get("SSH-07") == "failed" and host.controls.get("SSH-04") == "failed"
    assert host.roles["kernel"] == "not run", host.roles  # left out by --tags
    assert host.controls.get("NET-01") in ("not reached", "not run"), host.controls
    allow_after = [ln for ln in _ssh_root(target, "sshd -T").splitlines()
                   if ln.startswith("allowusers ")]
    assert allow_after == allow_before, "the previous AllowUsers did not come back"
