"""A testinfra backend that runs every command of the posture suite through one root channel.

Why: the stock ssh backend pays, per command, a new SSH session on the control master, a login
shell, then `sudo` (PAM, `use_pty`, the sudo log). On the lab VM under software emulation that
is ~0.4-1 s per command and the suite issues several hundred. Here one `ssh host sudo -n python3`
starts a small stdlib-only server on the host (the code below, sent base64-encoded on the command
line, nothing installed) that reads one JSON request per line and runs it with `/bin/sh -c`, as
`sudo /bin/sh -c` would; a command costs one fork/exec on the host. A plain command (PLAIN:
words of letters, digits and `_./:%@+,=-` only, the first neither a shell builtin or keyword nor
an assignment) is exec'd as those words without the shell, which is what the shell would run:
no expansion, quoting or redirection can apply to it. Starting dash costs ~30 ms of an emulated
host's time (`cat FILE` 66 ms through it, 39 ms without); the syslog line 0.5 ms. A plain
command that cannot be exec'd (not found, not executable, a script without `#!`) runs with the
shell after all, so its exit status and message are the shell's.

Audit trail: the one sudo invocation is in the sudo log; the server writes every command it runs
to syslog (tag `signhost-verify`, facility authpriv), so the host's journal still shows what the
suite did. `with host.sudo("user"):` works as with the stock backend (root runs the command
through `runuser -u user -- /bin/sh -c`).

Failure modes: a command that outlives its timeout is killed and reported with rc 124; a channel
that dies (host rebooted, sshd killed) is restarted once for the next command; a channel that dies
during a command raises RuntimeError (what the ssh backend does on exit status 255).
"""

from __future__ import annotations

import base64
import json
import select
import shlex
import subprocess
import tempfile
from typing import IO, Any

from testinfra.backend import base

BEGIN = "SIGNHOST-CHANNEL-BEGIN"

# The words a plain command may have, and what makes it the shell's (dash's builtins and
# reserved words). Shared by the server and its unit test.
PLAIN = r"""
import re
_WORDS = re.compile(r"[A-Za-z0-9_./:%@+,=-]+( +[A-Za-z0-9_./:%@+,=-]+)* *")
_SHELL = frozenset(
    "! { } case do done elif else esac fi for if in then until while . : [ alias bg break cd "
    "command continue echo eval exec exit export false fc fg getopts hash jobs kill local "
    "printf pwd read readonly return set shift test times trap true type ulimit umask "
    "unalias unset wait".split())


def plain_argv(cmd):  # the argv the shell would exec for cmd, or None: the shell runs it
    if not _WORDS.fullmatch(cmd):
        return None
    argv = cmd.split()
    if argv[0] in _SHELL or "=" in argv[0]:
        return None
    return argv
"""

SERVER = PLAIN + r"""
import base64, json, os, signal, subprocess, sys, syslog
# Whatever precedes the begin line is the sudo password that sudo did not need to read (cached
# or NOPASSWD): dropped unread.
for line in sys.stdin.buffer:
    if line.rstrip(b"\n") == b"%(begin)s":
        break
syslog.openlog("signhost-verify", 0, syslog.LOG_AUTHPRIV)
syslog.syslog(syslog.LOG_NOTICE, "posture channel opened (uid %d, sudo user %s)"
              % (os.getuid(), os.environ.get("SUDO_USER", "-")))
out = sys.stdout.buffer
n = 0
for line in sys.stdin.buffer:
    req = json.loads(line)
    cmd = req["cmd"]
    n += 1
    syslog.syslog(syslog.LOG_INFO, "run: " + cmd[:1500])
    argv = plain_argv(cmd)
    try:
        p = None
        if argv is not None:
            try:
                p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                   timeout=req.get("timeout", 300), start_new_session=True)
            except OSError:  # not found, not executable, no #!: the shell's answer instead
                p = None
        if p is None:
            p = subprocess.run(["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=req.get("timeout", 300),
                               start_new_session=True)
        rc, so, se = p.returncode, p.stdout, p.stderr
        if rc < 0:
            rc = 128 - rc
    except subprocess.TimeoutExpired as e:
        rc, so, se = 124, e.stdout or b"", (e.stderr or b"") + b"\n[signhost-verify: timed out]"
    out.write(json.dumps({"rc": rc, "out": base64.b64encode(so).decode(),
                          "err": base64.b64encode(se).decode()}).encode() + b"\n")
    out.flush()
syslog.syslog(syslog.LOG_NOTICE, "posture channel closed after %d commands" % n)
""".replace("%(begin)s", BEGIN)


def remote_command(*, sudo: bool, password: bool = False) -> str:
    """The command line that starts the server on the host (root through sudo, or as is).

    `python3 -I`: isolated mode, so neither the admin's home (the current directory, where a
    planted module would run as root and fake results) nor PYTHON* variables reach the import
    path. With `password`, sudo reads it from the channel's first line (`-S`, no prompt); the
    password never appears on a command line, in an environment or in a log.
    """
    code = base64.b64encode(SERVER.encode()).decode()
    py = f"python3 -I -u -c {shlex.quote(f'import base64;exec(base64.b64decode({code!r}))')}"
    if not sudo:
        return py
    return f"sudo -S -p '' {py}" if password else f"sudo -n {py}"


class ChannelBackend(base.BaseBackend):  # type: ignore[misc]
    """testinfra backend over one long-lived channel; `launcher + [remote_command]` starts it.

    For a host: launcher = ["ssh", "-F", ssh_config, "-o", "BatchMode=yes", alias].
    """

    NAME = "signhost-channel"

    def __init__(self, hostname: str, launcher: list[str], *, root: bool = True,
                 timeout: float = 300, password: str | None = None, **kwargs: Any) -> None:
        super().__init__(hostname, **kwargs)
        self.launcher = list(launcher)
        self.root = root
        self._password = password
        self.timeout = timeout
        self.commands = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    # -- channel ---------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen[bytes]:
        self.close()
        self._stderr = tempfile.TemporaryFile()
        pw = self._password if self.root else None
        self._proc = subprocess.Popen(
            [*self.launcher, remote_command(sudo=self.root, password=pw is not None)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        assert self._proc.stdin is not None
        try:
            if pw is not None:
                self._proc.stdin.write(pw.encode() + b"\n")
            self._proc.stdin.write(BEGIN.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the next exchange reports why the channel closed
        return self._proc

    def _why(self) -> str:
        if self._stderr is None:
            return "(no output)"
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines()
                 if ln.strip()]
        return lines[-1][-300:] if lines else "(no output)"

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()

    def _exchange(self, cmd: str) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"cmd": cmd, "timeout": self.timeout}).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError as exc:
            proc.wait()
            raise RuntimeError(
                f"posture channel to {self.hostname} closed: {self._why()}") from exc
        fd = proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout + 60)
        line = proc.stdout.readline() if ready else b""
        if not line:
            proc.kill()
            proc.wait()
            self._proc = None
            raise RuntimeError(f"posture channel to {self.hostname} lost during {cmd!r}: "
                               f"{self._why()}")
        self.commands += 1
        reply: dict[str, Any] = json.loads(line)
        return reply

    # -- testinfra -------------------------------------------------------------------------
    def get_sudo_command(self, command: str, sudo_user: str | None) -> str:
        """`with host.sudo(user)`: the server already runs as root, so switch with runuser
        (util-linux, on every Debian host; no password, no second sudo log line per command)."""
        if sudo_user is None or sudo_user == "root":
            return str(self.quote("/bin/sh -c %s", command))
        return str(self.quote("runuser -u %s -- /bin/sh -c %s", sudo_user, command))

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        reply = self._exchange(cmd)
        return self.result(int(reply["rc"]), self.encode(cmd),
                           base64.b64decode(reply["out"]), base64.b64decode(reply["err"]))


def ssh_launcher(spec: base.HostSpec, ssh_config: str | None) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
           "-o", "ServerAliveInterval=15"]
    if ssh_config:
        cmd += ["-F", ssh_config]
    if spec.user:
        cmd += ["-l", spec.user]
    if spec.port:
        cmd += ["-p", str(spec.port)]
    return [*cmd, spec.name]


def host_from_launcher(name: str, launcher: list[str], *, sudo: bool,
                       password: str | None = None, timeout: float = 300) -> Any:
    """A testinfra Host on the channel backend; `launcher + [remote command]` starts it."""
    import testinfra.host

    backend = ChannelBackend(name, launcher, root=sudo, password=password, timeout=timeout)
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host


def host_from_spec(spec: str, ssh_config: str | None, *, sudo: bool) -> Any:
    """A testinfra Host on the channel backend for an `ssh://alias` spec."""
    import testinfra.host

    if not spec.startswith("ssh://"):
        raise ValueError(f"the posture channel needs an ssh:// target, not {spec!r}")
    hostspec = base.BaseBackend.parse_hostspec(spec[len("ssh://"):])
    backend = ChannelBackend(hostspec.name, ssh_launcher(hostspec, ssh_config), root=sudo)
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host

