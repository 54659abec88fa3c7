"""The posture suite's one-channel testinfra backend, against a real server process on this
machine (the launcher is `sh -c` instead of `ssh host`: the same server code, the same pipes)."""

from __future__ import annotations

import os

import pytest
import testinfra.host

from toolkit.shell_channel import ChannelBackend


@pytest.fixture
def host():  # type: ignore[no-untyped-def]
    backend = ChannelBackend("local", ["sh", "-c"], root=False, timeout=5)
    h = testinfra.host.Host(backend)
    backend.set_host(h)
    yield h
    backend.close()


def test_exit_codes_stdout_and_stderr_come_back_as_on_the_host(host) -> None:  # type: ignore[no-untyped-def]
    r = host.run("printf 'out\\n'; printf 'err' >&2; exit 7")
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err")
    assert host.run("printf '\\000\\377'").stdout_bytes == b"\x00\xff"
    assert host.run("echo %s", "a'b; rm -rf /").stdout == "a'b; rm -rf /\n"  # quoted argument


def test_one_channel_serves_every_command(host) -> None:  # type: ignore[no-untyped-def]
    pids = {host.run("echo $PPID").stdout for _ in range(5)}
    assert len(pids) == 1, "each command started a new server"
    assert host.backend.commands == 5


def test_testinfra_modules_work_over_it(host, tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "x"
    f.write_text("hello")
    f.chmod(0o640)
    assert host.file(str(f)).mode == 0o640
    assert host.file(str(f)).content_string == "hello"
    assert host.exists("sh")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_host_sudo_runs_as_the_other_user(host) -> None:  # type: ignore[no-untyped-def]
    with host.sudo("nobody"):
        assert host.check_output("id -un") == "nobody"
    assert host.check_output("id -u") == str(os.geteuid())


def test_a_command_that_hangs_is_killed_and_reported(host) -> None:  # type: ignore[no-untyped-def]
    r = host.run("sleep 30")
    assert r.rc == 124 and "timed out" in r.stderr
    assert host.run("echo still here").stdout == "still here\n"


def test_a_dead_channel_is_restarted_for_the_next_command(host) -> None:  # type: ignore[no-untyped-def]
    first = host.run("echo $PPID").stdout
    host.backend._proc.kill()
    host.backend._proc.wait()
    assert host.run("echo $PPID").stdout != first


def test_a_channel_lost_during_a_command_raises(host) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="lost during"):
        host.run("kill -9 $PPID; sleep 1")
    assert host.run("true").rc == 0  # and the next command gets a new one
