"""`signer audit adopt`: an operator takes on, after review, entries no checkpoint vouches for.

The daemon never certifies what it did not verify (`recovery.judge_tail`): a tail after
the last checkpoint that is longer than the checkpoint interval can leave, or that would make
the signer more permissive (a thaw, an approval, a queued request), stops it with the seq
range named; a short tail that can only make it stricter is taken on, and the next checkpoint
records that range as `unverified` (`audit verify` fails on it). Either way a person decides:
this command writes an `adopt` entry (who, which seqs) and a checkpoint signed by the audit
key that records the range as `adopted`. From then on the daemon believes the range in full
(a thaw in it is honoured), and `audit verify` reports it as adopted, by name.

It runs with the daemon stopped (it takes the log's lock, as the daemon does) and with the
token's PIN (as `signer keys` does): the audit key signs the adoption, so whoever adopts must
be able to unlock the token, which a forger who can only write files cannot. It refuses a
range that is neither the unvouched tail nor before the last checkpoint (a range a checkpoint
recorded as `unverified`), and refuses a log that was rolled back (a snapshot of a later
checkpoint is kept: `audit.check_snapshots`): a cut is not a tail, adopting cannot fix it.
"""

from __future__ import annotations

import hashlib
import os
from typing import TextIO

from signer import audit, keys
from signer.algorithms import ECDSA_P256
from signer.config import NAME_RE, Config
from signer.errors import Exit, SignerError


def parse_range(text: str) -> tuple[int, int]:
    """`A-B` (or `A`): the seqs to adopt."""
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise SignerError(Exit.USAGE, f"--seqs {text!r}: want FIRST-LAST (seq numbers)") \
            from None
    if not 0 <= a <= b:
        raise SignerError(Exit.USAGE, f"--seqs {text!r}: want 0 <= FIRST <= LAST")
    return a, b


def adopt(cfg: Config, seqs: tuple[int, int], operator: str, out: TextIO) -> int:
    if not NAME_RE.fullmatch(operator):
        raise SignerError(Exit.USAGE, f"--operator: want {NAME_RE.pattern}")
    d = cfg.daemon
    token = keys.open_token(cfg)
    try:
        spki = bytes(token.public_key_info(d.audit_key).dump())
        key = token.private_key(d.audit_key)
        snapshots = d.state_dir / "checkpoints"
        try:
            scan = audit.scan(d.audit_log, lambda _e, _v: None, spki, snapshots,
                              lambda _d: None)
            audit.check_snapshots(snapshots, scan)
        except audit.ChainError as exc:
            raise SignerError(Exit.IOERR, f"audit log {d.audit_log} is broken at {exc.where}: "
                              f"{exc.reason}: nothing adopted") from None
        tail = (scan.tail[0]["seq"], scan.tail[-1]["seq"]) if scan.tail else None
        before = scan.verified is not None and seqs[1] < scan.verified
        if seqs != tail and not (before and tail is None):
            now = (f"the entries no checkpoint vouches for are seq {tail[0]}..{tail[1]}"
                   if tail else "every entry is vouched for by a checkpoint")
            raise SignerError(Exit.USAGE, f"seq {seqs[0]}..{seqs[1]} cannot be adopted: {now} "
                              "(adopt exactly that tail, or a range `signer audit verify` "
                              "names as unverified once no tail is left)")
        writer = audit.Writer(d.audit_log, scan, d.checkpoint_interval,
                              lambda digest: token.sign_digest(key, ECDSA_P256, digest),
                              adopted=seqs)
        torn = _keep_torn(cfg, scan)
        writer.open()
        try:
            entry = writer.append("adopt", operator=operator, first=seqs[0], last=seqs[1],
                                  torn=torn)
        finally:
            writer.close()
    finally:
        token.close()
    out.write(f"adopted seq {seqs[0]}..{seqs[1]} by {operator}: entry seq {entry['seq']}, "
              f"vouched for by the checkpoint at seq {writer.scan.seq}\n")
    return Exit.OK


def _keep_torn(cfg: Config, scan: audit.Scan) -> str | None:
    """An incomplete last line is cut when the log is opened (as the daemon does): keep it
    beside the state for the investigation, and say so in the adopt entry."""
    if not scan.torn:
        return None
    digest = hashlib.sha256(scan.torn).hexdigest()
    kept = cfg.daemon.state_dir / f"torn-{scan.end}-{digest[:16]}.bin"
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(scan.torn)
        fh.flush()
        os.fsync(fh.fileno())
    return f"cut a torn last entry: {len(scan.torn)} bytes, sha256 {digest}, kept in {kept}"
