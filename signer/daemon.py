"""signerd: the only process that touches the token.

One thread accepts on the Unix socket and hands each connection to a thread of its own (an idle
one from an earlier connection when there is one: starting a thread costs the accept loop a
hand-shake with the new thread, most of a millisecond on a busy machine, on every request's
path; a hand-off is a queue put); each request is checked by
`policy`, streamed and hashed, signed through the one token session, written to the audit log and
only then answered. The audit writer batches concurrent entries into one fsync (group commit).

Locks, from outer to inner: `_lock` (policy state: freezes, budgets, requests; held while a
state-changing entry is written, so the log's order is the order decisions were made in), then
the audit writer's queue. The token has its own session lock (python-pkcs11). A signature is
produced outside `_lock`: a budget slot is reserved under it first (`_inflight`), so a burst of
concurrent requests can never overrun the budget.
"""

from __future__ import annotations

import base64
import ctypes
import grp
import hashlib
import json
import logging
import os
import pwd
import queue
import resource
import secrets
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

from signer import approval, audit, certs, pin, policy, request, segments, wire
from signer.algorithms import BY_NAME, ECDSA_P256
from signer.config import NAME_RE, Config, Profile
from signer.errors import Exit, SignerError
from signer.formats import REGISTRY, FormatError, Job
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
_M_ARENA_MAX = -8


class Daemon:
    def __init__(self, cfg: Config, full_replay: bool = False) -> None:
        self.cfg = cfg
        # Start-up from the last state checkpoint, unless asked to replay the whole log
        # (the bench's "before"; the result is the same state, built the slow way).
        self.full_replay = full_replay
        self.scan_seconds = 0.0
        self.state = policy.State()
        self._lock = threading.Lock()
        self._unlock_lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._fetching: set[str] = set()
        # (key URI, algorithm) -> private key handle, for resident keys only; or why refused
        self._keys: dict[tuple[PKCS11URI, str], Any] = {}
        self._key_problems: dict[tuple[PKCS11URI, str], str] = {}
        self._certs: dict[str, x509.Certificate] = {}  # profile -> certificate (cms, ...)
        self._chains: dict[str, tuple[x509.Certificate, ...]] = {}  # profile -> its CA chain
        self._cert_problems: dict[str, str] = {}
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
        self.fatal: SignerError | None = None  # why serve() ended on its own
        self.writer: audit.Writer | None = None
        self._wall0 = time.time()  # `now`: set again at start (_start_clock)
        self._mono0 = time.clock_gettime(time.CLOCK_BOOTTIME)

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        d = self.cfg.daemon
        self._custodian_uids = _custodian_uids(self.cfg)
        secret = pin.read_file(d.pin_file) if d.pin_file is not None else None
        # The token in a process of its own (signer/tokenproc.py: the GIL and the token)
        self.token = TokenProcess(d.token_module, d.token_label, d.token_serial,
                                  on_lost=self._token_lost)
        d.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (d.state_dir / "signatures").mkdir(mode=0o700, exist_ok=True)
        spki, source = self._audit_public_key()
        if spki is None and any(seg.path.stat().st_size
                                for seg in segments.of_log(d.audit_log)):
            raise SignerError(Exit.IOERR, f"cannot check the checkpoints of {d.audit_log}: "
                              f"{source}; refusing to rebuild state from a log that nothing "
                              "vouches for")
        snapshots = d.state_dir / "checkpoints"

        def restore(data: bytes) -> None:
            try:
                self.state = policy.State.restore(data)
            except (ValueError, KeyError, TypeError) as exc:
                raise audit.ChainError(-1, f"unreadable state snapshot: {exc}") from None

        def believe(entry: dict[str, Any], vouched: bool) -> None:
            # what a checkpoint says its daemon took on unverified: what it believed then
            if vouched or entry["event"] in policy.TIGHTENING:
                self.state.apply(entry)

        started = time.monotonic()
        try:
            scan = audit.scan(d.audit_log, believe, spki,
                              None if self.full_replay else snapshots, restore)
            orphan = None if self.full_replay else audit.check_snapshots(snapshots, scan)
        except audit.ChainError as exc:
            raise SignerError(Exit.IOERR, f"audit log {d.audit_log} is broken at {exc.where}: "
                              f"{exc.reason}. Keep it for the investigation (`signer audit "
                              "verify`), move it aside with the state directory's "
                              "checkpoints/ and start again") from None
        except OSError as exc:
            raise SignerError(Exit.IOERR, f"cannot read audit log {d.audit_log}: "
                              f"{exc.strerror}") from None
        self.scan_seconds = time.monotonic() - started
        log.info("audit log: %s; %d entries read in %.3f s",
                 f"started from the state of checkpoint seq {scan.state_seq}"
                 if scan.state_seq is not None else "replayed from the start",
                 scan.replayed, self.scan_seconds)
        clock_note = self._start_clock(scan)
        unvouched, tail_notes = self._judge_tail(scan)
        self.writer = audit.Writer(d.audit_log, scan, d.checkpoint_interval,
                                   self._sign_checkpoint, snapshots, d.segment_bytes,
                                   d.segment_entries, unverified=unvouched, clock=self.now)
        self.writer.open()
        notes = [self._keep_torn(scan)] if scan.torn else []
        notes += [n for n in (orphan, clock_note) if n] + tail_notes
        notes += self._recheck_approvals()
        note = "; ".join(notes) or None
        # The writer's own copy (an export and back: what no longer matters is dropped)
        windows = {p.name: p.budget_window for p in self.cfg.profiles.values()}
        self.writer.keep_state(policy.Fold(
            policy.State.restore(self.state.export(windows, self.now())), windows))
        self.writer.append("start", pid=os.getpid(), note=note,
                           reason="PIN from file" if secret else "locked: waiting for unlock")
        if secret is not None:
            try:
                self._login(secret)
            except SignerError as exc:
                raise SignerError(exc.code, f"{exc.message} (PIN from {d.pin_file})") from None

    def now(self) -> float:
        """The daemon's clock (seconds since the epoch): budgets, expiries and the times in
        the log. It follows the boot-time monotonic clock from the wall clock read at start
        (or the log's last entry's time, when the wall clock is earlier), so stepping the
        wall clock during a run neither re-opens an expired request nor ages signatures out
        of a budget window early or late. A wall clock corrected during a run shows at the
        next start."""
        return self._wall0 + (time.clock_gettime(time.CLOCK_BOOTTIME) - self._mono0)

    def _start_clock(self, scan: audit.Scan) -> str | None:
        """Anchor `now` at start: never before the last entry's time, whatever the wall
        clock says (an expired request stays expired, a spent budget spent)."""
        wall = time.time()
        self._mono0 = time.clock_gettime(time.CLOCK_BOOTTIME)
        self._wall0 = wall
        last = audit.parse_time(scan.last_time) if scan.last_time else None
        if last is None or wall >= last:
            return None
        self._wall0 = last
        note = (f"the wall clock ({audit.format_time(wall)}) is earlier than the log's last "
                f"entry ({scan.last_time}): the daemon's clock starts at that entry's time")
        log.warning("%s", note)
        return note

    def _audit_public_key(self) -> tuple[bytes | None, str]:
        """The audit key's public half that checkpoints are checked with at start: from the
        token (a public session: a locked daemon can read it), else the configured audit
        certificate. (None, why) when neither is there."""
        assert self.token is not None
        d = self.cfg.daemon
        try:
            info = self.token.public_key_info_unlocked(d.audit_key)
        except SignerError:
            info = None
        if info is not None:
            return bytes(info.dump()), "token"
        if d.audit_cert is not None and d.audit_cert.exists():
            try:
                return certs.load_public_key(d.audit_cert), str(d.audit_cert)
            except SignerError as exc:
                return None, exc.message
        return None, (f"the audit key {d.audit_key} has no public key on the token and no "
                      "audit_cert is installed")

    def _judge_tail(self, scan: audit.Scan) -> tuple[tuple[int, int] | None, list[str]]:
        """The entries after the last checkpoint: nothing signed by the token vouches for
        them (anyone who can write the file could have written them with a recomputed
        chain, or rewritten the tail after an earlier checkpoint and dropped the later ones).

        The daemon starts on such a tail only when the checkpoint policy can have left it (no
        longer than the `interval` recorded in the last checkpoint) and nothing in it would
        make the signer more permissive (policy.UNVOUCHED_OK: no thaw, approval, queued
        request, adoption): then it believes only what makes the signer stricter, and its
        next checkpoint records the range as adopted unverified (`unverified`), so that
        `audit verify` fails on it and a later replay believes no more of it. Any other tail
        stops the daemon with the range named, for an operator to review and adopt (`signer
        audit adopt`) or to restore the log. Returns (the range, notes for the start entry)."""
        if not scan.tail:
            return None, []
        d = self.cfg.daemon
        first, last = scan.tail[0]["seq"], scan.tail[-1]["seq"]
        after = "the start of the log" if scan.verified is None else \
            f"the last checkpoint (seq {scan.verified})"
        recorded = (scan.checkpoint or {}).get("interval")
        interval = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) \
            and recorded > 0 else d.checkpoint_interval
        permissive = [f"{e['event']} seq {e['seq']}" for e in scan.tail
                      if e["event"] not in policy.UNVOUCHED_OK]
        why = None
        if len(scan.tail) > interval:
            why = (f"they are {len(scan.tail)} entries, more than the checkpoint interval in "
                   f"force ({interval}) leaves without a checkpoint")
        elif permissive:
            more = " ..." if len(permissive) > 10 else ""
            why = ("they would make the signer more permissive: "
                   f"{', '.join(permissive[:10])}{more}")
        if why is not None:
            raise SignerError(Exit.IOERR, f"audit log {d.audit_log}: seq {first}..{last} after "
                              f"{after} are vouched for by no checkpoint, and {why}. The "
                              "daemon does not start on them: review them (`signer audit show "
                              "--last N`), then adopt them (`signer audit adopt --config FILE "
                              f"--seqs {first}-{last} --operator NAME`) or restore the log")
        for entry in scan.tail:
            if entry["event"] in policy.TIGHTENING:
                self.state.apply(entry)
        note = (f"adopted seq {first}..{last} after {after} unverified: vouched for by no "
                "checkpoint, only what makes the signer stricter is believed (review, then "
                "`signer audit adopt`)")
        log.warning("audit log: %s", note)
        return (first, last), [note]

    def _recheck_approvals(self) -> list[str]:
        """An approval counts after a restart only if its SSH signature, kept in the log,
        still verifies for that request with the custodian's configured key."""
        dropped = []
        for req in self.state.requests.values():
            if req.signed:
                continue
            for custodian, sig in list(req.approvals.items()):
                key = self.cfg.custodians.get(custodian)
                if sig is None or key is None or not approval.verify(
                        req.statement(), sig.encode("ascii"), custodian, key,
                        self.cfg.daemon.state_dir):
                    del req.approvals[custodian]
                    dropped.append(f"{custodian} on {req.id}")
        if not dropped:
            return []
        log.warning("approvals that do not verify (not counted): %s", ", ".join(dropped))
        return [f"approvals not counted (their signature does not verify with the configured "
                f"key): {', '.join(dropped[:20])}{' ...' if len(dropped) > 20 else ''}"]

    def _keep_torn(self, scan: audit.Scan) -> str:
        """Keep the incomplete last line that start-up cuts (a crash in the middle of a write)
        for the investigation, and say exactly what was cut: offset, length, digest, where."""
        digest = hashlib.sha256(scan.torn).hexdigest()
        kept = self.cfg.daemon.state_dir / f"torn-{scan.end}-{digest[:16]}.bin"
        try:
            fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(scan.torn)
                fh.flush()
                os.fsync(fh.fileno())
            where = f"kept in {kept}"
        except OSError as exc:
            where = f"not kept: {exc.strerror}"
        note = (f"cut a torn last entry: {len(scan.torn)} bytes at offset {scan.end}, "
                f"sha256 {digest}, {where}")
        log.warning("audit log: %s", note)
        return note

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
        if self.token is not None:
            self.token.close()

    def _login(self, secret: str) -> None:
        assert self.token is not None and self.writer is not None
        self.token.login(secret)
        self._check_keys()
        try:
            self.writer.checkpoint()  # vouch for what was written while locked
        except audit.AuditError as exc:
            log.warning("checkpoint after login: %s", exc)

    def _check_keys(self) -> None:
        """Residency of every configured key; refusals are logged once per login."""
        assert self.token is not None and self.writer is not None
        d = self.cfg.daemon
        wanted: list[tuple[str | None, PKCS11URI, str]] = [
            (p.name, p.key, p.algorithm) for p in self.cfg.profiles.values()]
        wanted.append((None, d.audit_key, ECDSA_P256.name))
        for profile, uri, alg in wanted:
            if (uri, alg) in self._keys or (uri, alg) in self._key_problems:
                continue
            problems = self.token.residency_problems(uri, BY_NAME[alg])
            if problems:
                why = "; ".join(problems)
                self._key_problems[uri, alg] = why
                log.error("key %s refused: %s", uri, why)
                self.writer.append("residency-failure", profile=profile, key=str(uri),
                                   reason=why)
            else:
                self._keys[uri, alg] = self.token.private_key(uri)
        for p in self.cfg.profiles.values():
            if p.cert is None:
                continue
            try:
                cert = certs.load_cert(p.cert)
                if not certs.matches(cert, self.token.public_key_info(p.key)):
                    raise SignerError(Exit.CONFIG, f"{p.cert}: certificate is not for the key "
                                      f"{p.key}")
                self._chains[p.name] = certs.load_chain(p.chain) if p.chain else ()
                self._certs[p.name] = cert
            except SignerError as exc:
                self._cert_problems[p.name] = exc.message
                log.error("profile %s: %s", p.name, exc.message)

    def _sign_checkpoint(self, digest: bytes) -> bytes | None:
        key = self._keys.get((self.cfg.daemon.audit_key, ECDSA_P256.name))
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
                self._dispatch(peer, who, cmd)
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

    def _dispatch(self, peer: wire.Peer, who: Caller,
                  cmd: request.Command) -> None:
        custodian_only = (request.Requests, request.Approve, request.Reject, request.Unlock,
                          request.Freeze, request.Thaw)
        if isinstance(cmd, custodian_only) != (who.role == "custodian"):
            raise Denied(Exit.NOPERM, f"`{type(cmd).__name__.lower()}` is not a command for "
                         f"a {who.role}", "command not allowed for the role")
        if isinstance(cmd, request.Sign):
            self._sign(peer, who.name, cmd)
        elif isinstance(cmd, request.Status):
            with self._lock:
                req = policy.own_request(self.state, who.name, cmd.id)
                line = json.dumps(req.public(self.cfg.profiles.get(req.profile), self.now()))
            peer.reply(Exit.OK, "", line.encode() + b"\n")
        elif isinstance(cmd, request.Fetch):
            self._fetch(peer, who.name, cmd.id)
        elif isinstance(cmd, request.Requests):
            self._requests(peer, who.name)
        elif isinstance(cmd, request.Cancel):
            self._cancel(peer, who.name, cmd.id)
        elif isinstance(cmd, request.Approve):
            self._approve(peer, who.name, cmd.id)
        elif isinstance(cmd, request.Reject):
            self._reject(peer, who.name, cmd.id)
        elif isinstance(cmd, request.Unlock):
            self._unlock(peer, who.name)
        elif isinstance(cmd, request.Freeze):
            self._freeze(peer, who.name, cmd.profile)
        else:
            self._thaw(peer, who.name, cmd.profile)

    # --- signing -----------------------------------------------------------------------------

    def _ready(self, profile: Profile, fmt: str) -> None:
        if self.token is None or not self.token.logged_in:
            raise SignerError(Exit.UNAVAILABLE, "the signer is locked: a custodian must run "
                              "`unlock`")
        assert self.writer is not None
        if self.writer.broken:
            raise audit.AuditError(self.writer.broken)
        audit_key = (self.cfg.daemon.audit_key, ECDSA_P256.name)
        if audit_key not in self._keys:
            # Without the audit key no checkpoint can vouch for what is signed: fail closed,
            # exactly as when the log cannot be written.
            why = self._key_problems.get(audit_key)
            if why is None:
                raise SignerError(Exit.UNAVAILABLE, "the signer is being unlocked: try again "
                                  "in a moment")
            raise audit.AuditError(f"the audit key {self.cfg.daemon.audit_key} is not "
                                   f"resident on the token ({why})")
        if (profile.key, profile.algorithm) not in self._keys:
            why = self._key_problems.get((profile.key, profile.algorithm))
            if why is None:  # unlocked a moment ago, residency not checked yet
                raise SignerError(Exit.UNAVAILABLE, "the signer is being unlocked: try again "
                                  "in a moment")
            raise Denied(Exit.NOPERM, f"the key of profile {profile.name!r} is not resident on "
                         f"the token ({why}): refusing to sign", "key not resident")
        if REGISTRY[fmt].needs_cert and profile.name not in self._certs:
            raise SignerError(Exit.CONFIG, self._cert_problems.get(
                profile.name, f"profile {profile.name!r} has no certificate"))

    def _sign(self, peer: wire.Peer, client: str, cmd: request.Sign) -> None:
        with self._lock:
            profile = policy.check_sign(self.cfg, self.state, client, cmd.profile, cmd.format,
                                        cmd.timestamped)
        self._ready(profile, cmd.format)
        fmt = REGISTRY[cmd.format]
        peer.go_ahead()
        h = hashlib.sha256()
        size = 0
        # A format that keeps its body (authenticode: a small request, never the binary) has
        # its own limit; the others stream any size up to the profile's, holding nothing.
        limit = min(fmt.keep, profile.max_size) if fmt.keep else profile.max_size
        kept = bytearray()
        try:
            for chunk in peer.body(limit):
                h.update(chunk)
                size += len(chunk)
                if fmt.keep:
                    kept += chunk
        except wire.BodyTooLarge:
            if fmt.keep and limit < profile.max_size:
                raise Denied(Exit.DATA, f"{fmt.name} request larger than {limit} bytes: send "
                             "what `osslsigncode extract-data` writes, not the file",
                             f"{fmt.name} request too large") from None
            policy.check_size(profile, profile.max_size + 1)
        policy.check_size(profile, size)
        if size != cmd.size:
            raise Denied(Exit.DATA, f"the artifact is {size} bytes, declared {cmd.size}: not "
                         "signed", "artifact size differs from the declared size")
        body = bytes(kept)
        try:
            extra = dict(fmt.check(body)) if fmt.keep else {}
        except FormatError as exc:
            raise Denied(Exit.DATA, f"{fmt.name}: {exc}: not signed",
                         f"malformed {fmt.name} request: {exc}") from None
        if profile.approvals:
            self._queue(peer, client, profile, cmd, h.hexdigest(), size, body, extra)
            return
        out = self._produce(profile, cmd.format, h.digest(), size, client, cmd.name, None,
                            body, extra)
        peer.reply(Exit.OK, "", out)

    def _produce(self, profile: Profile, fmt: str, digest: bytes, size: int, client: str,
                 name: str, rid: str | None, body: bytes, extra: dict[str, str]) -> bytes:
        """Reserve a budget slot, sign, log (fsynced), and only then return the signature."""
        assert self.token is not None and self.writer is not None
        p = profile.name
        with self._lock:
            policy.check_not_frozen(self.state, profile)
            if self.state.used(profile, self.now()) + self._inflight.get(p, 0) \
                    >= profile.budget_count:
                why = (f"budget of {profile.budget_count} signatures per "
                       f"{profile.budget_window} s exhausted")
                self._state_event("budget-exceeded", profile=p, client=client, reason=why)
                raise Denied(Exit.NOPERM, f"{why}: profile {p!r} is now frozen; a custodian "
                             f"must run `thaw {p}`", "budget exceeded")
            self._inflight[p] = self._inflight.get(p, 0) + 1
        reserved = True
        try:
            key = self._keys[profile.key, profile.algorithm]
            alg = BY_NAME[profile.algorithm]

            def sign_digest(d: bytes) -> bytes:
                assert self.token is not None
                return self.token.sign_digest(key, alg, d)

            out = REGISTRY[fmt].sign(Job(digest=digest, body=body, cert=self._certs.get(p),
                                         chain=self._chains.get(p, ()), alg=alg,
                                         sign_digest=sign_digest))
            entry = self.writer.append(
                "sign", client=client, profile=p, key=str(profile.key), name=name, format=fmt,
                sha256=digest.hex(), size=size, sig_sha256=hashlib.sha256(out).hexdigest(),
                request=rid, **extra)
            with self._lock:  # the slot becomes a logged signature in one step
                self.state.apply(entry)
                self._inflight[p] -= 1
                reserved = False
        finally:
            if reserved:
                with self._lock:
                    self._inflight[p] -= 1
        return out

    def _state_event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write a state-changing entry and apply it, in log order. Caller holds _lock."""
        assert self.writer is not None
        entry = self.writer.append(event, **fields)
        self.state.apply(entry)
        return entry

    def _queue(self, peer: wire.Peer, client: str, profile: Profile, cmd: request.Sign,
               sha256: str, size: int, body: bytes, extra: dict[str, str]) -> None:
        rid = secrets.token_hex(16)
        with self._lock:
            now = self.now()
            waiting = sum(1 for r in self.state.requests.values()
                          if r.client == client and r.profile == profile.name and r.open(now))
            if waiting >= profile.max_queued:
                raise Denied(Exit.NOPERM, f"{waiting} requests of yours already wait for "
                             f"approval on profile {profile.name!r} (at most "
                             f"{profile.max_queued}): fetch or wait for them first",
                             "too many queued requests")
            # A kept body (an authenticode request, a few hundred bytes) goes into the log with
            # the queue entry: the checkpoint vouches for what will be signed at `fetch`.
            kept = base64.b64encode(body).decode("ascii") if body else None
            self._state_event("queue", request=rid, client=client, profile=profile.name,
                              expires=audit.format_time(now + profile.request_ttl),
                              name=cmd.name, format=cmd.format, sha256=sha256, size=size,
                              body=kept, **extra)
        who = ", ".join(sorted(profile.custodians))
        peer.reply(Exit.QUEUED, f"queued {rid}: needs {profile.approvals} approval(s) "
                   f"from {who}; poll with `status {rid}`, then `fetch {rid}`")

    def _signature_path(self, rid: str) -> Path:
        return self.cfg.daemon.state_dir / "signatures" / rid

    def _fetch(self, peer: wire.Peer, client: str, rid: str) -> None:
        with self._lock:
            req = policy.own_request(self.state, client, rid)
            profile = policy.profile_for(self.cfg, req.profile)
            if rid in self._fetching:  # signed by another fetch right now: not stored yet
                peer.reply(Exit.QUEUED, f"request {rid} is being signed: fetch it again in a "
                           "moment")
                return
            if req.signed:
                signed = True
            else:
                signed = False
                _check_open(req, self.now())
                counted = req.counted(profile)
                if len(counted) < profile.approvals:
                    have = ", ".join(sorted(counted)) or "none yet"
                    peer.reply(Exit.QUEUED, f"request {rid} waits for approvals: "
                               f"{len(counted)} of {profile.approvals} ({have})")
                    return
                # A required timestamp was checked when the request was queued.
                policy.check_sign(self.cfg, self.state, client, req.profile, req.format,
                                  timestamped=True)
                self._fetching.add(rid)
        if signed:
            try:
                out = self._signature_path(rid).read_bytes()
            except OSError:
                raise SignerError(Exit.SOFTWARE, f"request {rid} was signed but the signature "
                                  "is no longer stored: submit the artifact again") from None
            peer.reply(Exit.OK, "", out)
            return
        try:
            self._ready(profile, req.format)
            body = base64.b64decode(req.body) if req.body is not None else b""
            if hashlib.sha256(body).hexdigest() != req.sha256 and REGISTRY[req.format].keep:
                raise SignerError(Exit.SOFTWARE, f"request {rid}: the kept request does not "
                                  "match its logged digest: submit it again")
            out = self._produce(profile, req.format, bytes.fromhex(req.sha256), req.size,
                                client, req.name, rid, body, req.extra)
            self._store(rid, out)  # before another fetch may look for it
        finally:
            with self._lock:
                self._fetching.discard(rid)
        peer.reply(Exit.OK, "", out)

    def _store(self, rid: str, out: bytes) -> None:
        """Keep a released approval signature so that a lost connection can fetch it again.
        The audit entry is already written; failing to keep a copy does not withhold it."""
        path = self._signature_path(rid)
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(out)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        except OSError as exc:
            log.error("cannot store the signature of request %s: %s", rid, exc)

    # --- custodians --------------------------------------------------------------------------

    def _requests(self, peer: wire.Peer, custodian: str) -> None:
        lines = []
        now = self.now()
        with self._lock:
            for req in self.state.requests.values():
                profile = self.cfg.profiles.get(req.profile)
                if profile is None or custodian not in profile.custodians:
                    continue
                if not req.open(now) and not (req.rejected_by and not req.expired(now)):
                    continue  # signed, cancelled or expired; a rejection shows until expiry
                item = req.public(profile, now)
                item["statement"] = req.statement().decode("ascii")
                lines.append(json.dumps(item, ensure_ascii=True) + "\n")
        peer.reply(Exit.OK, "", "".join(lines).encode("ascii"))

    def _approve(self, peer: wire.Peer, custodian: str, rid: str) -> None:
        with self._lock:
            req = self.state.requests.get(rid)
            if req is None or req.signed:
                raise Denied(Exit.USAGE, f"no pending request {rid}", "unknown request")
            _check_open(req, self.now())
            profile = policy.profile_for(self.cfg, req.profile)
        if custodian not in profile.custodians:
            raise Denied(Exit.NOPERM, f"custodian {custodian!r} may not approve requests for "
                         f"profile {profile.name!r}", "not a custodian of the profile")
        peer.go_ahead()
        try:
            sig = peer.read_body(approval.MAX_SIGNATURE)
        except wire.BodyTooLarge:
            raise Denied(Exit.DATA, "approval signature too large", "approval too large") \
                from None
        if not sig.isascii() or not approval.verify(
                req.statement(), sig, custodian, self.cfg.custodians[custodian],
                self.cfg.daemon.state_dir):
            raise Denied(Exit.DATA, f"the approval signature does not verify for request {rid} "
                         f"and custodian {custodian!r}: sign that request's statement (from "
                         f"`requests`) with `ssh-keygen -Y sign -n {approval.NAMESPACE}`",
                         "bad approval signature")
        with self._lock:
            # cancelled, rejected or expired while the signature came in
            _check_open(req, self.now())
            if custodian in req.approvals:
                n = len(req.counted(profile))
                peer.reply(Exit.OK, f"{custodian} already approved request {rid} (counts "
                           f"once): {n} of {profile.approvals}")
                return
            # The signature goes into the log: a restart counts the approval again only if
            # it still verifies, so an approve entry nobody signed counts for nothing.
            self._state_event("approve", request=rid, custodian=custodian, profile=req.profile,
                              client=req.client, sha256=req.sha256,
                              approval=sig.decode("ascii"))
            n = len(req.counted(profile))
        peer.reply(Exit.OK, f"approved request {rid}: {n} of {profile.approvals}")

    def _cancel(self, peer: wire.Peer, client: str, rid: str) -> None:
        with self._lock:
            req = policy.own_request(self.state, client, rid)
            _check_open(req, self.now())
            self._state_event("cancel", request=rid, client=client, profile=req.profile)
        peer.reply(Exit.OK, f"request {rid} cancelled")

    def _reject(self, peer: wire.Peer, custodian: str, rid: str) -> None:
        """One custodian of the profile is enough to stop a request (recorded, and shown in
        `requests` until the request would have expired)."""
        with self._lock:
            req = self.state.requests.get(rid)
            profile = self.cfg.profiles.get(req.profile) if req is not None else None
            if req is None or profile is None or custodian not in profile.custodians:
                raise Denied(Exit.USAGE, f"no pending request {rid}", "unknown request")
            _check_open(req, self.now())
            self._state_event("reject", request=rid, custodian=custodian, profile=req.profile,
                              client=req.client, sha256=req.sha256)
        peer.reply(Exit.OK, f"request {rid} rejected")

    def _unlock(self, peer: wire.Peer, custodian: str) -> None:
        assert self.token is not None and self.writer is not None
        if self.token.logged_in:
            peer.reply(Exit.OK, "already unlocked")
            return
        peer.go_ahead()
        try:
            secret = pin.check(peer.read_body(pin.MAX_PIN + 1), "PIN on stdin")
        except wire.BodyTooLarge:
            raise Denied(Exit.DATA, "PIN too long", "PIN too long") from None
        with self._unlock_lock:
            if not self.token.logged_in:
                try:
                    self.token.login(secret)
                except SignerError as exc:
                    if exc.code == Exit.NOPERM:
                        raise Denied(exc.code, exc.message, "unlock refused by the token") \
                            from None
                    raise
                self.writer.append("unlock", custodian=custodian)
                self._check_keys()
                try:
                    self.writer.checkpoint()
                except audit.AuditError as exc:
                    log.warning("checkpoint after unlock: %s", exc)
        peer.reply(Exit.OK, "unlocked")

    def _freeze(self, peer: wire.Peer, custodian: str, name: str) -> None:
        with self._lock:
            profile = policy.profile_for(self.cfg, name)
            if profile.name not in self.state.frozen:
                self._state_event("freeze", profile=name, custodian=custodian,
                                  reason=f"frozen by custodian {custodian}")
        peer.reply(Exit.OK, f"profile {name!r} is frozen")

    def _thaw(self, peer: wire.Peer, custodian: str, name: str) -> None:
        with self._lock:
            profile = policy.profile_for(self.cfg, name)
            policy.check_custodian_of(profile, custodian)
            if profile.name not in self.state.frozen:
                peer.reply(Exit.OK, f"profile {name!r} is not frozen")
                return
            self._state_event("thaw", profile=name, custodian=custodian)
        peer.reply(Exit.OK, f"profile {name!r} thawed; its budget window starts now")


def _check_open(req: policy.Request, now: float) -> None:
    """A request that can still be approved and signed, or the reason it cannot."""
    if req.open(now):
        return
    why = ("it was signed" if req.signed else "its client cancelled it" if req.cancelled
           else f"custodian {req.rejected_by} rejected it" if req.rejected_by
           else f"it expired at {req.expires}")
    raise Denied(Exit.NOPERM, f"request {req.id} is closed: {why}; submit the artifact again",
                 f"request closed ({why})")


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


class EscapingFormatter(logging.Formatter):
    """Journal lines escaped as the audit log escapes its entries: a caller-provided string
    (a name, a reason that quotes one) cannot start a new line or hide text in the journal.
    A traceback keeps its lines, each one escaped."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escape(record.getMessage())
        text = self.formatMessage(record)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + "\n".join(_escape(x) for x in record.exc_text.splitlines())
        return text


def _escape(text: str) -> str:
    """JSON string escaping without the quotes: controls and non-ASCII as \\uXXXX."""
    return json.dumps(text, ensure_ascii=True)[1:-1]


def notify_ready() -> None:
    """sd_notify(READY=1) when run by systemd with Type=notify (no-op otherwise)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(b"READY=1")
        except OSError as exc:
            log.warning("sd_notify: %s", exc)


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena (up to 8 per CPU); with a pool of
    workers that is tens of MiB of resident memory for nothing. Two arenas are plenty: the hot
    path spends its time in syscalls and the token, not in malloc."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def run(cfg: Config, on_ready: Callable[[], None] | None = None) -> None:
    """`signer serve`: start, serve until SIGTERM/SIGINT, stop cleanly."""
    for missed in pin.harden_process():
        log.warning("core dump protection: %s", missed)
    if resource.getrlimit(resource.RLIMIT_CORE)[1] != 0:
        log.warning("core dumps are possible (set LimitCORE=0 in the unit)")
    _few_malloc_arenas()
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
    notify_ready()
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
