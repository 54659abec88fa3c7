"""Fixtures for the end-to-end lab tests (tests/lab): they run against a running lab.

`lab` is the running instance's LabState ($SIGNLAB_INSTANCE, default lab0). When no lab is
up the tests are skipped with the reason, except under the pipeline (`invoke ci` sets
SIGNLAB_REQUIRE_LAB=1), where a missing lab is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from lab import state
from lab.state import LabState


@pytest.fixture(scope="session")
def lab() -> LabState:
    st = state.load()
    if st is None:
        msg = f"no running lab ({state.instance_name()}): run `invoke lab.up`"
        if os.environ.get("SIGNLAB_REQUIRE_LAB") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return st


@pytest.fixture(scope="session")
def admin_ssh(lab: LabState) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command on the VM as the lab admin (through the lab's ssh_config)."""

    def run(cmd: str, *, timeout: float = 120, check: bool = False,
            sudo: bool = False) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", "-F", str(lab.ssh_config), lab.ssh_alias,
                ("sudo -n " if sudo else "") + cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=check)

    return run


def _wait_for(pred: Callable[[], object], timeout: float = 90, interval: float = 2) -> bool:
    """Poll `pred` until it is true or `timeout` seconds pass; True when it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., bool]:
    """`assert wait_for(lambda: ..., timeout=60)`: the guest is slow (TCG), things appear late."""
    return _wait_for
