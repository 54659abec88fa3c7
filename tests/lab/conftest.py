"""Fixtures for the end-to-end lab tests (tests/lab): they run against a running lab.

`lab` is the running instance's LabState ($SIGNLAB_INSTANCE, default lab0). When no lab is
up the tests are skipped with the reason, except under the pipeline (`invoke ci` sets
SIGNLAB_REQUIRE_LAB=1), where a missing lab is a failure, never a silent skip.

`target` is the inventory under test (lab/target.py): `--lab-inventory DIR` (with
`--lab-vault-password-file FILE`), else $SIGNLAB_TEST_INVENTORY, else inventory/lab. `invoke ci`
passes the production-style inventory that `lab.site` rendered; the tests read the names,
keys, profiles, paths and the admin connection from it, so the same tests prove both.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

import pytest

from lab import state
from lab import target as target_mod
from lab.state import LabState
from lab.target import Party, Target


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lab", "the inventory the lab tests drive (tests/lab)")
    group.addoption("--lab-inventory", default=None,
                    help=f"inventory of the lab's host (default ${target_mod.ENV_INVENTORY} "
                         "or inventory/lab)")
    group.addoption("--lab-vault-password-file", default=None,
                    help=f"its vault password file (default ${target_mod.ENV_VAULT} or "
                         "$ANSIBLE_VAULT_PASSWORD_FILE)")


def _unavailable(msg: str) -> None:
    if os.environ.get("SIGNLAB_REQUIRE_LAB") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def lab() -> LabState:
    st = state.load()
    if st is None:
        _unavailable(f"no running lab ({state.instance_name()}): run `invoke lab.up`")
    assert st is not None
    return st


@pytest.fixture(scope="session")
def target(lab: LabState, pytestconfig: pytest.Config) -> Target:
    """The inventory under test and what the tests read of it."""
    try:
        return target_mod.resolve(lab, pytestconfig.getoption("--lab-inventory", None),
                                  pytestconfig.getoption("--lab-vault-password-file", None))
    except target_mod.TargetError as exc:
        pytest.fail(f"the lab tests cannot use this inventory: {exc}")


def pytest_report_header(config: pytest.Config) -> str:
    inv = (config.getoption("--lab-inventory", None) or os.environ.get(target_mod.ENV_INVENTORY)
           or str(target_mod.DEFAULT_INVENTORY))
    return f"lab tests: inventory {inv}"


@pytest.fixture(scope="session")
def signing(target: Target) -> tuple[Party, str]:
    """(client, profile): a profile that signs at once (no approval, self-signed certificate,
    CMS and raw) and a client of it whose key the lab holds."""
    for p in target.profiles:
        if p["approvals"] == 0 and p.get("cert") == "selfsigned" and {"cms", "raw"} <= set(
                p["formats"]):
            for c in target.clients:
                if target.allowed(p, c):
                    return c, p["name"]
    pytest.skip(f"{target.inventory}: no automatic CMS+raw profile with a client the lab holds")


class AdminSsh(Protocol):
    """The `admin_ssh` fixture: `cmd` on the VM as the inventory's admin (as root with sudo)."""

    def __call__(self, cmd: str, *, timeout: float = 120, check: bool = False,
                 sudo: bool = False) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def admin_ssh(target: Target) -> AdminSsh:
    """Run a command on the VM as the inventory's admin (its connection), as root with sudo=True
    (the become password, if the inventory has one, on sudo's stdin)."""

    def run(cmd: str, *, timeout: float = 120, check: bool = False,
            sudo: bool = False) -> subprocess.CompletedProcess[str]:
        r = target.admin_run(cmd, sudo=sudo, timeout=timeout)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    return run


def _wait_for(pred: Callable[[], object], timeout: float = 90, interval: float = 2) -> bool:
    """Poll `pred` until it is true or `timeout` seconds pass; True when it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


class WaitFor(Protocol):
    """The `wait_for` fixture: poll `pred` until it is true or `timeout` seconds pass."""

    def __call__(self, pred: Callable[[], object], timeout: float = 90,
                 interval: float = 2) -> bool: ...


@pytest.fixture(scope="session")
def wait_for() -> WaitFor:
    """`assert wait_for(lambda: ..., timeout=60)`: the guest is slow (TCG), things appear late."""
    return _wait_for
