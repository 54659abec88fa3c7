"""The lab's pure parts (names, addresses, the QEMU command, acceleration choice) and its
network on this machine (real namespaces, bridge and veth pairs; no VM)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import net, vm
from lab.config import LAB_HOSTS, Instance, LabConfigError, guest_network_config


def inst(n: int, tmp_path: Path) -> Instance:
    return Instance(f"lab{n}", tmp_path / f"lab{n}")


@pytest.mark.parametrize("name", ["lab", "lab10", "prod", "lab-1", ""])
def test_bad_instance_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(LabConfigError, match=r"lab0\.\.lab9"):
        Instance(name, tmp_path)


def test_names_fit_the_kernel_and_never_collide(tmp_path: Path) -> None:
    seen: set[str] = set()
    for n in range(10):
        i = inst(n, tmp_path)
        names = [i.bridge, i.tap, *(i.veth(h) for h in LAB_HOSTS),
                 *(i.veth(h) + "p" for h in LAB_HOSTS)]
        for name in names:
            assert len(name) <= 15, name  # IFNAMSIZ - 1
            assert name.startswith(i.prefix + "-")
        assert not seen & set(names)
        seen |= set(names)


def test_addresses_are_private_and_per_instance(tmp_path: Path) -> None:
    nets = set()
    for n in range(10):
        i = inst(n, tmp_path)
        n4, n6 = ipaddress.ip_network(i.subnet4), ipaddress.ip_network(i.subnet6)
        assert n4.is_private and n6.is_private
        for who in ("vm", "build", "intruder"):
            assert ipaddress.ip_address(i.ipv4(who)) in n4
            assert ipaddress.ip_address(i.ipv6(who)) in n6
        nets.add(i.subnet4)
    assert len(nets) == 10


def test_guest_network_unit_matches_the_lab_nic(tmp_path: Path) -> None:
    i = inst(3, tmp_path)
    unit = guest_network_config(i)
    assert f"MACAddress={i.mac(1)}" in unit
    assert f"Address={i.ipv4('vm')}/24" in unit


def test_qemu_command_exposes_nothing_beyond_loopback(tmp_path: Path) -> None:
    i = inst(2, tmp_path)
    img = {"disk": tmp_path / "b.qcow2", "kernel": tmp_path / "k", "initrd": tmp_path / "i"}
    cmd = vm.command(i, img, "tcg")
    joined = " ".join(cmd)
    assert f"hostfwd=tcp:127.0.0.1:{i.ssh_port}-:22" in joined
    assert "hostfwd=tcp::" not in joined and "0.0.0.0" not in joined
    assert f"ifname={i.tap},script=no" in joined
    assert f"unix:{i.monitor},server,nowait" in joined
    assert cmd[cmd.index("-name") + 1].startswith(i.vm_name + ",")
    assert "-daemonize" in cmd and "qemu-xhci,id=xhci" in cmd
    kvm = vm.command(i, img, "kvm")
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_accel_choice_remembers_a_kvm_that_hangs(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "CACHE_ROOT", tmp_path)
    monkeypatch.delenv("SIGNLAB_ACCEL", raising=False)
    monkeypatch.setattr(vm, "kvm_usable", lambda: True)
    assert vm.accel_candidates() == ["kvm", "tcg"]
    vm.remember_kvm_hangs()
    assert vm.accel_candidates() == ["tcg"]
    assert "kvm-hangs" in json.loads((tmp_path / "accel.json").read_text()).values()
    monkeypatch.setenv("SIGNLAB_ACCEL", "kvm")
    assert vm.accel_candidates() == ["kvm"]
    monkeypatch.setenv("SIGNLAB_ACCEL", "xen")
    with pytest.raises(vm.VMError, match="kvm or tcg"):
        vm.accel_candidates()


def test_no_kvm_device_means_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGNLAB_ACCEL", raising=False)
    monkeypatch.setattr(vm, "kvm_usable", lambda: False)
    assert vm.accel_candidates() == ["tcg"]


def test_a_pid_that_is_not_our_qemu_is_never_ours(tmp_path: Path) -> None:
    """Stale pid files must not make lab.down kill an unrelated process."""
    i = inst(4, tmp_path)
    i.state_dir.mkdir(parents=True)
    i.pidfile.write_text(f"{os.getpid()}\n")  # a live process, but not a QEMU of ours
    assert vm.running_pid(i) is None
    assert vm.stop(i) is False
    assert not i.pidfile.exists()


def test_port_free_sees_a_taken_port() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert vm.port_free(s.getsockname()[1]) is False


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="creating namespaces and bridges needs root and iproute2")


@needs_root
def test_lab_network_up_talks_inside_and_down_leaves_nothing(tmp_path: Path) -> None:
    """Real namespaces, bridge and veths (instance lab8): hosts reach each other over the
    bridge, have no way out, and teardown removes every name of the instance."""
    i = inst(8, tmp_path)
    net.down(i)
    net.up(i)
    try:
        assert set(net.namespaces(i.prefix)) == {i.netns(h) for h in LAB_HOSTS}
        assert i.bridge in net.links(i.prefix)
        srv = subprocess.Popen(["ip", "netns", "exec", i.netns("build"), "python3", "-c",
                                "import socket;s=socket.socket();"
                                "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                                f"s.bind(('{i.ipv4('build')}',2222));s.listen();"
                                "c,_=s.accept();c.sendall(b'hello')"])
        try:
            got = b""
            for _ in range(50):
                r = subprocess.run(
                    ["ip", "netns", "exec", i.netns("intruder"), "python3", "-c",
                     "import socket,sys;c=socket.create_connection"
                     f"(('{i.ipv4('build')}',2222),timeout=2);sys.stdout.write(c.recv(5).decode())"],
                    capture_output=True, timeout=10)
                if r.returncode == 0:
                    got = r.stdout
                    break
            assert got == b"hello"
        finally:
            srv.kill()
            srv.wait()
        r = subprocess.run(["ip", "netns", "exec", i.netns("build"), "ip", "route", "get",
                            "192.0.2.1"], capture_output=True)
        assert r.returncode != 0  # unreachable: no route out of the lab
    finally:
        removed = net.down(i)
    assert removed
    assert net.leftovers(i) == []
