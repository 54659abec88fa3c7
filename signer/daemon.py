"""signerd: the only process that touches the token. This module is its server: start and
stop, the accept loop, connection and request slots (the custodians' lane), deadlines, and
reading each request's header before handing the request to its command's handler
(signer/commands.py, a table by name). Start-up rebuilds the state from the audit log
(signer/recovery.py).

One thread accepts on the Unix socket and hands each connection to a thread of its own (an idle
one from an earlier connection when there is one: starting a thread costs the accept loop a
hand-shake with the new thread, most of a millisecond on a busy machine, on every request's
path; a hand-off is a queue put); each request is checked by
`policy`, streamed and hashed, signed through the token process, written to the audit log and
only then answered. The audit writer batches concurrent entries into one fsync (group commit).
The order of the locks, and how a burst cannot overrun a budget: signer/commands.py.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import queue
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asn1crypto import x509

from signer import audit, certs, commands, pin, policy, recovery, request, service, unlocking, wire
from signer.algorithms import BY_NAME, ECDSA_P256
from signer.cards import Cards
from signer.commands import COMMANDS
from signer.config import NAME_RE, Config
from signer.errors import Exit, SignerError
from signer.policy import Denied
from signer.tokenproc import TokenProcess
from signer.uri import PKCS11URI

log = logging.getLogger("signerd")

# Custodians are always heard: a connection holds no slot until its header says who it is
# (a thread each, with a total deadline), build clients share CLIENT_SLOTS with at most
# PER_CLIENT each, and custodians have CUSTODIAN_SLOTS that clients can never take. Over a
# limit a request waits (holding a thread, not a slot) up to SLOT_WAIT, then gets "busy" (69).
MAX_CONNECTIONS = 256  # open connections in all, apart from the custodians' lane
MAX_PER_UID = 64  # open connections from one local account (the gateway's, or a bound one)
# The custodians' lane: connections from the account a custodian is bound to (`account`, read
# with SO_PEERCRED at accept, before any byte is read) count here, not against
# MAX_CONNECTIONS, so build clients holding every connection they may have cannot keep a
# custodian's freeze, thaw, approve or unlock out. Each custodian account has its own share.
CUSTODIAN_PER_UID = 8
CLIENT_SLOTS = 16  # client requests being served at once
PER_CLIENT = 8  # of which one client may hold
SLOT_WAIT = 60.0
CUSTODIAN_SLOTS = 4  # custodian requests being served at once, apart from the clients'
HEADER_TIMEOUT = 10.0  # total, from accept to the end of the header line
BODY_TIMEOUT = 300.0  # per read: a stalled upload is dropped, a slow one is not ...
REQUEST_DEADLINE = 3600.0  # ... until this total: a trickle cannot hold a slot for ever
STOP_GRACE = 10.0
IDLE_THREADS = CLIENT_SLOTS + CUSTODIAN_SLOTS  # kept waiting for the next connection


class Daemon:
    def __init__(self, cfg: Config, full_replay: bool = False) -> None:
        self.cfg = cfg
        # Start-up from the last state checkpoint, unless asked to replay the whole log
        # (the bench's "before"; the result is the same state, built the slow way).
        self.full_replay = full_replay
        self.scan_seconds = 0.0
        self.state = policy.State()
        # What the command handlers share (signer/commands.py: the order of the locks)
        self.lock = threading.Lock()  # policy state
        self.unlock_lock = threading.Lock()
        # who has sent a share of the daemon's own token's PIN (signer/unlocking.py): set by
        # start() from the config, as the custodians' accounts are
        self.own_lock = unlocking.Lock("", 0, 1)
        self.inflight: dict[str, int] = {}  # profile -> signatures reserved, not yet logged
        self.fetching: set[str] = set()  # requests being signed by a `fetch`
        # (key URI, algorithm) -> private key handle, for resident keys only; or why refused
        self.keys: dict[tuple[PKCS11URI, str], Any] = {}
        self.key_problems: dict[tuple[PKCS11URI, str], str] = {}
        self.profile_certs: dict[str, x509.Certificate] = {}  # profile -> its certificate
        self.profile_chains: dict[str, tuple[x509.Certificate, ...]] = {}  # its CA chain
        self.cert_problems: dict[str, str] = {}
        self._stopping = threading.Event()
        self._active = 0
        self._active_cv = threading.Condition()  # also guards the counters below
        self._per_uid: dict[int, int] = {}
        self._custodian_uids: frozenset[int] = frozenset()  # set by start(): accounts
        self._lane_active = 0  # connections in the custodians' lane (guarded by _active_cv)
        self._slots: dict[tuple[str, str], int] = {}  # (role, name) -> requests being served
        self._deadlines: dict[socket.socket, float] = {}
        self._idle = 0  # connection threads waiting on _handoff (guarded by _active_cv)
        self._handoff: queue.SimpleQueue[tuple[socket.socket, int] | None] = \
            queue.SimpleQueue()
        self.token: TokenProcess | None = None
        self.cards = Cards(self)  # the [tokens.*] cards, each its own token process
        self.fatal: SignerError | None = None  # why serve() ended on its own
        self.writer: audit.Writer | None = None
        self._wall0 = time.time()  # `now`: set again at start (recovery.start_clock)
        self._mono0 = time.clock_gettime(time.CLOCK_BOOTTIME)

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        d = self.cfg.daemon
        self._custodian_uids = _custodian_uids(self.cfg)
        self.own_lock = unlocking.Lock("", d.pin_shares, d.pin_share_window)
        secret = pin.read_file(d.pin_file) if d.pin_file is not None else None
        # The token in a process of its own (signer/tokenproc.py: the GIL and the token)
        self.token = TokenProcess(d.token_module, d.token_label, d.token_serial,
                                  on_lost=self._token_lost)
        d.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (d.state_dir / "signatures").mkdir(mode=0o700, exist_ok=True)
        got = recovery.recover(self.cfg, self.token, self.full_replay)
        self.state, self.scan_seconds = got.state, got.seconds
        self._wall0, self._mono0 = got.wall0, got.mono0
        scan = got.scan
        self.writer = audit.Writer(d.audit_log, scan, d.checkpoint_interval,
                                   self._sign_checkpoint, d.state_dir / "checkpoints",
                                   d.segment_bytes, d.segment_entries,
                                   unverified=got.unvouched, clock=self.now)
        self.writer.open()
        notes = [recovery.keep_torn(self.cfg, scan)] if scan.torn else []
        note = "; ".join(notes + got.notes) or None
        # The writer's own copy (an export and back: what no longer matters is dropped)
        windows = {p.name: p.budget_window for p in self.cfg.profiles.values()}
        self.writer.keep_state(policy.Fold(
            policy.State.restore(self.state.export(windows, self.now())), windows))
        self.writer.append("start", pid=os.getpid(), note=note,
                           reason="PIN from file" if secret else
                           f"locked: waiting for {d.pin_shares} custodians' shares"
                           if d.pin_shares else "locked: waiting for unlock")
        if secret is not None:
            try:
                self._login(secret)
            except SignerError as exc:
                raise SignerError(exc.code, f"{exc.message} (PIN from {d.pin_file})") from None
        self.cards.open_all()  # a missing card takes its profiles away, not the daemon

    def now(self) -> float:
        """The daemon's clock (seconds since the epoch): budgets, expiries and the times in
        the log. It follows the boot-time monotonic clock from the wall clock read at start
        (or the log's last entry's time, when the wall clock is earlier), so stepping the
        wall clock during a run neither re-opens an expired request nor ages signatures out
        of a budget window early or late. A wall clock corrected during a run shows at the
        next start."""
        return self._wall0 + (time.clock_gettime(time.CLOCK_BOOTTIME) - self._mono0)

    def stop(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + STOP_GRACE
        with self._active_cv:
            while self._active and time.monotonic() < deadline:
                self._active_cv.wait(0.1)
        if self.writer is not None:
            try:
                self.writer.append("stop", pid=os.getpid())
                self.writer.checkpoint()
            except audit.AuditError as exc:
                log.warning("at stop: %s", exc)
            self.writer.close()
        self.cards.close_all()
        if self.token is not None:
            self.token.close()

    def _login(self, secret: str) -> None:
        assert self.token is not None and self.writer is not None
        warning = self.token.login(secret)
        if warning:
            log.warning("%s", warning)
        self.check_keys()
        try:
            self.writer.checkpoint()  # vouch for what was written while locked
        except audit.AuditError as exc:
            log.warning("checkpoint after login: %s", exc)

    def unlock_target(self) -> unlocking.Target:
        """What `unlock` without --token logs in: the daemon's own token."""
        assert self.token is not None
        return unlocking.Target(self.token, self.own_lock,
                                lambda **fields: commands.unlocked(self, **fields))

    def check_keys(self) -> None:
        """Residency of every configured key; refusals are logged once per login."""
        assert self.token is not None and self.writer is not None
        d = self.cfg.daemon
        wanted: list[tuple[str | None, PKCS11URI, str]] = [
            (p.name, p.key, p.algorithm) for p in self.cfg.profiles.values() if p.token is None]
        wanted.append((None, d.audit_key, ECDSA_P256.name))
        for profile, uri, alg in wanted:
            if (uri, alg) in self.keys or (uri, alg) in self.key_problems:
                continue
            problems = self.token.residency_problems(uri, BY_NAME[alg])
            if problems:
                why = "; ".join(problems)
                self.key_problems[uri, alg] = why
                log.error("key %s refused: %s", uri, why)
                self.writer.append("residency-failure", profile=profile, key=str(uri),
                                   reason=why)
            else:
                self.keys[uri, alg] = self.token.private_key(uri)
        for p in self.cfg.profiles.values():
            if p.cert is None or p.token is not None:
                continue
            try:
                cert = certs.load_cert(p.cert)
                if not certs.matches(cert, self.token.public_key_info(p.key)):
                    raise SignerError(Exit.CONFIG, f"{p.cert}: certificate is not for the key "
                                      f"{p.key}")
                self.profile_chains[p.name] = certs.load_chain(p.chain) if p.chain else ()
                self.profile_certs[p.name] = cert
            except SignerError as exc:
                self.cert_problems[p.name] = exc.message
                log.error("profile %s: %s", p.name, exc.message)

    def _sign_checkpoint(self, digest: bytes) -> bytes | None:
        key = self.keys.get((self.cfg.daemon.audit_key, ECDSA_P256.name))
        if key is None or self.token is None or not self.token.logged_in:
            return None
        # urgent: the flush that waits for this holds back every entry queued behind it
        return self.token.sign_digest(key, ECDSA_P256, digest, urgent=True)

    # --- serving -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    def _token_lost(self, why: str) -> None:
        """The token process ended: nothing can be signed, so stop (non-zero exit: systemd
        starts the daemon again, which logs in again or waits for `unlock`)."""
        log.error("%s", why)
        self.fatal = SignerError(Exit.UNAVAILABLE, why)
        self.request_stop()

    def serve(self, sock: socket.socket) -> None:
        """Accept until asked to stop; one daemon thread per connection, within the limits
        above (a stuck connection can delay the stop by STOP_GRACE, never block it)."""
        sock.settimeout(0.1)
        threading.Thread(target=self._reaper, name="deadlines", daemon=True).start()
        while not self._stopping.is_set():
            try:
                conn, _addr = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                log.error("accept: %s", exc)
                time.sleep(0.1)
                continue
            try:
                uid = _peer_uid(conn)
            except OSError:
                conn.close()
                continue
            handed = False
            lane = uid in self._custodian_uids
            with self._active_cv:
                mine = self._per_uid.get(uid, 0)
                if lane:
                    full = mine >= CUSTODIAN_PER_UID
                else:
                    full = self._active - self._lane_active >= MAX_CONNECTIONS \
                        or mine >= MAX_PER_UID
                if not full:
                    self._active += 1
                    self._lane_active += lane
                    self._per_uid[uid] = mine + 1
                    self._deadlines[conn] = time.monotonic() + HEADER_TIMEOUT
                    # Taken and put under the lock, so a thread counted idle is one that
                    # will get this connection.
                    handed = self._idle > 0
                    if handed:
                        self._idle -= 1
                        self._handoff.put((conn, uid))
            if full:
                _busy(conn, "too many connections to the signer daemon: try again later")
            elif not handed:
                threading.Thread(target=self._connections, args=(conn, uid), name="conn",
                                 daemon=True).start()
        sock.close()
        with self._active_cv:  # the idle threads end; busy ones end when they are done
            for _ in range(self._idle):
                self._handoff.put(None)
            self._idle = 0

    def _connections(self, conn: socket.socket, uid: int) -> None:
        """Serve a connection, then wait for the next one unless IDLE_THREADS already wait
        (the threads of a burst beyond that end)."""
        while True:
            self._serve_one(conn, uid)
            with self._active_cv:
                if self._stopping.is_set() or self._idle >= IDLE_THREADS:
                    return
                self._idle += 1
            work = self._handoff.get()
            if work is None:
                return
            conn, uid = work

    def _reaper(self) -> None:
        """Enforce total deadlines: a connection past its deadline is shut down, whatever
        it is blocked in (a trickle of one byte per read timeout would otherwise last)."""
        while not self._stopping.is_set():
            time.sleep(0.5)
            now = time.monotonic()
            with self._active_cv:
                late = [c for c, t in self._deadlines.items() if t <= now]
                for c in late:
                    del self._deadlines[c]
            for c in late:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve_one(self, conn: socket.socket, uid: int) -> None:
        try:
            self._connection(conn, uid)
        finally:
            with self._active_cv:
                self._deadlines.pop(conn, None)
                self._active -= 1
                self._lane_active -= uid in self._custodian_uids
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
                self._active_cv.notify_all()

    def _connection(self, conn: socket.socket, uid: int) -> None:
        peer = None
        try:
            conn.settimeout(HEADER_TIMEOUT)
            with conn, conn.makefile("rb") as f:
                hdr = wire.read_line(f)
                with self._active_cv:
                    if conn in self._deadlines:
                        self._deadlines[conn] = time.monotonic() + REQUEST_DEADLINE
                conn.settimeout(BODY_TIMEOUT)
                peer = wire.Peer(conn, f, inline=hdr.get("inline") is True, uid=uid)
                self._handle(peer, hdr)
        except (wire.ProtocolError, OSError) as exc:
            log.debug("connection dropped: %s", exc)
        except Exception:
            log.exception("internal error")
            try:
                if peer is not None:
                    peer.reply(Exit.SOFTWARE, "internal error in the signer daemon (details "
                               "in its journal)")
            except OSError:
                pass

    def _slot(self, role: str, name: str) -> bool:
        """Take a slot for a request of `name`, waiting up to SLOT_WAIT (False: busy).
        Clients share CLIENT_SLOTS, at most PER_CLIENT each; custodians have their own
        CUSTODIAN_SLOTS."""
        deadline = time.monotonic() + SLOT_WAIT
        with self._active_cv:
            while True:
                mine = self._slots.get((role, name), 0)
                total = sum(n for (r, _n), n in self._slots.items() if r == role)
                if role == "client":
                    free = total < CLIENT_SLOTS and mine < PER_CLIENT
                else:
                    free = total < CUSTODIAN_SLOTS
                if free:
                    self._slots[role, name] = mine + 1
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return False
                self._active_cv.wait(min(left, 0.5))

    def _release(self, role: str, name: str) -> None:
        with self._active_cv:
            self._slots[role, name] -= 1
            if not self._slots[role, name]:
                del self._slots[role, name]
            self._active_cv.notify_all()

    def _handle(self, peer: wire.Peer, hdr: dict[str, Any]) -> None:
        role, name = hdr.get("role"), hdr.get("caller")
        if hdr.get("v") != wire.VERSION or role not in ("client", "custodian") \
                or not isinstance(name, str):
            peer.reply(Exit.USAGE, "protocol mismatch: gateway and daemon versions differ")
            return
        if not NAME_RE.fullmatch(name):
            # Never logged as given: an odd or over-long name must not reach the log or the
            # journal (it could make a line a reader takes for a torn write, or forge one).
            why = f"bad caller name ({len(name)} characters, not {NAME_RE.pattern})"
            log.info("deny %s: %s", role, why)
            if self.writer is not None:
                try:
                    self.writer.append("deny", reason=f"{role}: {why}")
                except audit.AuditError as exc:
                    log.error("cannot log a denial: %s", exc.message)
            peer.reply(Exit.USAGE, f"bad {role} name: want {NAME_RE.pattern}")
            return
        try:
            cmd = request.from_wire(hdr)
        except request.ParseError as exc:
            peer.reply(exc.code, str(exc))
            return
        who = Caller(role, name)
        handler = COMMANDS[hdr["cmd"]]  # from_wire has checked that it names a command
        try:
            if self._stopping.is_set():
                raise SignerError(Exit.UNAVAILABLE, "the signer daemon is stopping: try again "
                                  "in a minute")
            known = self.cfg.clients if role == "client" else self.cfg.custodians
            if name not in known:
                raise Denied(Exit.NOPERM, f"unknown {role} {name!r}: not in the signer's "
                             "configuration", f"unknown {role}")
            account = self.cfg.accounts.get(name)
            if account is not None and peer.uid != _uid(account):
                raise Denied(Exit.NOPERM, f"{role} {name!r} must connect through the account "
                             f"{account!r}", f"connected as uid {peer.uid}, not {account}")
            if not self._slot(role, name):
                raise SignerError(Exit.UNAVAILABLE, f"the signer is busy with other requests "
                                  f"of yours (at most {PER_CLIENT} at once for a client): try "
                                  "again in a moment" if role == "client" else
                                  "the signer is busy with other custodians' requests: try "
                                  "again in a moment")
            try:
                if handler.role != role:
                    raise Denied(Exit.NOPERM, f"`{handler.name}` is not a command for a {role}",
                                 "command not allowed for the role")
                handler.run(self, peer, name, cmd)
            finally:
                self._release(role, name)
        except Denied as exc:
            self._deny(who, cmd, exc.reason)
            peer.reply(exc.code, exc.message)
        except audit.AuditError as exc:
            log.error("%s", exc.message)
            peer.reply(exc.code, f"{exc.message}: nothing was signed (fail closed); "
                       "tell the operators")
        except SignerError as exc:
            self._deny(who, cmd, exc.message)
            peer.reply(exc.code, exc.message)

    def _deny(self, who: Caller, cmd: request.Command, reason: str) -> None:
        log.info("deny %s %s %s: %s", who.role, who.name, type(cmd).__name__.lower(), reason)
        if self.writer is None:
            return
        fields = {"client" if who.role == "client" else "custodian": who.name,
                  "profile": getattr(cmd, "profile", None), "request": getattr(cmd, "id", None),
                  "reason": f"{type(cmd).__name__.lower()}: {reason}"}
        try:
            self.writer.append("deny", **fields)
        except audit.AuditError as exc:
            log.error("cannot log a denial: %s", exc.message)


class Caller:
    __slots__ = ("name", "role")

    def __init__(self, role: str, name: str) -> None:
        self.role = role
        self.name = name


def bind(path: Path, group: str) -> socket.socket:
    """Listen on the Unix socket (mode 0660, group `group`). A live socket means another
    daemon: refuse. A stale one (left by a crash) is replaced."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SignerError(Exit.CONFIG, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise SignerError(Exit.UNAVAILABLE, f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SignerError(Exit.CONFIG, f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    if group:
        try:
            gid = _gid(group)
            # chown is skipped when the group is already right (a setgid socket directory, or
            # the group as the unit's Group=): a syscall filter may forbid @chown.
            if path.stat().st_gid != gid:
                os.chown(path, -1, gid)
        except (OSError, KeyError) as exc:
            sock.close()
            raise SignerError(Exit.CONFIG, f"cannot give {path} to group {group!r}: {exc}") \
                from None
    sock.listen(128)
    return sock


def _busy(conn: socket.socket, message: str) -> None:
    """Refuse a connection at once, without reading it (never blocks the accept loop)."""
    try:
        conn.setblocking(False)
        wire.reply(conn, Exit.UNAVAILABLE, message)
    except OSError:
        pass
    finally:
        conn.close()


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of the socket (the gateway), from the kernel."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _custodian_uids(cfg: Config) -> frozenset[int]:
    """The accounts of the custodians' lane: those a custodian is bound to, unless a build
    client is bound to the same account (then its connections are a client's too). A
    custodian without `account` speaks through an account the daemon cannot tell apart, and
    shares the clients' limits."""
    def uids(names: dict[str, str]) -> set[int]:
        return {u for n in names if (a := cfg.accounts.get(n)) is not None
                and (u := _uid(a)) is not None}
    return frozenset(uids(cfg.custodians) - uids(cfg.clients))


def _uid(account: str) -> int | None:
    try:
        return pwd.getpwnam(account).pw_uid
    except KeyError:
        return None


def _gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid


def run(cfg: Config, on_ready: Callable[[], None] | None = None) -> None:
    """`signer serve`: start, serve until SIGTERM/SIGINT, stop cleanly."""
    service.prepare_process()
    daemon = Daemon(cfg)

    def on_signal(_signum: int, _frame: object) -> None:
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
        sock = bind(cfg.daemon.socket, cfg.daemon.socket_group)
    except SignerError:
        daemon.stop()
        raise
    log.info("listening on %s (%s)", cfg.daemon.socket,
             "unlocked" if daemon.token and daemon.token.logged_in else "locked")
    service.notify_ready()
    if on_ready is not None:
        on_ready()
    try:
        daemon.serve(sock)
    finally:
        try:
            cfg.daemon.socket.unlink()
        except OSError:
            pass
        daemon.stop()
    if daemon.fatal is not None:
        raise daemon.fatal
