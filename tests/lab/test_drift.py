"""Drift: a hardened value changed on the host behind the toolkit's back is put back by the
next `invoke harden`, and the run reports it as a change (KRN-01)."""

from __future__ import annotations

import os
import subprocess

import pytest

from lab.state import LabState
from toolkit.runner.ansible_run import build_command, run_playbook

pytestmark = pytest.mark.lab


def _root(lab: LabState, command: str) -> str:
    r = subprocess.run(["ssh", "-F", str(lab.ssh_config), lab.ssh_alias, f"sudo {command}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.slow
@pytest.mark.control("KRN-01")
def test_a_sysctl_changed_by_hand_is_put_back_by_harden(lab: LabState, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert _root(lab, "/usr/sbin/sysctl -n kernel.kptr_restrict") == "2", "not hardened yet"
    # The file on disk stays as harden wrote it: only the running kernel drifts.
    _root(lab, "/usr/sbin/sysctl -q -w kernel.kptr_restrict=0")
    try:
        os.environ.setdefault("SIGNLAB_INSTANCE", lab.raw["instance"])
        check = run_playbook(build_command("harden.yml", tags="preflight,kernel-sysctl",
                                           check=True), tmp_path / "check.log")
        assert check.returncode == 0 and check.changed >= 1, "check mode did not see the drift"
        assert _root(lab, "/usr/sbin/sysctl -n kernel.kptr_restrict") == "0", \
            "check mode changed the host"
        fix = run_playbook(build_command("harden.yml", tags="preflight,kernel-sysctl"),
                           tmp_path / "fix.log")
        assert fix.returncode == 0 and fix.changed >= 1, "harden did not report the drift"
        assert _root(lab, "/usr/sbin/sysctl -n kernel.kptr_restrict") == "2"
    finally:
        _root(lab, "/usr/sbin/sysctl -q --system")
