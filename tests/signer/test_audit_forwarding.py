"""AUD-04 across segment rotation, without a VM: a local daemon whose audit log rotates every
few entries, the signer role's own forwarder configuration (rendered from its template) in a
real rsyslogd, and the lab collector's receiver in another, RELP over mutual TLS on loopback
(toolkit/local_forwarder.py). Afterwards `signer audit compare` must find the copy complete.

The second test stops the forwarder while the log rotates, as a restart or an upgrade of
rsyslog does: with imfile following the active file name only, the closed segment's unread
tail and the segments closed meanwhile never reached the collector (compare: a gap). The
copy's order is not asserted: around a rotation imfile may send a few lines twice or out of
order, and the copy is compared by seq (the template says why)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from signer import certs, compare, segments
from tests.signer.conftest import Signer
from toolkit import local_forwarder
from toolkit.local_forwarder import Forwarding
from toolkit.local_signer import sign_over_socket

pytestmark = [pytest.mark.slow, pytest.mark.skipif(local_forwarder.available() is not None,
                                                   reason=str(local_forwarder.available()))]

# A state checkpoint every 4 entries; a segment closes after one once it holds 8 or more.
SMALL_SEGMENTS = {"checkpoint_interval": 4, "segment_entries": 8}


@pytest.fixture
def rotating(make_signer: Callable[..., Signer], tmp_path: Path
             ) -> Iterator[tuple[Signer, Forwarding]]:
    s = make_signer(**SMALL_SEGMENTS)
    fw = Forwarding(tmp_path / "forwarding", s.audit_log)
    try:
        fw.start_collector()
        fw.start_forwarder()
        yield s, fw
    finally:
        fw.close()


def _sign(s: Signer, n: int) -> None:
    for i in range(n):
        code, message, _sig = sign_over_socket(s.socket, "rawonly", b"artifact %d" % i, "raw")
        assert code == 0, message


def _closed(s: Signer) -> list[str]:
    return [seg.path.name for seg in segments.closed_segments(s.audit_log)]


def _last_seq(s: Signer) -> int:
    last = -1
    for seg in segments.of_log(s.audit_log):
        for _off, line in segments.lines(seg):
            last = json.loads(line)["seq"]
    return last


def _compare(s: Signer, fw: Forwarding) -> compare.Result:
    """Once the copy holds the host's last entry: the host's log (every segment) against it."""
    fw.wait_for(_last_seq(s), every=False)
    spki = certs.load_public_key(s.lab.certs / "audit.pem")
    return compare.compare([s.audit_log], fw.copy, spki)


def _assert_complete(s: Signer, r: compare.Result) -> None:
    """The copy holds every entry of the host's log, from seq 0, nothing in flight."""
    last = _last_seq(s)
    assert (r.kind, (r.local_first, r.local_last), (r.copy_first, r.copy_last),
            r.in_flight) == ("consistent", (0, last), (0, last), 0), r.text()


def test_the_collector_gets_every_entry_while_the_log_rotates(
        rotating: tuple[Signer, Forwarding]) -> None:
    s, fw = rotating
    _sign(s, 40)
    assert len(_closed(s)) >= 2, _closed(s)
    r = _compare(s, fw)
    _assert_complete(s, r)


def test_segments_closed_while_the_forwarder_is_down_reach_the_collector(
        rotating: tuple[Signer, Forwarding]) -> None:
    s, fw = rotating
    _sign(s, 10)
    fw.wait_for(_last_seq(s), every=False)
    fw.stop_forwarder()
    before = _closed(s)
    _sign(s, 30)  # the active file's tail and whole segments, all closed while it is down
    assert len(_closed(s)) >= len(before) + 2, (before, _closed(s))
    fw.start_forwarder()
    _sign(s, 3)
    r = _compare(s, fw)
    _assert_complete(s, r)


def test_a_new_forwarder_sends_the_closed_segments_too(make_signer: Callable[..., Signer],
                                                       tmp_path: Path) -> None:
    """Forwarding set up on a host whose log has rotated already: the copy starts at seq 0."""
    s = make_signer(**SMALL_SEGMENTS)
    _sign(s, 20)
    assert len(_closed(s)) >= 2, _closed(s)
    with Forwarding(tmp_path / "forwarding", s.audit_log) as fw:
        fw.start_collector()
        fw.start_forwarder()
        _sign(s, 3)
        r = _compare(s, fw)
    _assert_complete(s, r)
