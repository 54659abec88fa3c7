"""The posture suite's one-channel testinfra backend, against a real server process on this
machine (the launcher is `sh -c` instead of `ssh host`: the same server code, the same pipes)."""

from __future__ import annotations

import os

import pytest
import testinfra.host

from toolkit.assurance.shell_channel import ChannelBackend


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


def _plain_argv(cmd: str) -> list[str] | None:
    from toolkit.assurance import shell_channel

    ns: dict[str, object] = {}
    exec(shell_channel.PLAIN, ns)  # the server's own code
    argv = ns["plain_argv"](cmd)  # type: ignore[operator]
    return argv  # type: ignore[no-any-return]


@pytest.mark.parametrize(("cmd", "argv"), [
    ("cat -- /etc/hostname", ["cat", "--", "/etc/hostname"]),
    ("stat -c %U:%a /etc/ssh/sshd_config", ["stat", "-c", "%U:%a", "/etc/ssh/sshd_config"]),
    ("systemctl show -p A=B x.service ", ["systemctl", "show", "-p", "A=B", "x.service"]),
    # the shell's: builtins and reserved words, assignments, expansions, quotes, operators
    ("test -e /etc", None), ("echo a\\tb", None), ("command -v sh", None), ("cd /", None),
    ("if true", None), ("A=1 env", None), ("cat $HOME/x", None), ("cat ~/x", None),
    ("ls /etc/*", None), ("cat 'a b'", None), ('cat "a"', None), ("cat a\\ b", None),
    ("cat a; id", None), ("cat a | id", None), ("cat a >b", None), ("cat a && id", None),
    ("cat `id`", None), ("cat a\nid", None), ("cat a\tb", None), ("cat # x", None),
    ("{ cat; }", None), ("", None), (" ", None),
])
def test_only_a_plain_command_skips_the_shell(cmd: str, argv: list[str] | None) -> None:
    assert _plain_argv(cmd) == argv


@pytest.mark.parametrize("cmd", [
    "cat /etc/hostname", "ls -d /etc /nonexistent", "no-such-command-here x",
    "/etc/hostname", "stat -c %a /etc", "id -u", "cat /nonexistent",
])
def test_a_plain_command_answers_as_the_shell_would(host, cmd: str) -> None:  # type: ignore[no-untyped-def]
    """Exec'd without the shell (or, when it cannot be exec'd, by the shell after all): the
    same exit status, output and error as `/bin/sh -c` gives here."""
    import subprocess

    want = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, stdin=subprocess.DEVNULL)
    got = host.run(cmd)
    assert (got.rc, got.stdout_bytes, got.stderr_bytes) == (
        want.returncode, want.stdout, want.stderr)


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


def test_a_module_planted_in_the_working_directory_is_not_imported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The root channel starts in the admin's home: `python3 -I` keeps it off the import path."""
    marker = tmp_path / "planted-ran"
    (tmp_path / "json.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    backend = ChannelBackend(
        "local", ["sh", "-c", f"cd {tmp_path} && exec sh -c \"$0\""], root=False, timeout=5
    )
    h = testinfra.host.Host(backend)
    backend.set_host(h)
    try:
        assert h.run("echo ok").stdout == "ok\n"
    finally:
        backend.close()
    assert not marker.exists(), "a module from the working directory ran inside the channel"


SUDO_USER = "signhost-sudotest"


@pytest.fixture
def password_sudo_user():  # type: ignore[no-untyped-def]
    """A real account whose sudo asks for a password (made for the test, removed after)."""
    import secrets
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("sudo") or not shutil.which("useradd"):
        pytest.skip("needs root and sudo on this machine to make an account with password sudo")
    password = secrets.token_urlsafe(16)
    subprocess.run(["userdel", "-r", SUDO_USER], capture_output=True)
    subprocess.run(["useradd", "-m", SUDO_USER], check=True)
    subprocess.run(["chpasswd"], input=f"{SUDO_USER}:{password}\n", text=True, check=True)
    rule = f"/etc/sudoers.d/{SUDO_USER}"
    with open(rule, "w") as fh:
        fh.write(f"Defaults:{SUDO_USER} !lecture, timestamp_timeout=0\n{SUDO_USER} ALL=(ALL) ALL\n")
    os.chmod(rule, 0o440)
    try:
        yield password
    finally:
        os.unlink(rule)
        subprocess.run(["userdel", "-r", SUDO_USER], capture_output=True)


def _channel_as(user: str, password: str | None):  # type: ignore[no-untyped-def]
    backend = ChannelBackend(
        "local", ["runuser", "-u", user, "--", "sh", "-c"], root=True, password=password, timeout=20
    )
    h = testinfra.host.Host(backend)
    backend.set_host(h)
    return h


def test_sudo_with_a_password_gives_root_and_the_password_is_on_no_command_line(
    password_sudo_user: str,
) -> None:
    h = _channel_as(SUDO_USER, password_sudo_user)
    try:
        assert h.run("id -u").stdout.strip() == "0"
        leaked = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            for part in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{part}", "rb") as fh:
                        if password_sudo_user.encode() in fh.read():
                            leaked.append(f"{pid}/{part}")
                except OSError:
                    continue
        assert not leaked, f"the sudo password is visible in /proc: {leaked}"
    finally:
        h.backend.close()


def test_a_wrong_sudo_password_does_not_give_root(password_sudo_user) -> None:  # type: ignore[no-untyped-def]
    h = _channel_as(SUDO_USER, "not-" + password_sudo_user)
    try:
        with pytest.raises(RuntimeError, match="posture channel"):
            h.run("id -u")
    finally:
        h.backend.close()
