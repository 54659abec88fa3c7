"""Policy: who may do what, and the state that decisions depend on. Pure: no I/O, no clock.

The state (frozen profiles, budget windows, requests waiting for approvals) is a fold over the
audit log: `State.apply` is called for every entry the daemon replays at start and for every entry
it writes. There is no second store that could disagree with the log, and a restart cannot reset
a budget or forget a freeze. What the replay may believe is the daemon's call (`TIGHTENING`):
entries a checkpoint vouches for all count; of an unproven tail only those that can only make
the signer stricter, and approvals, which carry their own proof (the custodian's signature).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from signer import audit
from signer.config import DEFAULT_REQUEST_TTL, Config, Profile
from signer.errors import Exit

# Entries that can only make the signer stricter: believed even when nothing vouches for them
# (forging one is a denial of service, which deleting the log already is).
TIGHTENING = frozenset({"sign", "freeze", "budget-exceeded", "cancel", "reject"})
# What a tail that no checkpoint vouches for may hold for the daemon to start on it: the
# above and entries that change no state. Anything else (a thaw, an approval, a queued
# request, an adoption, an event added later) stops it until an operator adopts the range.
UNVOUCHED_OK = TIGHTENING | {"start", "stop", "deny", "residency-failure", "unlock",
                             "unlock-share"}
# How long a request past its expiry stays in the state a checkpoint keeps (a week).
CLOSED_KEPT = 7 * 86400
# What a format's check adds to the log and the statement besides the body's SHA-256
# (signer.formats: `authenticode`, the digest of the Windows file the request is for).
FORMAT_FIELDS = ("authenticode",)


class Denied(Exception):
    """A request refused by policy: `message` goes to the caller, `reason` to the audit log."""

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or message


@dataclass
class Request:
    """A signature request waiting for M-of-N custodian approvals."""

    id: str
    profile: str
    client: str
    sha256: str
    size: int
    name: str
    format: str
    requested: str = ""  # UTC times, as in the log
    expires: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # FORMAT_FIELDS that apply
    body: str | None = None  # base64 of a kept request body (authenticode), as logged
    # custodian -> the armored SSH signature of the statement, as logged (None: not kept)
    approvals: dict[str, str | None] = field(default_factory=dict)
    signed: bool = False
    cancelled: bool = False
    rejected_by: str | None = None

    def statement(self) -> bytes:
        """What a custodian signs (`ssh-keygen -Y sign -n signer-approval`); README format.
        It carries the request's time and expiry: an approval is for this request only, and
        only until then. A format with fields of its own (authenticode) adds `format=` and
        them, so the custodian sees what the host can know of the file: its digest."""
        text = (f"signer-approval-v2\nid={self.id}\nprofile={self.profile}\n"
                f"client={self.client}\nsha256={self.sha256}\nsize={self.size}\n"
                f"name={json.dumps(self.name, ensure_ascii=True)}\n"
                f"requested={self.requested}\nexpires={self.expires}\n")
        if self.extra:
            text += f"format={self.format}\n" + "".join(
                f"{k}={self.extra[k]}\n" for k in FORMAT_FIELDS if k in self.extra)
        return text.encode("ascii")

    def expired(self, now: float) -> bool:
        return not self.signed and audit.parse_time(self.expires) <= now

    def open(self, now: float) -> bool:
        """Still waiting: not signed, cancelled, rejected or expired."""
        return not (self.signed or self.cancelled or self.rejected_by or self.expired(now))

    def counted(self, profile: Profile) -> set[str]:
        """Approvals that count now: distinct, and from custodians the profile still lists."""
        return set(self.approvals) & profile.custodians

    def public(self, profile: Profile | None, now: float) -> dict[str, Any]:
        counted = self.counted(profile) if profile else set()
        required = profile.approvals if profile else 0
        state = ("signed" if self.signed else "cancelled" if self.cancelled
                 else "rejected" if self.rejected_by else "expired" if self.expired(now)
                 else "approved" if len(counted) >= required else "pending")
        out = {"id": self.id, "state": state, "profile": self.profile, "client": self.client,
               "sha256": self.sha256, "size": self.size, "name": self.name,
               "format": self.format, "approvals": sorted(counted), "required": required,
               "requested": self.requested, "expires": self.expires, **self.extra}
        if self.rejected_by:
            out["rejected_by"] = self.rejected_by
        return out


@dataclass
class State:
    frozen: dict[str, str] = field(default_factory=dict)  # profile -> why
    signatures: dict[str, deque[float]] = field(default_factory=dict)  # profile -> sign times
    requests: dict[str, Request] = field(default_factory=dict)

    def apply(self, entry: Mapping[str, Any]) -> None:
        event = entry.get("event")
        profile = entry.get("profile")
        if not isinstance(profile, str):
            return
        if event == "sign":
            self.signatures.setdefault(profile, deque()).append(audit.parse_time(entry["time"]))
            req = self.requests.get(str(entry.get("request")))
            if req is not None:
                req.signed = True
        elif event in ("freeze", "budget-exceeded"):
            self.frozen[profile] = str(entry.get("reason") or event)
        elif event == "thaw":
            self.frozen.pop(profile, None)
            self.signatures.pop(profile, None)
        elif event == "queue":
            rid = str(entry["request"])
            requested = str(entry["time"])
            # a queue entry from before expiry existed: one day from its time
            expires = str(entry.get("expires") or audit.format_time(
                audit.parse_time(requested) + DEFAULT_REQUEST_TTL))
            self.requests[rid] = Request(
                id=rid, profile=profile, client=str(entry["client"]),
                sha256=str(entry["sha256"]), size=int(entry["size"]),
                name=str(entry.get("name", "")), format=str(entry["format"]),
                requested=requested, expires=expires,
                extra={k: str(entry[k]) for k in FORMAT_FIELDS if k in entry},
                body=str(entry["body"]) if "body" in entry else None)
        elif event in ("cancel", "reject"):
            req = self.requests.get(str(entry.get("request")))
            if req is not None and not req.signed:
                if event == "cancel":
                    req.cancelled = True
                else:
                    req.rejected_by = str(entry.get("custodian"))
        elif event == "approve":
            req = self.requests.get(str(entry.get("request")))
            sig = entry.get("approval")
            if req is not None:
                req.approvals[str(entry["custodian"])] = sig if isinstance(sig, str) else None

    def export(self, windows: Mapping[str, int], now: float) -> bytes:
        """The state as one canonical JSON document, for a checkpoint to vouch for (its
        SHA-256 is in the signed entry). What can no longer matter is dropped first, here and
        in the export alike, so its size follows the open work, not the history: signature
        times out of their profile's budget window, the kept body of a request that can no
        longer be signed, and requests CLOSED_KEPT seconds past their expiry (until then
        `status` and `fetch` still say why a request is closed, and a signed one can be
        fetched again)."""
        for name, times in self.signatures.items():
            window = windows.get(name)
            while window is not None and times and times[0] <= now - window:
                times.popleft()
        for rid in [r.id for r in self.requests.values()
                    if audit.parse_time(r.expires) + CLOSED_KEPT <= now]:
            del self.requests[rid]
        for r in self.requests.values():
            if not r.open(now):
                r.body = None
        doc = {"v": 1, "frozen": self.frozen,
               "signatures": {k: list(v) for k, v in self.signatures.items() if v},
               "requests": [asdict(r) for r in self.requests.values()]}
        return audit.canonical(doc)

    @classmethod
    def restore(cls, data: bytes) -> State:
        """The state of `export` (whose digest a verified checkpoint carries)."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError("not a state snapshot of this version")
        return cls(frozen={str(k): str(v) for k, v in doc["frozen"].items()},
                   signatures={str(k): deque(float(t) for t in v)
                               for k, v in doc["signatures"].items()},
                   requests={r["id"]: Request(**r) for r in doc["requests"]})

    def used(self, profile: Profile, now: float) -> int:
        """Signatures counted against the budget: those in the rolling window since the last
        thaw (a thaw empties the window). Expired timestamps are dropped here, so the cost is
        amortised O(1) and memory stays bounded by the budget."""
        times = self.signatures.setdefault(profile.name, deque())
        while times and times[0] <= now - profile.budget_window:
            times.popleft()
        return len(times)


@dataclass
class Fold:
    """The state kept by the audit writer: every entry written, folded in order, so that a
    state checkpoint vouches for exactly the state after the entries before it."""

    state: State
    windows: dict[str, int]

    def apply(self, entry: Mapping[str, Any]) -> None:
        self.state.apply(entry)

    def snapshot(self, now: float) -> bytes:
        return self.state.export(self.windows, now)


def profile_for(cfg: Config, name: str) -> Profile:
    profile = cfg.profiles.get(name)
    if profile is None:
        raise Denied(Exit.USAGE, f"unknown profile {name!r}", f"unknown profile {name!r}")
    return profile


def check_sign(cfg: Config, state: State, client: str, profile_name: str, fmt: str,
               timestamped: bool = False) -> Profile:
    """Everything that can be decided before the artifact is read."""
    profile = profile_for(cfg, profile_name)
    if client not in profile.clients:
        raise Denied(Exit.NOPERM, f"client {client!r} is not allowed to use profile "
                     f"{profile.name!r}", "client not allowed")
    if fmt not in profile.formats:
        raise Denied(Exit.NOPERM, f"format {fmt!r} is not allowed for profile {profile.name!r} "
                     f"(allowed: {', '.join(profile.formats)})", "format not allowed")
    if profile.require_timestamp and not timestamped:
        raise Denied(Exit.USAGE, f"profile {profile.name!r} requires an RFC 3161 timestamp: "
                     "submit with --timestamp URL (nothing was signed)", "timestamp required")
    check_not_frozen(state, profile)
    return profile


def check_not_frozen(state: State, profile: Profile) -> None:
    if profile.name in state.frozen:
        raise Denied(Exit.NOPERM, f"profile {profile.name!r} is frozen "
                     f"({state.frozen[profile.name]}): a custodian must run `thaw "
                     f"{profile.name}`", "profile frozen")


def check_size(profile: Profile, size: int) -> None:
    if size == 0:
        raise Denied(Exit.DATA, "empty artifact: send the file on stdin", "empty artifact")
    if size > profile.max_size:
        raise Denied(Exit.DATA, f"artifact larger than the profile's maximum of "
                     f"{profile.max_size} bytes", "artifact too large")


def check_custodian_of(profile: Profile, custodian: str) -> None:
    """Thaw and approve: a custodian the profile lists (any custodian if it lists none)."""
    if profile.custodians and custodian not in profile.custodians:
        raise Denied(Exit.NOPERM, f"custodian {custodian!r} is not a custodian of profile "
                     f"{profile.name!r}", "not a custodian of the profile")


def own_request(state: State, client: str, rid: str) -> Request:
    req = state.requests.get(rid)
    # Someone else's request looks exactly like a missing one: ids are not an oracle.
    if req is None or req.client != client:
        raise Denied(Exit.USAGE, f"no request {rid} of yours", "unknown request")
    return req
