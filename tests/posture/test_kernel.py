"""Kernel posture (KRN-01..04): the live values, and what a process can actually do."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testinfra.host import Host

KERNEL = {
    "kernel.yama.ptrace_scope": "2",
    "kernel.kptr_restrict": "2",
    "kernel.dmesg_restrict": "1",
    "kernel.unprivileged_bpf_disabled": "1",
    "net.core.bpf_jit_harden": "2",
    "kernel.kexec_load_disabled": "1",
    "kernel.perf_event_paranoid": "3",
    "kernel.randomize_va_space": "2",
    "kernel.sysrq": "0",
    "fs.protected_hardlinks": "1",
    "fs.protected_symlinks": "1",
    "fs.protected_fifos": "2",
    "fs.protected_regular": "2",
    "fs.suid_dumpable": "0",
}
NETWORK = {
    "net.ipv4.ip_forward": "0",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv4.conf.all.secure_redirects": "0",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv6.conf.all.accept_source_route": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.all.log_martians": "1",
    "net.ipv4.tcp_syncookies": "1",
}
MODULES = ["cramfs", "freevxfs", "jffs2", "hfs", "hfsplus", "udf", "dccp", "sctp", "rds", "tipc"]


def _path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def sysctl(host: Host, name: str) -> str:
    value: str = host.file(_path(name)).content_string.strip()
    return value


@pytest.fixture(scope="module")
def live_sysctls(host: Host) -> dict[str, str]:
    """Every value of KERNEL and NETWORK as the kernel has it now, read in one command (one
    round trip instead of 25); each case asserts on its own. A name the kernel lacks is
    absent here, and its case fails."""
    names = sorted({**KERNEL, **NETWORK})
    out = host.run("grep -H '' " + " ".join(_path(n) for n in names)).stdout
    by_path = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {n: by_path[_path(n)].strip() for n in names if _path(n) in by_path}


@pytest.mark.control("KRN-01")
@pytest.mark.parametrize(("name", "value"), sorted(KERNEL.items()))
def test_kernel_sysctl_is_hardened(live_sysctls: dict[str, str], name: str, value: str) -> None:
    assert live_sysctls.get(name) == value


@pytest.mark.control("KRN-01")
def test_a_process_cannot_ptrace_another_of_the_same_user(host: Host) -> None:
    # ptrace_scope=2: only CAP_SYS_PTRACE may attach. An unprivileged user tries on its own child.
    code = ("import ctypes,os,sys,time\n"
            "pid=os.fork()\n"
            "if pid==0:\n    time.sleep(5); os._exit(0)\n"
            "libc=ctypes.CDLL(None,use_errno=True)\n"
            "r=libc.ptrace(16,pid,0,0)\n"  # PTRACE_ATTACH
            "print(r, ctypes.get_errno())\n"
            "os.kill(pid,9)\n")
    out = host.check_output(f"runuser -u nobody -- python3 -c '{code}'")
    rc, err = out.split()
    assert rc == "-1" and err == "1", out  # EPERM


@pytest.mark.control("KRN-02")
@pytest.mark.parametrize(("name", "value"), sorted(NETWORK.items()))
def test_network_sysctl_is_hardened(live_sysctls: dict[str, str], name: str,
                                    value: str) -> None:
    assert live_sysctls.get(name) == value


@pytest.mark.control("KRN-03")
def test_a_crashing_process_leaves_no_core_dump(host: Host) -> None:
    out = host.check_output(
        "d=$(mktemp -d) && cd $d && chmod 777 . && "
        "runuser -u nobody -- bash -c 'ulimit -S -c unlimited 2>/dev/null; sleep 60 & p=$!; "
        "kill -SEGV $p; wait $p; echo status=$?' ; ls -A $d; rm -rf $d")
    assert "status=139" in out, out  # 128 + SIGSEGV: it did crash
    assert "core" not in out.split("status=", 1)[1], out
    assert sysctl(host, "kernel.core_pattern") == "|/bin/false"
    assert host.check_output("systemctl show -P DefaultLimitCORE") == "0"


@pytest.mark.control("KRN-04")
@pytest.mark.parametrize("module", MODULES)
def test_unused_filesystems_and_protocols_cannot_be_loaded(host: Host, module: str) -> None:
    # The attempt and the module list after it in one command (one round trip, not two).
    r = host.run(f"modprobe {module}; rc=$?; cat /proc/modules; exit $rc")
    assert r.rc != 0
    assert f"\n{module} " not in "\n" + r.stdout
