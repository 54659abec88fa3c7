"""The audit log's format and its chain, pure (no I/O): entries, their canonical form and
hash, checkpoint messages, and `Verifier`, which reads lines in order and names the first one
that cannot be trusted. The format itself is described in signer/audit/__init__.py and
signer/README.md."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from signer.algorithms import verify_digest

GENESIS = "0" * 64
EVENTS = frozenset({"start", "stop", "sign", "deny", "queue", "approve", "unlock", "freeze", "thaw",
                    "residency-failure", "budget-exceeded", "checkpoint", "cancel", "reject",
                    "adopt", "unlock-share"})
MAX_LINE = 64 * 1024


class ChainError(Exception):
    """The first entry that cannot be trusted (and the segment it is in, when known)."""

    def __init__(self, seq: int, reason: str, segment: str | None = None) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason
        self.segment = segment

    @property
    def where(self) -> str:
        return f"seq {self.seq} (segment {self.segment})" if self.segment else f"seq {self.seq}"


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()  # 3.11 reads the trailing Z as UTC


def checkpoint_message(body: Mapping[str, Any]) -> bytes:
    """The SHA-256 that the audit key signs for a checkpoint."""
    return hashlib.sha256(canonical({k: v for k, v in body.items()
                                     if k not in ("hash", "sig")})).digest()


def seal(body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Add `hash` to a complete body (seq, time, prev, event, fields); return entry and line."""
    entry = dict(body)
    entry["hash"] = hashlib.sha256(canonical(body)).hexdigest()
    return entry, canonical(entry) + b"\n"


def body(seq: int, prev: str, event: str, fields: Mapping[str, Any], time: str) -> dict[str, Any]:
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    out = {k: v for k, v in fields.items() if v is not None}
    out.update(seq=seq, time=time, prev=prev, event=event)
    return out


@dataclass
class Verifier:
    """Feeds on lines in order; raises ChainError at the first bad one."""

    spki: bytes | None = None  # audit public key; None: checkpoint signatures not checked
    seq: int = -1
    last_hash: str = GENESIS
    last_event: str | None = None
    checkpoints: int = 0
    last_checkpoint: int | None = None
    # (first, last, checkpoint seq): ranges a checkpoint says its daemon adopted unverified
    unverified: list[tuple[int, int, int]] = field(default_factory=list)
    # (first, last, operator, seq of the adopt entry): ranges an operator adopted after review
    adoptions: list[tuple[int, int, str, int]] = field(default_factory=list)

    def feed(self, line: bytes) -> dict[str, Any]:
        expected = self.seq + 1
        if not line.endswith(b"\n"):
            raise ChainError(expected, "incomplete entry (the log was cut in the middle of a "
                                       "line)")
        try:
            entry = json.loads(line.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ChainError(expected, "not a JSON entry") from None
        if not isinstance(entry, dict):
            raise ChainError(expected, "not a JSON object")
        seq = entry.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ChainError(expected, "no sequence number")
        if seq != expected:
            if seq > expected:
                raise ChainError(expected, f"missing (found seq {seq} in its place: deleted or "
                                           "reordered entries)")
            raise ChainError(seq, f"appears again after seq {expected - 1} (inserted or "
                                  "reordered entries)")
        claimed = entry.pop("hash", None)
        if claimed != hashlib.sha256(canonical(entry)).hexdigest():
            raise ChainError(seq, "hash does not match the entry (modified)")
        entry["hash"] = claimed
        if canonical(entry) + b"\n" != line:
            raise ChainError(seq, "not in canonical form (modified)")
        if entry.get("prev") != self.last_hash:
            if seq == 0:
                raise ChainError(0, "first entry does not start the chain (entries before it "
                                    "were removed)")
            raise ChainError(seq - 1, f"does not match the hash recorded in seq {seq} "
                                      f"(seq {seq - 1} modified, or seq {seq} forged)")
        event = entry.get("event")
        if event not in EVENTS or not isinstance(entry.get("time"), str):
            raise ChainError(seq, f"unknown event {event!r}")
        if event == "checkpoint":
            self._checkpoint(entry)
            span = seq_range(entry.get("unverified"))
            if span is not None:
                self.unverified.append((*span, seq))
        elif event == "adopt":
            span = seq_range([entry.get("first"), entry.get("last")])
            if span is not None:
                self.adoptions.append((*span, str(entry.get("operator")), seq))
        self.seq, self.last_hash, self.last_event = seq, claimed, event
        return entry

    def unreviewed(self) -> list[tuple[int, int, int]]:
        """Ranges adopted unverified that no operator adopted since (by a vouched entry)."""
        done = {(a, b) for a, b, _who, at in self.adoptions
                if self.last_checkpoint is not None and at < self.last_checkpoint}
        return [u for u in self.unverified if (u[0], u[1]) not in done]

    def _checkpoint(self, entry: dict[str, Any]) -> None:
        seq = entry["seq"]
        if self.spki is not None:
            try:
                sig = base64.b64decode(entry.get("sig", ""), validate=True)
            except ValueError:
                raise ChainError(seq, "checkpoint signature is not base64") from None
            if not verify_digest(self.spki, sig, checkpoint_message(entry), pss=False):
                raise ChainError(seq, "checkpoint signature does not verify with the audit key")
        self.checkpoints += 1
        self.last_checkpoint = seq


def seq_range(value: Any) -> tuple[int, int] | None:
    """[first, last] as written in a checkpoint or an adopt entry; None if not one."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            and 0 <= value[0] <= value[1]):
        return value[0], value[1]
    return None


def show(entry: Mapping[str, Any]) -> str:
    """One line for a person: fixed fields first, then the rest, every value JSON-escaped."""
    head = f"{entry.get('seq')} {entry.get('time')} {entry.get('event')}"
    rest = " ".join(f"{k}={json.dumps(v, ensure_ascii=True)}" for k, v in sorted(entry.items())
                    if k not in ("seq", "time", "event", "prev", "hash", "sig"))
    return f"{head} {rest}".rstrip()
