"""Fixtures of the posture suite: the host under test, whether it is the lab, the lab's facts.

The same tests run against the lab VM and a production host. `invoke verify` passes the target:
`--target ssh://NAME --target-kind lab|production [--ssh-config FILE]`. Run by hand
(`pytest tests/posture`), the target is the running lab ($SIGNLAB_INSTANCE, default lab0).

Fixtures for test authors:
- `host`: a testinfra host. Commands run as root over one channel: a single
  `ssh host sudo -n python3` session that runs each command with `/bin/sh -c`
  (toolkit/shell_channel.py; every command is logged on the host with the tag signhost-verify).
  `--transport ssh` uses testinfra's stock ssh backend instead (one sudo per command, slower);
  targets other than ssh:// (local://, for the toolkit's own tests) use testinfra's backends.
  Use `with host.sudo("user"):` to run something as another user.
- `is_lab`: True on the lab VM.
- `lab`: the lab's LabState (addresses, keys, `netns_run` for the build and intruder hosts), or
  None on a production host. Tests that need the lab network take `lab` and skip when it is None
  (or carry `@pytest.mark.lab_only("reason")`).

Markers: `@pytest.mark.control("SSH-01", ...)` names the controls a test proves (required here,
checked by `invoke threat-model.check`); `@pytest.mark.lab_only("reason")` skips the test on
production hosts with that reason in the report. On the lab, tests whose controls are all waived
(`waiver_lab`) or production-only are skipped with the waiver as the reason.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import testinfra

from lab import state
from lab.state import LabState
from toolkit import registry, shell_channel


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("posture", "posture target (set by invoke verify)")
    group.addoption("--target", default=None, help="testinfra host spec, e.g. ssh://signhost")
    group.addoption(
        "--target-kind",
        default=None,
        choices=("lab", "production"),
        help="lab or production (default: lab when --target is not given)",
    )
    group.addoption("--target-name", default=None, help="the host's inventory name")
    group.addoption(
        "--transport",
        default="channel",
        choices=("channel", "ssh"),
        help="channel: one root session for the whole suite (default); ssh: testinfra's ssh "
        "backend, a new session and a sudo per command",
    )
    group.addoption("--inventory", default=None,
                    help="the inventory the target comes from (verify passes it)")
    group.addoption("--inventory-host", default=None,
                    help="the target's inventory name: connect as Ansible does")
    group.addoption("--become-password-fd", type=int, default=None,
                    help="read the sudo password from this inherited file descriptor")
    group.addoption(
        "--no-sudo",
        action="store_true",
        help="run commands as the connecting user (already root), not through sudo",
    )


def _target(config: pytest.Config) -> tuple[str | None, str, str | None, str]:
    """(spec, kind, ssh_config, why-not) for this run."""
    spec = config.getoption("--target")
    kind = config.getoption("--target-kind") or ("lab" if spec is None else "production")
    ssh_config = config.getoption("--ssh-config", default=None)
    if spec:
        return spec, kind, ssh_config, ""
    lab = state.load()
    if lab is None:
        return (
            None,
            "lab",
            None,
            (
                f"no target: no running lab ({state.instance_name()}) and no --target; "
                "run `invoke lab.up` or use `invoke verify --inventory ...`"
            ),
        )
    return f"ssh://{lab.ssh_alias}", "lab", str(lab.ssh_config), ""


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = _target(config)


_KEY = pytest.StashKey[tuple[str | None, str, str | None, str]]()


def _waived(controls: list[str], kind: str, reg: registry.Registry) -> str | None:
    """The reason to skip a test whose every control is waived or not applicable here."""
    reasons: list[str] = []
    for cid in controls:
        ctl = reg.controls.get(cid)
        if ctl is None:
            return None
        if not ctl.applies(kind):
            reasons.append(f"{cid} applies to {ctl.applies_to} hosts only")
        elif kind == "lab" and ctl.waiver_lab:
            reasons.append(f"{cid} waived in the lab: {ctl.waiver_lab}")
        else:
            return None
    return "; ".join(reasons) if reasons else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    spec, kind, _, why = config.stash[_KEY]
    if spec is None:
        mark = (
            pytest.mark.skip(reason=why) if os.environ.get("SIGNLAB_REQUIRE_LAB") != "1" else None
        )
        for item in items:
            if mark is not None:
                item.add_marker(mark)
        return
    reg = registry.load()
    for item in items:
        lab_only = item.get_closest_marker("lab_only")
        if lab_only is not None and kind != "lab":
            reason = lab_only.args[0] if lab_only.args else lab_only.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"lab only: {reason}"))
            continue
        controls = [str(a) for m in item.iter_markers("control") for a in m.args]
        waived = _waived(controls, kind, reg) if controls else None
        if waived:
            item.add_marker(pytest.mark.skip(reason=waived))


@pytest.fixture(scope="session")
def target_kind(pytestconfig: pytest.Config) -> str:
    return pytestconfig.stash[_KEY][1]


@pytest.fixture(scope="session")
def is_lab(target_kind: str) -> bool:
    return target_kind == "lab"


@pytest.fixture(scope="session")
def lab(is_lab: bool) -> LabState | None:
    return state.load() if is_lab else None


@pytest.fixture(scope="session")
def host(pytestconfig: pytest.Config) -> Any:
    spec, _, ssh_config, why = pytestconfig.stash[_KEY]
    if spec is None:
        if os.environ.get("SIGNLAB_REQUIRE_LAB") == "1":
            pytest.fail(why)
        pytest.skip(why)
    sudo = not pytestconfig.getoption("--no-sudo")
    inventory_host = pytestconfig.getoption("--inventory-host")
    if inventory_host and pytestconfig.getoption("--transport") == "channel":
        h = _inventory_channel(pytestconfig, inventory_host, sudo)
    elif pytestconfig.getoption("--transport") == "channel" and spec.startswith("ssh://"):
        h = shell_channel.host_from_spec(spec, ssh_config, sudo=sudo)
    else:
        h = testinfra.get_host(spec, ssh_config=ssh_config, sudo=sudo)
    # Nothing else can pass when these fail: stop with one clear line instead of N errors.
    try:
        probe = h.run("id -u")
    except RuntimeError as exc:  # ssh exit 255, or the channel's sudo refused
        why = _last_line(str(exc))
        if "sudo" in why.lower() or "password" in why.lower():
            pytest.exit(f"{spec}: sudo does not give root: {why}", returncode=3)
        pytest.exit(f"unreachable: {spec}: {why}", returncode=4)
    if sudo and (probe.rc != 0 or probe.stdout.strip() != "0"):
        pytest.exit(f"{spec}: sudo does not give root: {_last_line(probe.stderr)}", returncode=3)
    yield h
    if isinstance(h.backend, shell_channel.ChannelBackend):
        h.backend.close()


def _inventory_channel(config: pytest.Config, inventory_host: str, sudo: bool) -> Any:
    """The root channel to an inventory host, reached exactly as Ansible reaches it."""
    from toolkit import connection, hostvars

    password = None
    fd = config.getoption("--become-password-fd")
    if fd is not None:
        with os.fdopen(fd, "rb") as fh:
            password = fh.read().decode()
    inventory = config.getoption("--inventory") or "inventory/lab"
    try:
        inv = hostvars.load(inventory, inventory_host)
        ep = connection.endpoint(inv, inventory_host, password=password)
    except (hostvars.InventoryError, connection.ConnectionError_) as exc:
        pytest.exit(f"cannot connect to {inventory_host}: {exc}", returncode=3)
    return shell_channel.host_from_launcher(
        inventory_host, list(ep.argv), sudo=sudo, password=ep.become_password
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"
