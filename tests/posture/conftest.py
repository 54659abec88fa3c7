"""Fixtures of the posture suite: the host under test and what its inventory says it should be.

The same tests run against every inventory. `invoke verify` passes the target and its inventory:
`--target ssh://NAME --target-kind lab|production --target-name NAME --inventory DIR
--inventory-host HOST [--become-password-fd N]`. Run by hand (`pytest tests/posture`), the
inventory is inventory/lab and the target is its host. Either way the host is reached exactly as
Ansible reaches it (hostaccess.connection: user, port, key, ansible_ssh_common_args with its
ProxyJump or -F); an explicit `--target` with `--ssh-config` and no `--inventory-host` is
used as given.

Fixtures for test authors:
- `host`: a testinfra host. Commands run as root over one channel: a single
  `ssh host sudo -n python3` session that runs each command with `/bin/sh -c`
  (toolkit/assurance/shell_channel.py; every command is logged on the host with the tag signhost-verify).
  `--transport ssh` uses testinfra's stock ssh backend instead (one sudo per command, slower);
  targets other than ssh:// (local://, for the toolkit's own tests) use testinfra's backends.
  Use `with host.sudo("user"):` to run something as another user.
- `expected`: the host's inventory values (hostaccess/expectations.py), e.g.
  `expected["signer_custodians"]`. A value the inventory does not give is a test error that
  names it, never a silent pass.
- `admin_ssh`: argv of an ssh command from the controller to the host as the admin (the
  connection the suite itself uses), for what needs a real client session (forwarding).
- `vantage(name)`: another point of view than the controller's (`verify_vantage_points` in the
  inventory: `build`, an authorised build server; `outside`, a host on no allow-list): runs a
  command there and knows the target's addresses from there. A test whose vantage point the
  inventory does not have is skipped with that reason.
- `is_lab` / `target_kind`: the registry's kind of host (waivers), from `--target-kind` or the
  inventory's `verify_kind` (default production).

Parametrised by the inventory: a test that takes `admin_user` runs once per base_admin_users
entry, `forced_command_account` once per signer account (each build client's, each
custodian's),
`usb_hotplug_device` once per device of `verify_usb_hotplug` (a hook that plugs and unplugs
USB devices: argv + plug|unplug + name, and each name's vendor:product id).

Markers: `@pytest.mark.control("SSH-01", ...)` names the controls a test proves (required here,
checked by `invoke threat-model.check`); `@pytest.mark.lab_only("reason")` skips the test on
production hosts with that reason in the report. On a lab host, tests whose controls are all
waived (`waiver_lab`) or production-only are skipped with the waiver as the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import testinfra
from testinfra.backend import base

from hostaccess import expectations, hostvars
from toolkit.assurance import shell_channel
from toolkit.controls import registry

if TYPE_CHECKING:
    from testinfra.host import Host  # testinfra has no type hints: Host is Any to mypy

    from toolkit.assurance.log_search import Secret

DEFAULT_INVENTORY = "inventory/lab"
# Set to 1 where a missing target must fail the run instead of skipping it (CI).
REQUIRE_TARGET = "SIGNHOST_REQUIRE_TARGET"


class Expected(dict[str, Any]):
    """The inventory's values for the host; a missing one fails the test that asked for it."""

    def __missing__(self, name: str) -> Any:
        pytest.fail(expectations.missing(self, name), pytrace=False)


@dataclass
class Run:
    spec: str | None  # testinfra host spec
    kind: str  # "lab" or "production" (the registry's host kinds)
    ssh_config: str | None
    why: str = ""  # why there is no target
    expected: Expected = field(default_factory=Expected)
    inventory: str = DEFAULT_INVENTORY  # where the target comes from ...
    host_name: str | None = None  # ... and its name there: reached as Ansible reaches it
    inv: hostvars.Inventory | None = None  # read once, for the expectations and the connection


_KEY = pytest.StashKey[Run]()
# The sudo password the root channel used (None: sudo asked for none). Kept for the test that
# looks for it in the host's logs; never printed.
_BECOME_KEY = pytest.StashKey["str | None"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("posture", "posture target (set by invoke verify)")
    group.addoption("--target", default=None, help="testinfra host spec, e.g. ssh://signhost")
    group.addoption(
        "--target-kind",
        default=None,
        choices=("lab", "production"),
        help="lab or production (default: the inventory host's verify_kind, else production)",
    )
    group.addoption("--target-name", default=None, help="the host's name in the report")
    group.addoption(
        "--inventory",
        default=DEFAULT_INVENTORY,
        help=f"the inventory the expectations come from (default {DEFAULT_INVENTORY})",
    )
    group.addoption(
        "--inventory-host",
        default=None,
        help="the target's host in that inventory (default: --target-name when the inventory "
        "has it, else the inventory's only host)",
    )
    group.addoption(
        "--transport",
        default="channel",
        choices=("channel", "ssh"),
        help="channel: one root session for the whole suite (default); ssh: testinfra's ssh "
        "backend, a new session and a sudo per command",
    )
    group.addoption("--become-password-fd", type=int, default=None,
                    help="read the sudo password from this inherited file descriptor")
    group.addoption(
        "--no-sudo",
        action="store_true",
        help="run commands as the connecting user (already root), not through sudo",
    )


def _run(config: pytest.Config) -> Run:
    spec = config.getoption("--target")
    ssh_config = config.getoption("--ssh-config", default=None)
    path = config.getoption("--inventory")
    if not Path(path).is_absolute() and not Path(path).exists():
        path = str(hostvars.ROOT / path)  # relative to the toolkit, wherever pytest runs
    try:
        inv = hostvars.load(path)
        name = config.getoption("--inventory-host") or expectations.default_host(
            inv, config.getoption("--target-name"))
        values = expectations.for_host(inv, name)
    except hostvars.InventoryError as exc:
        raise pytest.UsageError(f"posture expectations: {exc}") from exc
    inv_kind = values.get("verify_kind") or "production"
    kind = config.getoption("--target-kind") or inv_kind
    if kind != inv_kind:
        raise pytest.UsageError(
            f"posture expectations: the target is a {kind} host but {values[expectations.SOURCE]} "
            f"is a {inv_kind} host (verify_kind); pass the target's own --inventory"
        )
    # Without an explicit --target (or with verify's --inventory-host), the suite connects
    # exactly as Ansible does (hostaccess.connection), whatever the inventory's ssh arguments.
    via_inventory = not spec or bool(config.getoption("--inventory-host"))
    return Run(spec or f"ssh://{name}", kind, ssh_config, "", Expected(values), path,
               name if via_inventory else None, inv)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = _run(config)


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


def _client_account(expected: Expected, name: str) -> str:
    """The local account a build client logs in to and the daemon binds its name to."""
    return f"{expected['signer_client_account_prefix']}{name}"


def _accounts(expected: Expected) -> list[str]:
    return [_client_account(expected, str(c["name"])) for c in expected["signer_clients"]] + [
        str(c["name"]) for c in expected["signer_custodians"]]


def _hotplug_devices(expected: Expected) -> list[str]:
    return sorted(str(d) for d in (expected.get("verify_usb_hotplug") or {}).get("devices", {}))


# Fixture -> the inventory values a test runs once for each of, and why it does not apply
# when there are none.
_PARAMETRISED: dict[str, tuple[Callable[[Expected], list[str]], str]] = {
    "admin_user": (lambda e: [str(u["name"]) for u in e["base_admin_users"]],
                   "the inventory lists no admin (base_admin_users)"),
    "forced_command_account": (_accounts, "the inventory lists no signer account"),
    "usb_hotplug_device": (_hotplug_devices,
                           "no USB hot-plug hook in the inventory (verify_usb_hotplug)"),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    run = metafunc.config.stash[_KEY]
    for fixture, (values, _) in _PARAMETRISED.items():
        if fixture not in metafunc.fixturenames:
            continue
        try:
            params = values(run.expected) if run.spec else [_NONE]
        except pytest.fail.Exception as exc:  # the inventory lacks the list: one failing case
            params = [f"{_ERROR}{exc.msg}"]
        params = params or [_NONE]
        # indirect: through the fixture, which skips "(none)" with its reason and fails
        # "(error)" (directly, the test body would get the placeholder and run on it).
        metafunc.parametrize(fixture, params, indirect=True,
                             ids=[p if not p.startswith("(") else "n/a" for p in params])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run = config.stash[_KEY]
    if run.spec is None:
        mark = pytest.mark.skip(reason=run.why) if os.environ.get(REQUIRE_TARGET) != "1" else None
        for item in items:
            if mark is not None:
                item.add_marker(mark)
        return
    reg = registry.load()
    for item in items:
        lab_only = item.get_closest_marker("lab_only")
        if lab_only is not None and run.kind != "lab":
            reason = lab_only.args[0] if lab_only.args else lab_only.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"lab only: {reason}"))
            continue
        controls = [str(a) for m in item.iter_markers("control") for a in m.args]
        waived = _waived(controls, run.kind, reg) if controls else None
        if waived:
            item.add_marker(pytest.mark.skip(reason=waived))


@pytest.fixture(scope="session")
def target_kind(pytestconfig: pytest.Config) -> str:
    return pytestconfig.stash[_KEY].kind


@pytest.fixture(scope="session")
def is_lab(target_kind: str) -> bool:
    return target_kind == "lab"


@pytest.fixture(scope="session")
def expected(pytestconfig: pytest.Config) -> Expected:
    return pytestconfig.stash[_KEY].expected


_NONE = "(none)"
_ERROR = "(error) "


@pytest.fixture
def admin_user(request: pytest.FixtureRequest) -> str:
    return _param(request)


@pytest.fixture
def forced_command_account(request: pytest.FixtureRequest) -> str:
    return _param(request)


@pytest.fixture(scope="session")
def forced_command_accounts(expected: Expected) -> list[str]:
    """Every account `forced_command_account` runs for, for a fixture that reads all of them
    at once (each case still asserts on its own)."""
    return _accounts(expected)


@pytest.fixture(scope="session")
def client_account(expected: Expected) -> Callable[[str], str]:
    """name -> the build client's own account (signer_client_account_prefix + name)."""
    return lambda name: _client_account(expected, name)


@pytest.fixture
def usb_hotplug_device(request: pytest.FixtureRequest) -> str:
    return _param(request)


def _param(request: pytest.FixtureRequest) -> str:
    value = str(request.param)
    if value.startswith(_ERROR):
        pytest.fail(value[len(_ERROR):], pytrace=False)
    if value == _NONE:
        assert request.fixturename is not None  # a fixture's own request names it
        pytest.skip(f"does not apply: {_PARAMETRISED[request.fixturename][1]}")
    return value


class AdminSsh(Protocol):
    """The `admin_ssh` fixture: ssh argv, `options` before the destination, `remote` after."""

    def __call__(self, *options: str, remote: Sequence[str] = ()) -> list[str]: ...


@pytest.fixture(scope="session")
def admin_ssh(pytestconfig: pytest.Config) -> AdminSsh:
    """`admin_ssh("-N", "-L", spec)`, `admin_ssh(..., remote=["true"])`: ssh argv from the
    controller to the host, these options before the destination, `remote` after it."""
    run = pytestconfig.stash[_KEY]
    if run.spec is None or not run.spec.startswith("ssh://"):
        pytest.skip(f"needs an ssh:// target for a client session, not {run.spec!r}")
    if run.host_name:
        # As Ansible reaches the host (user, key, ProxyJump, -F config): hostaccess.connection.
        from hostaccess import connection

        assert run.inv is not None
        try:
            ep = connection.endpoint(run.inv, run.host_name, password="")
        except (hostvars.InventoryError, connection.ConnectionError_) as exc:
            pytest.fail(f"cannot build the admin's ssh command: {exc}")
        *base_argv, destination = ep.argv

        def via_inventory(*options: str, remote: Sequence[str] = ()) -> list[str]:
            return [*base_argv, "-o", "ControlPath=none", *options, destination, *remote]

        return via_inventory
    hostspec = base.BaseBackend.parse_hostspec(run.spec[len("ssh://"):])
    argv = ["ssh", "-o", "ControlPath=none", "-o", "BatchMode=yes"]
    if run.ssh_config:
        argv += ["-F", run.ssh_config]
    if hostspec.user:
        argv += ["-l", hostspec.user]
    if hostspec.port:
        argv += ["-p", str(hostspec.port)]

    def command(*options: str, remote: Sequence[str] = ()) -> list[str]:
        return [*argv, *options, hostspec.name, *remote]

    return command


@dataclass(frozen=True)
class Vantage:
    """A point of view other than the controller's (verify_vantage_points.NAME in the inventory):
    `argv` runs one shell command line there (appended as the last argument: `ip netns exec NS
    sh -c`, `ssh bastion`), `addresses` are the target's addresses as seen from there."""

    name: str
    argv: tuple[str, ...]
    addresses: tuple[str, ...]

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.argv, command], capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="session")
def become_password(pytestconfig: pytest.Config, host: Host) -> Secret | None:
    """The sudo password the suite's root channel gave sudo (from the inventory's vault or
    --become-password-fd), as a log_search.Secret that never shows itself in a traceback;
    None when sudo asked for none. Only for looking it up in logs."""
    from toolkit.assurance.log_search import Secret

    del host  # the channel is opened first: it is what reads the password
    pw = pytestconfig.stash.get(_BECOME_KEY, None)
    return Secret(pw.encode()) if pw else None


@pytest.fixture(scope="session")
def vantage(expected: Expected) -> Callable[[str], Vantage]:
    """`vantage("outside")`: that vantage point, or a skip saying the inventory has none."""

    def point(name: str) -> Vantage:
        points = expected.get("verify_vantage_points") or {}
        entry = points.get(name)
        if not entry:
            pytest.skip(f"does not apply: no vantage point {name!r} in the inventory "
                        "(verify_vantage_points)")
        argv, addresses = entry.get("argv"), entry.get("addresses")
        if not argv or not addresses:
            pytest.fail(f"verify_vantage_points.{name} needs argv and addresses", pytrace=False)
        return Vantage(name, tuple(str(a) for a in argv), tuple(str(a) for a in addresses))

    return point


@pytest.fixture(scope="session")
def host(pytestconfig: pytest.Config) -> Iterator[Host]:
    run = pytestconfig.stash[_KEY]
    if run.spec is None:
        if os.environ.get(REQUIRE_TARGET) == "1":
            pytest.fail(run.why)
        pytest.skip(run.why)
    sudo = not pytestconfig.getoption("--no-sudo")
    channel = pytestconfig.getoption("--transport") == "channel"
    if channel and run.host_name:
        h = _inventory_channel(pytestconfig, run, sudo)
    elif channel and run.spec.startswith("ssh://"):
        h = shell_channel.host_from_spec(run.spec, run.ssh_config, sudo=sudo)
    else:
        h = testinfra.get_host(run.spec, ssh_config=run.ssh_config, sudo=sudo)
    # Nothing else can pass when these fail: stop with one clear line instead of N errors.
    try:
        probe = h.run("id -u")
    except RuntimeError as exc:  # ssh exit 255, or the channel's sudo refused
        why = _last_line(str(exc))
        if "sudo" in why.lower() or "password" in why.lower():
            pytest.exit(f"{run.spec}: sudo does not give root: {why}", returncode=3)
        pytest.exit(f"unreachable: {run.spec}: {why}", returncode=4)
    if sudo and (probe.rc != 0 or probe.stdout.strip() != "0"):
        pytest.exit(f"{run.spec}: sudo does not give root: {_last_line(probe.stderr)}", returncode=3)
    yield h
    if isinstance(h.backend, shell_channel.ChannelBackend):
        h.backend.close()


def _inventory_channel(config: pytest.Config, run: Run, sudo: bool) -> Host:
    """The root channel to an inventory host, reached exactly as Ansible reaches it."""
    from hostaccess import connection

    assert run.inv is not None and run.host_name is not None
    password = None
    fd = config.getoption("--become-password-fd")
    if fd is not None:
        with os.fdopen(fd, "rb") as fh:
            password = fh.read().decode()
    try:
        ep = connection.endpoint(run.inv, run.host_name, password=password)
    except (hostvars.InventoryError, connection.ConnectionError_) as exc:
        pytest.exit(f"cannot connect to {run.host_name}: {exc}", returncode=3)
    config.stash[_BECOME_KEY] = ep.become_password
    return shell_channel.host_from_launcher(
        run.host_name, list(ep.argv), sudo=sudo, password=ep.become_password
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"
