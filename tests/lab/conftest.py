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
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from invoke.context import Context

from lab import state
from lab import target as target_mod
from lab.ca import LabCA
from lab.state import LabState
from lab.target import Party, Target
from toolkit.tasks import token as tasks_token


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
    """The `admin_ssh` fixture: `cmd` on the VM as the inventory's admin (as root with sudo);
    `new_login` for a login of its own rather than a session on the shared connection."""

    def __call__(self, cmd: str, *, timeout: float = 120, check: bool = False,
                 sudo: bool = False, new_login: bool = False
                 ) -> subprocess.CompletedProcess[str]: ...

    def close(self) -> None:
        """End the shared connection (before a reboot); the next command opens a new one."""


class _SharedAdminSsh:
    """The admin's commands as sessions on one SSH connection (an OpenSSH ControlMaster whose
    socket is in a private directory of this run): a login through the jump host costs two key
    exchanges on a TCG guest, several seconds, and the tests make a hundred such calls. Each
    command is still a session of its own, through the inventory's way in and sudo."""

    def __init__(self, target: Target, control_dir: Path) -> None:
        self.target = target
        self.mux = ("-o", "ControlMaster=auto", "-o", "ControlPersist=120",
                    "-o", f"ControlPath={control_dir}/%C")

    def __call__(self, cmd: str, *, timeout: float = 120, check: bool = False,
                 sudo: bool = False, new_login: bool = False
                 ) -> subprocess.CompletedProcess[str]:
        options = () if new_login else self.mux  # new_login: as the inventory alone makes it
        r = self.target.admin_run(cmd, sudo=sudo, timeout=timeout, options=options)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def close(self) -> None:
        subprocess.run(self.target.admin_argv(*self.mux, "-O", "exit"), capture_output=True,
                       timeout=30)


@pytest.fixture(scope="session")
def admin_ssh(target: Target) -> Iterator[AdminSsh]:
    """Run a command on the VM as the inventory's admin (its connection), as root with sudo=True
    (the become password, if the inventory has one, on sudo's stdin); over one shared
    connection unless new_login=True."""
    # A short path: a unix socket's name is limited to 108 bytes, and %C is 40 of them.
    with tempfile.TemporaryDirectory(prefix="slcp-", dir="/tmp") as control_dir:
        run = _SharedAdminSsh(target, Path(control_dir))
        try:
            yield run
        finally:
            run.close()


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


EX_DATA = 65


def _through_token_csr(profile: dict[str, Any]) -> bool:
    """The release profile of test_signer_e2e (approvals, CMS): its certificate is issued for
    a CSR that `invoke token.csr` fetched, so that task is proved end to end; the others use
    the CSR the deploy fetched."""
    return bool(profile["approvals"] >= 2 and "cms" in profile["formats"])


@pytest.fixture(scope="session")
def ca_certs(lab: LabState, target: Target, admin_ssh: AdminSsh, wait_for: WaitFor,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """profile -> certificate on the controller, for every `cert: ca` profile: issued by the
    lab CA (lab/ca.py, the commercial CA's stand-in) and installed with one
    `invoke token.import-cert` round for all of them (one AIDE update, one daemon restart),
    once per lab. test_signer_e2e's release and test_authenticode_e2e's profiles share it."""
    token_dir = target.token_dir
    cert_dir = str(target.values["signer_cert_dir"])
    profiles = [p for p in target.profiles if p.get("cert") == "ca"]
    out = {p["name"]: token_dir / f"{p['name']}.pem" for p in profiles}
    if not profiles:
        return out
    on_host = " ".join(shlex.quote(f"{cert_dir}/{name}.pem") for name in out)
    missing = set(admin_ssh(f"for f in {on_host}; do test -s $f || echo $f; done",
                            sudo=True, check=True).stdout.split())
    todo = [p for p in profiles
            if not out[p["name"]].exists() or f"{cert_dir}/{p['name']}.pem" in missing]
    if not todo:
        return out
    ca = LabCA(lab.state_dir)
    if not ca.exists():
        pytest.fail(f"{ca.cert} is missing: `invoke lab.up` makes the lab CA")
    where = {"inventory": target.inventory, "vault_password_file": target.vault_password_file}
    work = tmp_path_factory.mktemp("ca")
    for p in todo:
        name = p["name"]
        csr = token_dir / f"{name}.csr"
        if _through_token_csr(p):
            csr = work / f"{name}.csr"
            tasks_token.csr(Context(), profile=name, out=str(csr), **where)
        assert csr.exists(), f"{csr} is missing: run `invoke deploy` on this lab first"
        ca.issue(csr, out[name])
    # As an operator installs a CA's answers: the host checks each certificate against its
    # profile's token key, and the change is taken into the AIDE baseline (BASE-07).
    first, *rest = todo
    tasks_token.import_cert(Context(), str(out[first["name"]]), profile=first["name"],
                            also=[f"{p['name']}={out[p['name']]}" for p in rest], **where)
    if target.values["base_aide"]:
        # An authorised change through the toolkit is in the AIDE baseline at once: the next
        # deploy does not stop on it.
        limit = shlex.quote(f"^({re.escape(cert_dir)})(/|$)")
        aide = admin_ssh(f"/usr/local/sbin/signhost-aide-baseline compare {limit}", sudo=True)
        assert aide.returncode == 0, f"import-cert left differences from the baseline: {aide.stdout}"
    assert wait_for(lambda: _daemon_checked_its_keys(lab, target, admin_ssh), timeout=120), \
        "signerd did not come back after the restart"
    return out


def _daemon_checked_its_keys(lab: LabState, target: Target, admin_ssh: AdminSsh) -> bool:
    """The restarted daemon has checked its keys: an empty request to an automatic profile gets
    "empty artifact" (65), not "being unlocked" (69) or no daemon at all; without such a
    profile (on the host's token, not a card) and client, its socket is there."""
    for p in target.profiles:
        clients = [c for c in target.clients if target.allowed(p, c)]
        if p["approvals"] == 0 and not p.get("token") and clients:
            who = clients[0]
            r = lab.netns_run(str(who.netns_host), [
                "ssh", "-o", f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}", "-o",
                "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=15", "-o", "LogLevel=ERROR", "-i", str(who.key),
                f"{target.account(who)}@{lab.vm_ipv4}", "sign", "--profile", p["name"],
                "--format", p["formats"][0], "--size", "0"], input=b"", timeout=60)
            return r.returncode == EX_DATA
    socket = shlex.quote(str(target.values["signer_socket"]))
    return admin_ssh(f"test -S {socket}", sudo=True).returncode == 0
