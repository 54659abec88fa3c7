"""The audit log: JSON lines in a hash chain, written and fsynced before anything is released.

Format (also in signer/README.md): one ASCII JSON object per line, keys sorted, no spaces;
`prev` is the previous entry's `hash`; `hash` is the SHA-256 of the entry serialised without
`hash`. `ensure_ascii` escapes every control and non-ASCII character, so a name can never break a
line or forge an entry. A `checkpoint` entry carries `sig`, the audit key's signature over the
entry serialised without `hash` and `sig`; through `prev` it vouches for everything before it.

One module per seam, the names below are the package's interface:
- `chain`: the format and the chain logic (`seal`, `Verifier`), pure;
- `writer`: `Writer`, the I/O edge: group commit (one `fdatasync` for N concurrent entries),
  roll-back of a failed write, checkpoints, state snapshots, rotation; it fails closed;
- `reader`: reading a log back: start-up's `scan`, `check_snapshots`, `verify_file`;
- `snapshots`: finding the last state checkpoint whose snapshot is kept, from the end.
"""

from __future__ import annotations

from signer.audit.chain import (
    EVENTS,
    GENESIS,
    MAX_LINE,
    ChainError,
    Verifier,
    body,
    canonical,
    checkpoint_message,
    format_time,
    now_utc,
    parse_time,
    seal,
    seq_range,
    show,
)
from signer.audit.reader import Scan, check_snapshots, read_lines, scan, verify_file
from signer.audit.snapshots import snapshot_path
from signer.audit.writer import (
    CLOSE_WITH_CHECKPOINT,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_ENTRIES,
    KEEP_SNAPSHOTS,
    KEEP_STATE_AFTER,
    NEEDS_PROOF,
    AuditError,
    CheckpointSigner,
    StateFold,
    Writer,
)

__all__ = [
    "CLOSE_WITH_CHECKPOINT", "DEFAULT_SEGMENT_BYTES", "DEFAULT_SEGMENT_ENTRIES", "EVENTS",
    "GENESIS", "KEEP_SNAPSHOTS", "KEEP_STATE_AFTER", "MAX_LINE", "NEEDS_PROOF", "AuditError",
    "ChainError", "CheckpointSigner", "Scan", "StateFold", "Verifier", "Writer", "body",
    "canonical", "check_snapshots", "checkpoint_message", "format_time", "now_utc",
    "parse_time", "read_lines", "scan", "seal", "seq_range", "show", "snapshot_path",
    "verify_file",
]
