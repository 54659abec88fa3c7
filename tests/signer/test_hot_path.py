"""The request path's mechanisms for throughput, each held to its behaviour: a checkpoint
signature goes before the signatures waiting for the token, and a connection is served by a
thread that waits for the next one (a bounded number of them), never by a thread started for
it when one is idle."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from signer import daemon
from signer.token import TokenQueue


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def _waiting(q: TokenQueue) -> int:
    return len(q._cv._waiters)  # type: ignore[attr-defined]  # CPython's Condition


def _first_after_release(q: TokenQueue) -> list[str]:
    """Six signatures wait for the token, then a checkpoint: who gets it when it is free."""
    order: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with q.turn():
            release.wait()

    def user(name: str, urgent: bool) -> None:
        with q.turn(urgent):
            order.append(name)

    first = threading.Thread(target=holder)
    first.start()
    _until(lambda: q._busy)
    users = [threading.Thread(target=user, args=(f"sig{i}", False)) for i in range(6)]
    for t in users:
        t.start()
    _until(lambda: _waiting(q) == 6)
    users.append(threading.Thread(target=user, args=("checkpoint", True)))
    users[-1].start()
    _until(lambda: _waiting(q) == 7)
    release.set()
    for t in [first, *users]:
        t.join(10)
    return order


def test_a_checkpoint_goes_before_the_signatures_waiting_for_the_token() -> None:
    q = TokenQueue()
    for _ in range(5):  # without the rule the checkpoint is sometimes first, never 5 times
        order = _first_after_release(q)
        assert order[0] == "checkpoint", order
        assert sorted(order[1:]) == [f"sig{i}" for i in range(6)]


def test_the_token_does_one_operation_at_a_time() -> None:
    q = TokenQueue()
    inside = 0
    most = 0
    lock = threading.Lock()

    def user(urgent: bool) -> None:
        nonlocal inside, most
        for _ in range(200):
            with q.turn(urgent):
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=user, args=(i % 3 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most == 1


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
