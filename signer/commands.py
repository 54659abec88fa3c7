"""The daemon's commands: one handler each, in a table by name (as `signer.formats` is for
signature formats); the server looks a command up once and never branches on its name.

A handler gets the daemon, the connection (`wire.Peer`), the caller's name and the parsed
command, and answers on the connection; the server has already checked that the caller is who
the account says, holds a slot for the request, and turns `Denied`, `SignerError` and
`audit.AuditError` into the answer and a `deny` entry. `Handler.role` is the one role that may
send the command.

Locks, from outer to inner: `Daemon.lock` (policy state: freezes, budgets, requests; held
while a state-changing entry is written, so the log's order is the order decisions were made
in), then the audit writer's queue. The token has its own order (signer/tokenproc.py). A
signature is produced outside `Daemon.lock`: a budget slot is reserved under it first
(`Daemon.inflight`), so a burst of concurrent requests can never overrun the budget; the
signature is written to the audit log (fsynced) before it is released.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from signer import approval, audit, pin, policy, request, shares, unlocking, wire
from signer.algorithms import BY_NAME, ECDSA_P256
from signer.config import Profile
from signer.errors import Exit, SignerError
from signer.formats import REGISTRY, Context, FormatError, Job
from signer.formats.base import Digester
from signer.policy import Denied

if TYPE_CHECKING:
    from signer.daemon import Daemon

log = logging.getLogger("signerd")


@dataclass(frozen=True)
class Handler:
    name: str  # the command's name on the wire (`request.to_wire`)
    role: str  # the one role that may send it: "client" or "custodian"
    # (daemon, connection, caller's name, the parsed command of that name)
    run: Callable[[Daemon, wire.Peer, str, Any], None]


def _ready(d: Daemon, profile: Profile, fmt: str) -> None:
    if d.token is None or not d.token.logged_in:
        raise SignerError(Exit.UNAVAILABLE, d.own_lock.missing(time.monotonic()))
    assert d.writer is not None
    if d.writer.broken:
        raise audit.AuditError(d.writer.broken)
    audit_key = (d.cfg.daemon.audit_key, ECDSA_P256.name)
    if audit_key not in d.keys:
        # Without the audit key no checkpoint can vouch for what is signed: fail closed,
        # exactly as when the log cannot be written.
        why = d.key_problems.get(audit_key)
        if why is None:
            raise SignerError(Exit.UNAVAILABLE, "the signer is being unlocked: try again "
                              "in a moment")
        raise audit.AuditError(f"the audit key {d.cfg.daemon.audit_key} is not "
                               f"resident on the token ({why})")
    if profile.token is not None:
        d.cards.ready(profile)  # UNAVAILABLE while the card is out (signer/cards.py)
    if (profile.key, profile.algorithm) not in d.keys:
        why = d.key_problems.get((profile.key, profile.algorithm))
        if why is None:  # unlocked a moment ago, residency not checked yet
            raise SignerError(Exit.UNAVAILABLE, "the signer is being unlocked: try again "
                              "in a moment")
        raise Denied(Exit.NOPERM, f"the key of profile {profile.name!r} is not resident on "
                     f"the token ({why}): refusing to sign", "key not resident")
    if REGISTRY[fmt].needs_cert and profile.name not in d.profile_certs:
        raise SignerError(Exit.CONFIG, d.cert_problems.get(
            profile.name, f"profile {profile.name!r} has no certificate"))


def sign(d: Daemon, peer: wire.Peer, client: str, cmd: request.Sign) -> None:
    with d.lock:
        profile = policy.check_sign(d.cfg, d.state, client, cmd.profile, cmd.format,
                                    cmd.timestamped)
    _ready(d, profile, cmd.format)
    fmt = REGISTRY[cmd.format]
    stream = _stream(d, profile, fmt.stream)  # before the body: what it fixes is fixed now
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
            if stream is not None:
                stream.update(chunk)
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
        if stream is not None:
            extra.update(stream.fields())
    except FormatError as exc:
        raise Denied(Exit.DATA, f"{fmt.name}: {exc}: not signed",
                     f"malformed {fmt.name} request: {exc}") from None
    if profile.approvals:
        _queue(d, peer, client, profile, cmd, h.hexdigest(), size, body, extra)
        return
    out = _produce(d, profile, cmd.format, h.digest(), size, client, cmd.name, None, body,
                   extra)
    peer.reply(Exit.OK, "", out)


def _stream(d: Daemon, profile: Profile, make: Callable[[Context], Digester] | None
            ) -> Digester | None:
    """The format's own hasher of the body (openpgp), with what it fixes before the body
    arrives: the profile key's public half (from the token), its time."""
    if make is None:
        return None
    assert d.token is not None
    try:
        return make(Context(public_key=d.token.public_key_info(profile.key).dump(),
                            alg=BY_NAME[profile.algorithm],
                            key_created=profile.openpgp_created, now=int(d.now())))
    except FormatError as exc:
        raise SignerError(Exit.CONFIG, f"profile {profile.name!r}: {exc}") from None


def _produce(d: Daemon, profile: Profile, fmt: str, digest: bytes, size: int, client: str,
             name: str, rid: str | None, body: bytes, extra: dict[str, str]) -> bytes:
    """Reserve a budget slot, sign, log (fsynced), and only then return the signature."""
    assert d.token is not None and d.writer is not None
    p = profile.name
    with d.lock:
        policy.check_not_frozen(d.state, profile)
        if d.state.used(profile, d.now()) + d.inflight.get(p, 0) \
                >= profile.budget_count:
            why = (f"budget of {profile.budget_count} signatures per "
                   f"{profile.budget_window} s exhausted")
            _state_event(d, "budget-exceeded", profile=p, client=client, reason=why)
            raise Denied(Exit.NOPERM, f"{why}: profile {p!r} is now frozen; a custodian "
                         f"must run `thaw {p}`", "budget exceeded")
        d.inflight[p] = d.inflight.get(p, 0) + 1
    reserved = True
    try:
        key = d.keys[profile.key, profile.algorithm]
        alg = BY_NAME[profile.algorithm]
        token = d.token if profile.token is None else d.cards.ready(profile)

        def sign_digest(digest: bytes) -> bytes:
            return token.sign_digest(key, alg, digest)

        out = REGISTRY[fmt].sign(Job(digest=digest, body=body, cert=d.profile_certs.get(p),
                                     chain=d.profile_chains.get(p, ()), alg=alg,
                                     sign_digest=sign_digest, extra=extra))
        entry = d.writer.append(
            "sign", client=client, profile=p, key=str(profile.key), name=name, format=fmt,
            sha256=digest.hex(), size=size, sig_sha256=hashlib.sha256(out).hexdigest(),
            request=rid, **extra)
        with d.lock:  # the slot becomes a logged signature in one step
            d.state.apply(entry)
            d.inflight[p] -= 1
            reserved = False
    finally:
        if reserved:
            with d.lock:
                d.inflight[p] -= 1
    return out


def _state_event(d: Daemon, event: str, **fields: Any) -> dict[str, Any]:
    """Write a state-changing entry and apply it, in log order. Caller holds `d.lock`."""
    assert d.writer is not None
    entry = d.writer.append(event, **fields)
    d.state.apply(entry)
    return entry


def _queue(d: Daemon, peer: wire.Peer, client: str, profile: Profile, cmd: request.Sign,
           sha256: str, size: int, body: bytes, extra: dict[str, str]) -> None:
    rid = secrets.token_hex(16)
    with d.lock:
        now = d.now()
        waiting = sum(1 for r in d.state.requests.values()
                      if r.client == client and r.profile == profile.name and r.open(now))
        if waiting >= profile.max_queued:
            raise Denied(Exit.NOPERM, f"{waiting} requests of yours already wait for "
                         f"approval on profile {profile.name!r} (at most "
                         f"{profile.max_queued}): fetch or wait for them first",
                         "too many queued requests")
        # A kept body (an authenticode request, a few hundred bytes) goes into the log with
        # the queue entry: the checkpoint vouches for what will be signed at `fetch`.
        kept = base64.b64encode(body).decode("ascii") if body else None
        _state_event(d, "queue", request=rid, client=client, profile=profile.name,
                     expires=audit.format_time(now + profile.request_ttl),
                     name=cmd.name, format=cmd.format, sha256=sha256, size=size,
                     body=kept, **extra)
    who = ", ".join(sorted(profile.custodians))
    peer.reply(Exit.QUEUED, f"queued {rid}: needs {profile.approvals} approval(s) "
               f"from {who}; poll with `status {rid}`, then `fetch {rid}`")


def _signature_path(d: Daemon, rid: str) -> Path:
    return d.cfg.daemon.state_dir / "signatures" / rid


def status(d: Daemon, peer: wire.Peer, client: str, cmd: request.Status) -> None:
    with d.lock:
        req = policy.own_request(d.state, client, cmd.id)
        line = json.dumps(req.public(d.cfg.profiles.get(req.profile), d.now()))
    peer.reply(Exit.OK, "", line.encode() + b"\n")


def fetch(d: Daemon, peer: wire.Peer, client: str, cmd: request.Fetch) -> None:
    rid = cmd.id
    with d.lock:
        req = policy.own_request(d.state, client, rid)
        profile = policy.profile_for(d.cfg, req.profile)
        if rid in d.fetching:  # signed by another fetch right now: not stored yet
            peer.reply(Exit.QUEUED, f"request {rid} is being signed: fetch it again in a "
                       "moment")
            return
        if req.signed:
            signed = True
        else:
            signed = False
            _check_open(req, d.now())
            counted = req.counted(profile)
            if len(counted) < profile.approvals:
                have = ", ".join(sorted(counted)) or "none yet"
                peer.reply(Exit.QUEUED, f"request {rid} waits for approvals: "
                           f"{len(counted)} of {profile.approvals} ({have})")
                return
            # A required timestamp was checked when the request was queued.
            policy.check_sign(d.cfg, d.state, client, req.profile, req.format,
                              timestamped=True)
            d.fetching.add(rid)
    if signed:
        try:
            out = _signature_path(d, rid).read_bytes()
        except OSError:
            raise SignerError(Exit.SOFTWARE, f"request {rid} was signed but the signature "
                              "is no longer stored: submit the artifact again") from None
        peer.reply(Exit.OK, "", out)
        return
    try:
        _ready(d, profile, req.format)
        body = base64.b64decode(req.body) if req.body is not None else b""
        if hashlib.sha256(body).hexdigest() != req.sha256 and REGISTRY[req.format].keep:
            raise SignerError(Exit.SOFTWARE, f"request {rid}: the kept request does not "
                              "match its logged digest: submit it again")
        out = _produce(d, profile, req.format, bytes.fromhex(req.sha256), req.size,
                       client, req.name, rid, body, req.extra)
        _store(d, rid, out)  # before another fetch may look for it
    finally:
        with d.lock:
            d.fetching.discard(rid)
    peer.reply(Exit.OK, "", out)


def _store(d: Daemon, rid: str, out: bytes) -> None:
    """Keep a released approval signature so that a lost connection can fetch it again.
    The audit entry is already written; failing to keep a copy does not withhold it."""
    path = _signature_path(d, rid)
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


def requests(d: Daemon, peer: wire.Peer, custodian: str, _cmd: request.Requests) -> None:
    lines = []
    now = d.now()
    with d.lock:
        for req in d.state.requests.values():
            profile = d.cfg.profiles.get(req.profile)
            if profile is None or custodian not in profile.custodians:
                continue
            if not req.open(now) and not (req.rejected_by and not req.expired(now)):
                continue  # signed, cancelled or expired; a rejection shows until expiry
            item = req.public(profile, now)
            item["statement"] = req.statement().decode("ascii")
            lines.append(json.dumps(item, ensure_ascii=True) + "\n")
    peer.reply(Exit.OK, "", "".join(lines).encode("ascii"))


def approve(d: Daemon, peer: wire.Peer, custodian: str, cmd: request.Approve) -> None:
    rid = cmd.id
    with d.lock:
        req = d.state.requests.get(rid)
        if req is None or req.signed:
            raise Denied(Exit.USAGE, f"no pending request {rid}", "unknown request")
        _check_open(req, d.now())
        profile = policy.profile_for(d.cfg, req.profile)
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
            req.statement(), sig, custodian, d.cfg.custodians[custodian],
            d.cfg.daemon.state_dir):
        raise Denied(Exit.DATA, f"the approval signature does not verify for request {rid} "
                     f"and custodian {custodian!r}: sign that request's statement (from "
                     f"`requests`) with `ssh-keygen -Y sign -n {approval.NAMESPACE}`",
                     "bad approval signature")
    with d.lock:
        # cancelled, rejected or expired while the signature came in
        _check_open(req, d.now())
        if custodian in req.approvals:
            n = len(req.counted(profile))
            peer.reply(Exit.OK, f"{custodian} already approved request {rid} (counts "
                       f"once): {n} of {profile.approvals}")
            return
        # The signature goes into the log: a restart counts the approval again only if
        # it still verifies, so an approve entry nobody signed counts for nothing.
        _state_event(d, "approve", request=rid, custodian=custodian, profile=req.profile,
                     client=req.client, sha256=req.sha256,
                     approval=sig.decode("ascii"))
        n = len(req.counted(profile))
    peer.reply(Exit.OK, f"approved request {rid}: {n} of {profile.approvals}")


def cancel(d: Daemon, peer: wire.Peer, client: str, cmd: request.Cancel) -> None:
    rid = cmd.id
    with d.lock:
        req = policy.own_request(d.state, client, rid)
        _check_open(req, d.now())
        _state_event(d, "cancel", request=rid, client=client, profile=req.profile)
    peer.reply(Exit.OK, f"request {rid} cancelled")


def reject(d: Daemon, peer: wire.Peer, custodian: str, cmd: request.Reject) -> None:
    """One custodian of the profile is enough to stop a request (recorded, and shown in
    `requests` until the request would have expired)."""
    rid = cmd.id
    with d.lock:
        req = d.state.requests.get(rid)
        profile = d.cfg.profiles.get(req.profile) if req is not None else None
        if req is None or profile is None or custodian not in profile.custodians:
            raise Denied(Exit.USAGE, f"no pending request {rid}", "unknown request")
        _check_open(req, d.now())
        _state_event(d, "reject", request=rid, custodian=custodian, profile=req.profile,
                     client=req.client, sha256=req.sha256)
    peer.reply(Exit.OK, f"request {rid} rejected")


def unlock(d: Daemon, peer: wire.Peer, custodian: str, cmd: request.Unlock) -> None:
    """The whole PIN from one custodian (`unlock`), or, with `pin_shares = k`, one share from
    each of k custodians (`unlock --share`), which only the token process sees: it combines
    them and logs in (signer/tokenproc.py). The same for the daemon's own token and for a card
    with pin_source prompt (`--token NAME`, signer/cards.py): one `unlocking.Target` each.
    The log says who sent a share, never the share."""
    t = d.cards.unlock_target(cmd.token) if cmd.token is not None else d.unlock_target()
    if t.proc.logged_in:
        peer.reply(Exit.OK, "already unlocked")
        return
    k, what = t.lock.k, t.lock.what
    if cmd.share and not k:
        raise Denied(Exit.USAGE, f"{what} takes the whole PIN: run `{t.lock.command()}` "
                     "without --share", "unlock --share without pin_shares")
    if k and not cmd.share:
        raise Denied(Exit.USAGE, f"{what} is unlocked by {k} custodians' shares: send "
                     f"yours with `{t.lock.command()}`", "whole PIN sent where shares are "
                     "needed")
    peer.go_ahead()
    limit = shares.MAX_LINE + 1 if cmd.share else pin.MAX_PIN + 1
    try:
        body = peer.read_body(limit)
    except wire.BodyTooLarge:
        kind = "share" if cmd.share else "PIN"
        raise Denied(Exit.DATA, f"{kind} too long", f"{kind} too long") from None
    if cmd.share:
        _unlock_share(d, peer, custodian, body, t)
        return
    secret = pin.check(body, "PIN on stdin")
    with d.unlock_lock:
        if not t.proc.logged_in:
            try:
                warning = t.proc.login(secret)
            except SignerError as exc:
                t.failed(exc.code, exc.message)
                if exc.code == Exit.NOPERM:
                    raise Denied(exc.code, exc.message, "unlock refused by the token") \
                        from None
                raise
            if warning:
                log.warning("%s%s", f"token {t.lock.token}: " if t.lock.token else "",
                            warning)
            t.done(custodian=custodian)
    peer.reply(Exit.OK, "unlocked")


def unlocked(d: Daemon, **fields: Any) -> None:
    """The daemon's own token is logged in: say so in the log, check its keys, vouch."""
    assert d.writer is not None
    d.writer.append("unlock", **fields)
    d.check_keys()
    try:
        d.writer.checkpoint()
    except audit.AuditError as exc:
        log.warning("checkpoint after unlock: %s", exc)


def _unlock_share(d: Daemon, peer: wire.Peer, custodian: str, share: bytes,
                  t: unlocking.Target) -> None:
    assert d.writer is not None
    lock = t.lock
    k, window = lock.k, lock.window
    with d.unlock_lock:
        if t.proc.logged_in:
            peer.reply(Exit.OK, "already unlocked")
            return
        try:
            answer = t.proc.send_share(custodian, share, k, window, lock.token)
        except SignerError as exc:
            lock.refused(exc.code, exc.message)
            t.failed(exc.code, exc.message)
            if exc.code in (Exit.DATA, Exit.NOPERM):
                raise Denied(exc.code, exc.message, f"share refused: {exc.message}") from None
            raise
        have = [str(c) for c in answer.get("have", [])]
        if answer.get("warning"):
            log.warning("%s%s", f"token {lock.token}: " if lock.token else "",
                        answer["warning"])
        state = answer.get("state")
        if state == "unlocked":
            lock.reset()
            d.writer.append("unlock-share", custodian=custodian, have=len(have), need=k,
                            **t.fields)
            t.done(custodian=custodian, custodians=sorted(have))
            peer.reply(Exit.OK, f"unlocked with the shares of {', '.join(sorted(have))}")
            return
        lock.counted(custodian, time.monotonic(), have)
        if state == "added":
            d.writer.append("unlock-share", custodian=custodian, have=len(have), need=k,
                            **t.fields)
    counted = "your share already counts (once)" if state == "again" else "share counted"
    peer.reply(Exit.OK, f"{counted}: {len(have)} of {k} ({', '.join(sorted(have))}); each "
               f"share counts for {window} s after it came")


def freeze(d: Daemon, peer: wire.Peer, custodian: str, cmd: request.Freeze) -> None:
    name = cmd.profile
    with d.lock:
        profile = policy.profile_for(d.cfg, name)
        if profile.name not in d.state.frozen:
            _state_event(d, "freeze", profile=name, custodian=custodian,
                         reason=f"frozen by custodian {custodian}")
    peer.reply(Exit.OK, f"profile {name!r} is frozen")


def thaw(d: Daemon, peer: wire.Peer, custodian: str, cmd: request.Thaw) -> None:
    name = cmd.profile
    with d.lock:
        profile = policy.profile_for(d.cfg, name)
        policy.check_custodian_of(profile, custodian)
        if profile.name not in d.state.frozen:
            peer.reply(Exit.OK, f"profile {name!r} is not frozen")
            return
        _state_event(d, "thaw", profile=name, custodian=custodian)
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


COMMANDS: dict[str, Handler] = {h.name: h for h in (
    Handler("sign", "client", sign),
    Handler("status", "client", status),
    Handler("fetch", "client", fetch),
    Handler("cancel", "client", cancel),
    Handler("requests", "custodian", requests),
    Handler("approve", "custodian", approve),
    Handler("reject", "custodian", reject),
    Handler("unlock", "custodian", unlock),
    Handler("freeze", "custodian", freeze),
    Handler("thaw", "custodian", thaw),
)}
assert set(COMMANDS) == {c.__name__.lower() for c in get_args(request.Command)}, \
    "one handler for each command the gateway can send (signer.request.Command)"
