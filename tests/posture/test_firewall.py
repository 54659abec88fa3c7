"""Firewall posture (NET-01..05) seen from the host: the live ruleset, what the host may
send, and what listens. What other hosts can reach is proved from elsewhere (the inventory's
vantage points; tests/lab/test_attacks.py in CI)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from testinfra.host import Host

    from tests.posture.conftest import Expected, Vantage

RULESET = "/etc/nftables.d/signhost.nft"


def chains(host: Host) -> dict[str, dict[str, Any]]:
    data = json.loads(host.check_output("nft -j list table inet signhost"))
    return {c["chain"]["name"]: c["chain"] for c in data["nftables"] if "chain" in c}


@pytest.fixture(scope="module")
def live_chains(host: Host) -> dict[str, dict[str, Any]]:
    """The live table's chains, read once for the module; each direction asserts on its own."""
    return chains(host)


@pytest.mark.control("NET-01", "NET-02")
@pytest.mark.parametrize("hook", ["input", "output", "forward"])
def test_every_direction_drops_by_default(live_chains: dict[str, dict[str, Any]],
                                          hook: str) -> None:
    c = [c for c in live_chains.values() if c.get("hook") == hook]
    assert c, f"no base chain on {hook} in table inet signhost"
    assert all(x["policy"] == "drop" for x in c)


@pytest.mark.control("NET-01")
def test_the_firewall_covers_ipv4_and_ipv6(host: Host) -> None:
    data = json.loads(host.check_output("nft -j list tables"))
    families = {t["table"]["family"] for t in data["nftables"] if "table" in t
                and t["table"]["name"] == "signhost"}
    assert families == {"inet"}


def probe_addr(expected: Expected) -> str:
    """Where the egress probes go: the inventory's verify_egress_probe (an address a probe that
    a broken firewall let through would harm no one at; a VM's own host, say), else
    TEST-NET-1 (RFC 5737), never routed on the internet."""
    return str(expected.get("verify_egress_probe") or "192.0.2.1")


EGRESS = [(443, "tcp"), (22, "tcp"), (53, "udp"), (5353, "udp")]
# How long a probe's connect() waits. A dropped SYN costs the whole wait, so it is short, and a
# TIMEOUT is never taken alone for a drop: each probe to the egress address must also have
# left its own line in the firewall's drop log (the packet was dropped, not answered late),
# and a TIMEOUT from the log collector's SSH port counts only when the collector's allowed
# port, probed in the same run with the same wait, did answer (the path answers within it;
# a collector seen at 1-10 ms in the lab).
EGRESS_WAIT = 2.0

EGRESS_PROBES = """
import errno, json, socket, sys, threading, time
def probe(addr, port, proto, out):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(float(sys.argv[3]))
    try:
        s.connect((addr, port))
        if proto == "udp":
            s.send(bytes(48))
        out[f"{addr} {port} {proto}"] = "OK"
    except OSError as e:
        out[f"{addr} {port} {proto}"] = errno.errorcode.get(e.errno, "TIMEOUT") if e.errno else "TIMEOUT"
    finally:
        s.close()
out, threads = {}, []
for i, (addr, port, proto) in enumerate(json.loads(sys.argv[1])):
    if i == int(sys.argv[2]):
        time.sleep(0.3)  # the allow-list probes' packets first: the drop log is rate limited
    t = threading.Thread(target=probe, args=(addr, port, proto, out))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
print(json.dumps(out))
"""


class Egress:
    """What the host got trying to reach each address outside its allow list, all probed at once
    (a dropped SYN costs its whole timeout: one after another they took 5 s each), and the
    host's time just before they started (for its kernel log)."""

    def __init__(self, since: int, results: dict[str, str]) -> None:
        self.since, self.results = since, results

    def result(self, addr: str, port: int, proto: str) -> str:
        return self.results[f"{addr} {port} {proto}"]


@pytest.fixture(scope="module")
def egress(host: Host, expected: Expected) -> Egress:
    addr = probe_addr(expected)
    jobs = [(addr, port, proto) for port, proto in EGRESS]
    first_collector = len(jobs)
    for c in expected.get("firewall_log_collectors") or []:
        addr = str(c["network"]).split("/")[0]
        # SSH to the collector (dropped) and, the positive control, its log port (allowed)
        jobs += [(addr, 22, "tcp"), (addr, int(c["port"]), str(c.get("proto") or "tcp"))]
    since = int(host.check_output("date +%s")) - 1
    out = host.check_output(shlex.join(["python3", "-c", EGRESS_PROBES, json.dumps(jobs),
                                        str(first_collector), str(EGRESS_WAIT)]))
    return Egress(since, json.loads(out))


@pytest.mark.control("NET-02")
@pytest.mark.parametrize(("port", "proto"), EGRESS)
def test_host_cannot_connect_outside_its_allow_list(host: Host, expected: Expected,
                                                    egress: Egress, port: int,
                                                    proto: str) -> None:
    addr = probe_addr(expected)
    # TCP: the SYN is dropped, connect() times out; UDP: sendto() gets EPERM at once.
    assert egress.result(addr, port, proto) in ("EPERM", "TIMEOUT")
    # ... and it is the firewall that dropped it, not a missing route
    log = host.run(f"journalctl -k --since @{egress.since} --no-pager -g signhost-drop-out").stdout
    assert f"DST={addr} " in log and f"DPT={port} " in log, log


@pytest.mark.control("NET-02")
def test_the_log_collector_is_reachable_on_its_port_only(expected: Expected,
                                                         egress: Egress) -> None:
    collectors = expected["firewall_log_collectors"]
    if not collectors:
        pytest.skip("does not apply: no log collector in the inventory (firewall_log_collectors)")
    for c in collectors:
        addr = str(c["network"]).split("/")[0]
        assert int(c["port"]) != 22
        # The positive control: the collector's own port answered within the probes' wait
        # (connected, or refused: either way an answer came back on this path in time) ...
        control = egress.result(addr, int(c["port"]), str(c.get("proto") or "tcp"))
        assert control in ("OK", "ECONNREFUSED"), (
            f"{addr}:{c['port']} (allowed) gave {control} within {EGRESS_WAIT} s: a TIMEOUT "
            "on its SSH port below would prove nothing")
        # ... so SSH to the collector, say, got no answer because the host's own firewall
        # dropped it before it left.
        assert egress.result(addr, 22, "tcp") in ("EPERM", "TIMEOUT"), addr


@pytest.mark.control("NET-03")
def test_dropped_packets_are_logged(host: Host, expected: Expected, egress: Egress) -> None:
    rules = host.check_output("nft list chain inet signhost output")
    assert 'log prefix "signhost-drop-out: "' in rules and "limit rate" in rules
    # The egress probes' packets (sent together, within the log's burst) each left a line.
    addr = probe_addr(expected)
    log = host.run(f"journalctl -k --since @{egress.since} --no-pager -g signhost-drop-out")
    lines = log.stdout.splitlines()
    for port, proto in EGRESS:
        want = (f"DST={addr} ", f"PROTO={proto.upper()} ", f"DPT={port} ")
        assert any(all(w in ln for w in want) for ln in lines), (want, log.stdout)


@pytest.mark.control("NET-04")
def test_installed_ruleset_is_valid_and_loaded_at_boot(host: Host) -> None:
    assert host.run(f"nft -c -f {RULESET}").rc == 0
    assert host.service("signhost-firewall.service").is_enabled
    # The ruleset never flushes others' tables.
    assert "flush ruleset" not in host.file(RULESET).content_string


@pytest.mark.control("NET-05")
def test_only_sshd_listens_on_the_network(host: Host) -> None:
    out = host.check_output("ss -H -l -n -p -t -u -w")
    offenders = []
    for line in out.splitlines():
        cols = line.split()
        local = cols[4]
        addr = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
        if addr in ("127.0.0.1", "::1") or addr.startswith("127."):
            continue
        if cols[0] == "tcp" and '"sshd"' in line:
            continue
        if cols[0] == "udp" and local.endswith(":68") and "systemd-network" in line:
            continue  # the DHCP client of the admin NIC (answers accepted from the admin net only)
        if cols[0] == "udp" and '"systemd-timesyn"' in line and int(local.rsplit(":", 1)[1]) >= 32768:
            continue  # the NTP client's socket for its current query (ephemeral port)
        offenders.append(line)
    assert offenders == [], "\n".join(offenders)


# --- seen from other hosts (the inventory's vantage points) ----------------------------------

PROBE = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.settimeout(10)
    print("OPEN", s.recv(64)[:16])
except ConnectionRefusedError:
    print("REFUSED")
except (socket.timeout, TimeoutError):
    print("TIMEOUT")
except OSError as e:
    print("ERROR", e.errno)
"""


def probe_from(point: Vantage, addr: str, port: int | str, wait: float = 4) -> str:
    """A TCP connection from the vantage point: OPEN (with the banner), REFUSED or TIMEOUT."""
    r = point.run(shlex.join(["python3", "-c", PROBE, addr, str(port), str(wait)]),
                  timeout=wait + 60)
    assert r.returncode == 0, f"the probe did not run at {point.name}: {r.stderr.strip()}"
    return r.stdout.strip()


# How long the outsider's connect() waits for an answer that must not come. A dropped SYN
# costs the whole wait, so it is short, but only with a positive control: the authorised build
# host connects to the same addresses' SSH port (the same network, the same interface of the
# host, the same input chain) within a quarter of it (CONTROL_WAIT), in the same run; an
# answer the outsider got later than NO_ANSWER_WAIT would have come at least four times slower
# than the control's. The lab's SYN/ACK takes 1-10 ms; a host too slow for the control fails
# it, never passes by a late answer. Without a build vantage point there is no control, and the
# outsider waits FALLBACK_WAIT as it always did.
NO_ANSWER_WAIT = 2.0
CONTROL_WAIT = NO_ANSWER_WAIT / 4
FALLBACK_WAIT = 4.0

# What each vantage point tries: (port, how long it waits for an answer). "ssh" is the
# inventory's ssh_port. The outsider must get no answer at all; the build host its SSH banner
# (a slow emulated host may take a while to send it) and nothing else; "control" is the build
# host's SSH port again, within CONTROL_WAIT. None: NO_ANSWER_WAIT, or FALLBACK_WAIT when the
# control cannot run.
VANTAGE_PROBES: dict[str, list[tuple[int | str, float | None]]] = {
    "outside": [("ssh", None), (443, None), (8080, None)],
    "build": [("ssh", 20.0), (443, None), ("control", CONTROL_WAIT)]}


class VantageProbes:
    """Every vantage point's probes, started together the first time a test asks (each dropped
    SYN costs its whole wait: one after another, the probes took 4 s each, 35 s in all)."""

    def __init__(self, vantage: Callable[[str], Vantage], expected: Expected) -> None:
        self._vantage, self._expected = vantage, expected
        self._futures: dict[tuple[str, str, str], Future[str]] = {}
        self.controlled = False  # the outsider's short wait has its positive control
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="vantage")

    def _start(self) -> None:
        points = self._expected.get("verify_vantage_points") or {}
        addresses = {name: set(entry.get("addresses") or ()) for name, entry in points.items()
                     if entry and entry.get("argv")}
        usable = {name for name in VANTAGE_PROBES if addresses.get(name)}
        # the control covers the outsider's addresses only where the build host probes them too
        self.controlled = {"build", "outside"} <= usable and (
            addresses["outside"] <= addresses["build"])
        default = NO_ANSWER_WAIT if self.controlled else FALLBACK_WAIT
        for name, probes in VANTAGE_PROBES.items():
            if name not in usable:
                continue  # the test that needs it skips (or fails) through `vantage(name)`
            point = self._vantage(name)
            for addr in point.addresses:
                for port, wait in probes:
                    real = self._expected["ssh_port"] if port in ("ssh", "control") else port
                    self._futures[(name, addr, str(port))] = self._pool.submit(
                        probe_from, point, addr, real, default if wait is None else wait)

    def result(self, point: Vantage, addr: str, port: int | str) -> str:
        if not self._futures:
            self._start()
        return self._futures[(point.name, addr, str(port))].result()

    def control(self, addr: str) -> str | None:
        """The build host's connection to `addr`'s SSH port within CONTROL_WAIT (OPEN, with
        the banner), None when there is no control (the outsider waited FALLBACK_WAIT)."""
        if not self._futures:
            self._start()
        if not self.controlled:
            return None
        return self._futures[("build", addr, "control")].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def vantage_probes(vantage: Callable[[str], Vantage],
                   expected: Expected) -> Iterator[VantageProbes]:
    probes = VantageProbes(vantage, expected)
    yield probes
    probes.close()


@pytest.mark.control("NET-01")
@pytest.mark.parametrize("port", ["ssh", 443, 8080])
def test_an_unauthorised_host_gets_no_answer(vantage: Callable[[str], Vantage],
                                             vantage_probes: VantageProbes,
                                             expected: Expected, port: int | str) -> None:
    # Dropped, not refused: a RST would already tell the outsider the host is there.
    point = vantage("outside")
    shown = expected["ssh_port"] if port == "ssh" else port
    for addr in point.addresses:
        got = vantage_probes.result(point, addr, port)
        control = vantage_probes.control(addr)
        # the positive control: the same path answers well within the outsider's wait
        assert control is None or control.startswith("OPEN"), (
            f"the build host got {control} from {addr}:{expected['ssh_port']} within "
            f"{CONTROL_WAIT} s: the outsider's {NO_ANSWER_WAIT} s wait proves nothing")
        assert got == "TIMEOUT", f"{addr}:{shown} answered the outsider"


@pytest.mark.control("NET-01")
def test_an_authorised_build_host_reaches_ssh_and_nothing_else(
        vantage: Callable[[str], Vantage], vantage_probes: VantageProbes) -> None:
    point = vantage("build")
    for addr in point.addresses:
        out = vantage_probes.result(point, addr, "ssh")
        assert out.startswith("OPEN") and "SSH-2.0" in out, f"{addr}: {out}"
        assert vantage_probes.result(point, addr, 443) == "TIMEOUT", \
            f"{addr}:443 answered the build host"
