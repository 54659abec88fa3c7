"""Drift: a hardened value changed on the host behind the toolkit's back is put back by the
next `invoke harden`, and the run reports it as a change (KRN-01)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.target import Target
from toolkit.runner.ansible_run import PlayOptions, build_command, run_playbook

pytestmark = pytest.mark.lab


def _root(target: Target, command: str) -> str:
    r = target.admin_run(command, sudo=True)
    assert r.returncode == 0, r.stderr
    return str(r.stdout).strip()


@pytest.mark.slow
@pytest.mark.control("KRN-01")
def test_a_sysctl_changed_by_hand_is_put_back_by_harden(target: Target, tmp_path: Path) -> None:
    assert _root(target, "/usr/sbin/sysctl -n kernel.kptr_restrict") == "2", "not hardened yet"
    # The file on disk stays as harden wrote it: only the running kernel drifts.
    _root(target, "/usr/sbin/sysctl -q -w kernel.kptr_restrict=0")
    try:
        os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
        inv, vault = target.inventory, target.vault_password_file
        check = run_playbook(build_command("harden.yml", PlayOptions(
                                 tags="preflight,kernel-sysctl", check=True, inventory=inv,
                                 vault_password_file=vault)), tmp_path / "check.log")
        assert check.returncode == 0 and check.changed >= 1, "check mode did not see the drift"
        assert _root(target, "/usr/sbin/sysctl -n kernel.kptr_restrict") == "0", \
            "check mode changed the host"
        fix = run_playbook(build_command("harden.yml", PlayOptions(
                               tags="preflight,kernel-sysctl", inventory=inv,
                               vault_password_file=vault)),
                           tmp_path / "fix.log")
        assert fix.returncode == 0 and fix.changed >= 1, "harden did not report the drift"
        assert _root(target, "/usr/sbin/sysctl -n kernel.kptr_restrict") == "2"
    finally:
        _root(target, "/usr/sbin/sysctl -q --system")
