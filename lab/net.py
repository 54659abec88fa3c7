"""The lab network: a bridge, the VM's tap, and one network namespace per lab host.

```
  VM nic2 (tap slbN-tap) ──┐
                           ├── bridge slbN-br (no address: the controller is not on it)
  slbN-build  (veth) ──────┤
  slbN-intruder (veth) ────┤
  slbN-collector (veth) ───┘  (rsyslog, RELP over TLS: lab/collector.py)
```

The bridge has no IPv4/IPv6 address and IPv6 is disabled on it, so the controller neither
talks on the segment nor routes it: packets from the namespaces can reach only the VM and
each other. The namespaces have no default route. Nothing here ever leaves the machine.

Every name starts with the instance prefix, so cleanup can find what a crashed run left
behind by prefix alone, and never touches anything that is not ours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lab.config import LAB_HOSTS, Instance


class NetError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _sysctl_off(path: str) -> None:
    p = Path(path)
    if p.exists():
        p.write_text("1\n")


def links(prefix: str) -> list[str]:
    """Our links on the controller (by prefix)."""
    out = _ip("-o", "link", "show").stdout
    names = []
    for line in out.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name.startswith(prefix + "-"):
            names.append(name)
    return names


def namespaces(prefix: str) -> list[str]:
    out = _ip("netns", "list").stdout
    return [ln.split()[0] for ln in out.splitlines()
            if ln.strip() and ln.split()[0].startswith(prefix + "-")]


def leftovers(inst: Instance) -> list[str]:
    return [f"link {n}" for n in links(inst.prefix)] + [
        f"netns {n}" for n in namespaces(inst.prefix)]


def down(inst: Instance) -> list[str]:
    """Remove every link and namespace of this instance; returns what was removed."""
    removed = []
    for ns in namespaces(inst.prefix):
        _ip("netns", "delete", ns, check=False)
        removed.append(f"netns {ns}")
    # veth ends vanish with their namespace peer; the tap goes with QEMU, but a crashed
    # run may leave a persistent one.
    for name in links(inst.prefix):
        _ip("link", "delete", name, check=False)
        removed.append(f"link {name}")
    return removed


def up(inst: Instance) -> None:
    """Create bridge, tap and namespaces. On any failure, remove what was created."""
    try:
        _ip("link", "add", inst.bridge, "type", "bridge")
        _sysctl_off(f"/proc/sys/net/ipv6/conf/{inst.bridge}/disable_ipv6")
        _ip("link", "set", inst.bridge, "up")
        # The tap is created here (persistent, not by QEMU's helper script) so QEMU needs no
        # network script and the tap's life is ours to manage.
        _ip("tuntap", "add", "dev", inst.tap, "mode", "tap")
        _sysctl_off(f"/proc/sys/net/ipv6/conf/{inst.tap}/disable_ipv6")
        _ip("link", "set", inst.tap, "master", inst.bridge, "up")
        for host in LAB_HOSTS:
            host_up(inst, host)
    except BaseException:
        down(inst)
        raise


def host_up(inst: Instance, host: str) -> None:
    """One lab host: its namespace, a veth pair onto the bridge, its addresses."""
    ns, veth, peer = inst.netns(host), inst.veth(host), f"{inst.veth(host)}p"
    _ip("netns", "add", ns)
    _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
    _sysctl_off(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6")
    _ip("link", "set", veth, "master", inst.bridge, "up")
    _ip("link", "set", peer, "netns", ns)
    _ip("-n", ns, "link", "set", peer, "name", "eth0")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "addr", "add", f"{inst.ipv4(host)}/24", "dev", "eth0")
    _ip("-n", ns, "addr", "add", f"{inst.ipv6(host)}/64", "dev", "eth0", "nodad")
    _ip("-n", ns, "link", "set", "eth0", "up")
