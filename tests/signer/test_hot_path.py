"""The request path's mechanisms for throughput, each held to its behaviour: a connection is
served by a thread that waits for the next one (a bounded number of them), never by a thread
started for it when one is idle. (A checkpoint before the signatures waiting for the token:
tests/signer/test_tokenproc.py.)"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from signer import daemon
from tests.signer.conftest import until as _until


class _Served:
    """A daemon whose connection handler only records which thread served it."""

    def __init__(self, path: Path) -> None:
        self.d = daemon.Daemon(None)  # type: ignore[arg-type]  # serve() reads no config
        self.tids: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.d._connection = self._connection  # type: ignore[method-assign]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.path = path
        self.thread = threading.Thread(target=self.d.serve, args=(self.sock,))
        self.thread.start()

    def _connection(self, conn: socket.socket, uid: int) -> None:  # Daemon._connection's
        with conn:
            self.tids.append(threading.get_native_id())
            self.gate.wait(10)
            conn.sendall(b"x")

    def request(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(self.path))
            assert c.recv(1) == b"x"

    def conn_threads(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "conn" and t.is_alive()]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    s = _Served(tmp_path / "s.sock")
    try:
        yield s
    finally:
        s.gate.set()
        s.d.request_stop()
        s.thread.join(10)
        _until(lambda: not s.conn_threads())


def test_a_connection_is_served_by_the_thread_that_waits_for_it(served: _Served) -> None:
    for _ in range(20):
        served.request()
        _until(lambda: served.d._idle == 1)  # the thread went back to wait
    assert len(served.tids) == 20
    assert len(set(served.tids)) == 1, "a thread was started for a connection while one waited"


def test_threads_beyond_the_idle_limit_end_after_a_burst(served: _Served) -> None:
    n = daemon.IDLE_THREADS + 8
    served.gate.clear()  # every connection holds its thread until the gate opens
    clients = [threading.Thread(target=served.request) for _ in range(n)]
    for t in clients:
        t.start()
    _until(lambda: len(served.tids) == n)
    assert len(served.conn_threads()) >= n
    served.gate.set()
    for t in clients:
        t.join(10)
    _until(lambda: served.d._active == 0)
    _until(lambda: len(served.conn_threads()) <= daemon.IDLE_THREADS)
    assert served.d._idle == daemon.IDLE_THREADS
    served.request()  # and one of them serves the next connection
    assert served.tids[-1] in set(served.tids[:-1])


def test_idle_threads_end_when_the_daemon_stops(served: _Served) -> None:
    served.request()
    _until(lambda: served.d._idle == 1)
    served.d.request_stop()
    served.thread.join(10)
    _until(lambda: not served.conn_threads())
    assert served.d._idle == 0
