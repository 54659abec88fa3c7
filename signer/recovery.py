"""The daemon's start-up: the state it serves from, rebuilt from the audit log it will append to.

What start-up believes is what the audit key vouches for. It begins at the last state
checkpoint whose snapshot is kept (`audit.scan`: the snapshot must have the digest the
checkpoint signs), or replays the whole log (`full_replay`: the bench's "before"; the same
state, built the slow way), and refuses a log that nothing can vouch for (no audit public key
on the token nor in the configured certificate), a snapshot newer than the log (a roll-back,
`audit.check_snapshots`) and a broken chain. The entries after the last checkpoint are judged
on their own (`judge_tail`), an incomplete last line is kept for the investigation before the
writer cuts it (`keep_torn`), and an approval counts again only if its SSH signature still
verifies (`recheck_approvals`).

The clock starts here too (`start_clock`): the daemon's `now` never goes back before the log's
last entry, whatever the wall clock says at start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from signer import approval, audit, certs, policy, segments
from signer.config import Config
from signer.errors import Exit, SignerError
from signer.tokenproc import TokenProcess

log = logging.getLogger("signerd")


@dataclass
class Recovered:
    """What the daemon starts from; `notes` go into its `start` entry."""

    state: policy.State
    scan: audit.Scan
    seconds: float  # reading and checking the log (the bench's scan figure)
    unvouched: tuple[int, int] | None  # the tail adopted unverified (`judge_tail`)
    notes: list[str]
    wall0: float  # the clock's anchor (`start_clock`)
    mono0: float


def recover(cfg: Config, token: TokenProcess, full_replay: bool = False) -> Recovered:
    """Read and check the audit log and rebuild the policy state from what it vouches for."""
    d = cfg.daemon
    spki, source = audit_public_key(cfg, token)
    if spki is None and any(seg.path.stat().st_size for seg in segments.of_log(d.audit_log)):
        raise SignerError(Exit.IOERR, f"cannot check the checkpoints of {d.audit_log}: "
                          f"{source}; refusing to rebuild state from a log that nothing "
                          "vouches for")
    snapshots = d.state_dir / "checkpoints"
    state = policy.State()

    def restore(data: bytes) -> None:
        nonlocal state
        try:
            state = policy.State.restore(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise audit.ChainError(-1, f"unreadable state snapshot: {exc}") from None

    def believe(entry: dict[str, Any], vouched: bool) -> None:
        # what a checkpoint says its daemon took on unverified: what it believed then
        if vouched or entry["event"] in policy.TIGHTENING:
            state.apply(entry)

    started = time.monotonic()
    try:
        scan = audit.scan(d.audit_log, believe, spki, None if full_replay else snapshots,
                          restore)
        orphan = None if full_replay else audit.check_snapshots(snapshots, scan)
    except audit.ChainError as exc:
        raise SignerError(Exit.IOERR, f"audit log {d.audit_log} is broken at {exc.where}: "
                          f"{exc.reason}. Keep it for the investigation (`signer audit "
                          "verify`), move it aside with the state directory's "
                          "checkpoints/ and start again") from None
    except OSError as exc:
        raise SignerError(Exit.IOERR, f"cannot read audit log {d.audit_log}: "
                          f"{exc.strerror}") from None
    seconds = time.monotonic() - started
    log.info("audit log: %s; %d entries read in %.3f s",
             f"started from the state of checkpoint seq {scan.state_seq}"
             if scan.state_seq is not None else "replayed from the start",
             scan.replayed, seconds)
    wall0, mono0, clock_note = start_clock(scan)
    unvouched, tail_notes = judge_tail(cfg, state, scan)
    notes = [n for n in (orphan, clock_note) if n] + tail_notes
    notes += recheck_approvals(cfg, state)
    return Recovered(state, scan, seconds, unvouched, notes, wall0, mono0)


def start_clock(scan: audit.Scan) -> tuple[float, float, str | None]:
    """Anchor `now` at start: never before the last entry's time, whatever the wall
    clock says (an expired request stays expired, a spent budget spent). Returns the wall
    time and the boot-time clock it goes with, and a note when the wall clock was behind."""
    wall = time.time()
    mono = time.clock_gettime(time.CLOCK_BOOTTIME)
    last = audit.parse_time(scan.last_time) if scan.last_time else None
    if last is None or wall >= last:
        return wall, mono, None
    note = (f"the wall clock ({audit.format_time(wall)}) is earlier than the log's last "
            f"entry ({scan.last_time}): the daemon's clock starts at that entry's time")
    log.warning("%s", note)
    return last, mono, note


def audit_public_key(cfg: Config, token: TokenProcess) -> tuple[bytes | None, str]:
    """The audit key's public half that checkpoints are checked with at start: from the
    token (a public session: a locked daemon can read it), else the configured audit
    certificate. (None, why) when neither is there."""
    d = cfg.daemon
    try:
        info = token.public_key_info_unlocked(d.audit_key)
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


def judge_tail(cfg: Config, state: policy.State, scan: audit.Scan
               ) -> tuple[tuple[int, int] | None, list[str]]:
    """The entries after the last checkpoint: nothing signed by the token vouches for
    them (anyone who can write the file could have written them with a recomputed
    chain, or rewritten the tail after an earlier checkpoint and dropped the later ones).

    The daemon starts on such a tail only when the checkpoint policy can have left it (no
    longer than the `interval` recorded in the last checkpoint) and nothing in it would
    make the signer more permissive (policy.UNVOUCHED_OK: no thaw, approval, queued
    request, adoption): then it believes only what makes the signer stricter (applied to
    `state`), and its next checkpoint records the range as adopted unverified
    (`unverified`), so that `audit verify` fails on it and a later replay believes no more
    of it. Any other tail stops the daemon with the range named, for an operator to review
    and adopt (`signer audit adopt`) or to restore the log. Returns (the range, notes for
    the start entry)."""
    if not scan.tail:
        return None, []
    d = cfg.daemon
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
            state.apply(entry)
    note = (f"adopted seq {first}..{last} after {after} unverified: vouched for by no "
            "checkpoint, only what makes the signer stricter is believed (review, then "
            "`signer audit adopt`)")
    log.warning("audit log: %s", note)
    return (first, last), [note]


def recheck_approvals(cfg: Config, state: policy.State) -> list[str]:
    """An approval counts after a restart only if its SSH signature, kept in the log,
    still verifies for that request with the custodian's configured key."""
    dropped = []
    for req in state.requests.values():
        if req.signed:
            continue
        for custodian, sig in list(req.approvals.items()):
            key = cfg.custodians.get(custodian)
            if sig is None or key is None or not approval.verify(
                    req.statement(), sig.encode("ascii"), custodian, key,
                    cfg.daemon.state_dir):
                del req.approvals[custodian]
                dropped.append(f"{custodian} on {req.id}")
    if not dropped:
        return []
    log.warning("approvals that do not verify (not counted): %s", ", ".join(dropped))
    return [f"approvals not counted (their signature does not verify with the configured "
            f"key): {', '.join(dropped[:20])}{' ...' if len(dropped) > 20 else ''}"]


def keep_torn(cfg: Config, scan: audit.Scan) -> str:
    """Keep the incomplete last line that start-up cuts (a crash in the middle of a write)
    for the investigation, and say exactly what was cut: offset, length, digest, where."""
    digest = hashlib.sha256(scan.torn).hexdigest()
    kept = cfg.daemon.state_dir / f"torn-{scan.end}-{digest[:16]}.bin"
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
