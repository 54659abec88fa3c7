"""lab.up / lab.down logic: preflight messages, already-up, crash leftovers, and the lab
inventory resolving the running instance's facts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from lab import lifecycle, net, vm
from lab.config import Instance

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inst(tmp_path: Path) -> Instance:
    return Instance("lab8", tmp_path / "lab8")


def test_preflight_needs_root(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(lifecycle.LabError, match="needs root"):
        lifecycle.preflight(inst)


def test_preflight_names_missing_packages(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda b: None if b == "debootstrap" else "/bin/x")
    with pytest.raises(lifecycle.LabError, match=r"debootstrap \(package debootstrap\).*bootstrap"):
        lifecycle.preflight(inst)


def test_preflight_needs_disk(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda b: "/bin/x")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 9, 2**20))
    with pytest.raises(lifecycle.LabError, match="not enough disk"):
        lifecycle.preflight(inst)


def test_preflight_sees_the_port_taken(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda b: "/bin/x")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", inst.ssh_port))
        except OSError:
            pytest.skip(f"port {inst.ssh_port} in use on this machine")
        s.listen()
        with pytest.raises(lifecycle.LabError, match=f"127.0.0.1:{inst.ssh_port}.*already taken"):
            lifecycle.preflight(inst)


def test_up_when_already_up_does_nothing(inst: Instance, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(vm, "running_pid", lambda i: 4242)
    monkeypatch.setattr(lifecycle, "preflight", lambda i: pytest.fail("must not preflight"))
    assert lifecycle.up(inst) is False
    assert "already up (qemu pid 4242)" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
def test_crash_leftovers_are_found_and_cleaned(inst: Instance) -> None:
    inst.state_dir.mkdir(parents=True)
    net.up(inst)  # as a crashed run would have left it
    inst.pidfile.write_text("999999\n")  # dead pid
    inst.lab_json.write_text("{}")
    try:
        assert lifecycle.status(inst)["leftovers"]
        found = lifecycle.cleanup_leftovers(inst)
    finally:
        net.down(inst)
    assert any("stale pid file" in f for f in found)
    assert any(f.startswith("netns") for f in found) and any(f.startswith("link") for f in found)
    assert not inst.pidfile.exists() and not inst.lab_json.exists()
    assert net.leftovers(inst) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
def test_down_removes_state_and_network(inst: Instance) -> None:
    lifecycle.write_runtime_files(inst)
    net.up(inst)
    removed = lifecycle.down(inst)
    assert f"state {inst.state_dir}" in removed
    assert not inst.state_dir.exists() and net.leftovers(inst) == []


def test_runtime_files_pin_the_host_key(inst: Instance) -> None:
    lifecycle.write_runtime_files(inst)
    pub = (inst.keys_dir / "ssh_host_ed25519_key.pub").read_text().split()[1]
    known = inst.known_hosts.read_text()
    for name in (f"[127.0.0.1]:{inst.ssh_port}", inst.ipv4("vm"), inst.ipv6("vm")):
        assert f"{name} ssh-ed25519 {pub}" in known
    assert oct(inst.keys_dir.stat().st_mode & 0o777) == "0o700"
    assert (inst.keys_dir / "admin").stat().st_mode & 0o077 == 0
    cfg = inst.ssh_config.read_text()
    assert "StrictHostKeyChecking yes" in cfg and f"Port {inst.ssh_port}" in cfg


def test_lab_inventory_reads_the_instance_facts(inst: Instance, tmp_path: Path) -> None:
    """inventory/lab is static; its variables come from the instance's lab.json."""
    inst.state_dir.mkdir(parents=True)
    inst.lab_json.write_text(json.dumps(inst.facts(accel="tcg", pid=1)))
    exe = ROOT / ".venv" / "bin" / "ansible"
    if not exe.exists():
        pytest.skip("ansible not installed in .venv")
    r = subprocess.run(
        [str(exe), "-i", "inventory/lab", "signhost", "-m", "ansible.builtin.debug",
         "-a", "msg={{ lab.vm.lab_ipv4 }}|{{ ansible_ssh_common_args }}|{{ lab.hosts.build.ipv4 }}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, SIGNLAB_STATE=str(inst.state_dir), ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{inst.ipv4('vm')}|-F {inst.state_dir}/ssh_config|{inst.ipv4('build')}" in r.stdout
