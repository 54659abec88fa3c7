"""The token PIN as k-of-n custodian shares: split at the key ceremony, combined in the token
process when k custodians have sent theirs (signer/tokenproc.py, `ShareRound`).

Why a key and not the PIN. pycryptodome's `Shamir` (kept, reviewed; not written here) shares
a 16-byte secret, and a PIN is up to 256 bytes (the role makes 32). Cutting the PIN into
16-byte blocks, each split on its own, would say nothing when a share is forged or damaged:
the combination would be a wrong PIN, tried on the token, a try spent (a card locks after a
few). So the ceremony draws a random 16-byte key K, seals the PIN with AES-128-GCM under K
(cryptography's AESGCM), and splits K. Every share carries the same
sealed PIN; k shares give K, and K opens the seal only if every share was the ceremony's:
a forged, damaged or foreign share fails the GCM tag, *before* anything reaches the token.
The seal binds the set's id, k and n (its associated data), so shares of two ceremonies, or
a share whose k was edited, never combine.

A share is one line of ASCII, safe to paste, with a checksum that catches a typo at once
(a forger recomputes it; the seal catches the forger):

    signer-share-1.<set id, 16 hex>.<k>.<n>.<index>.<share, b64url>.<sealed PIN, b64url>.<check>

where <check> is the first 8 hex digits of SHA-256 over everything before it. A share of a
card's PIN ([tokens.NAME] with `pin_source = "prompt"`) names its token before the check:

    signer-share-1.<set id>.<k>.<n>.<index>.<share>.<sealed PIN>.<token NAME>.<check>

and the token's name is bound to the seal too, so a share is refused at once by any other
token's round (a share of the daemon's own token names none), and a share whose name was
edited never opens the seal: one token's PIN is never tried on another. The share alone
tells nothing about the PIN (Shamir's property, given a uniformly random K); the sealed PIN is
AES-GCM ciphertext under K. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "signer-share-1"
MAX_SHARES = 255  # Shamir's indices in GF(2^128) as pycryptodome numbers them: 1..255 here
MAX_LINE = 1024  # a share line, with its sealed PIN (MAX_PIN 256 bytes)
_NONCE = 12


class ShareError(ValueError):
    """A share that cannot be used: the message says why, never what the share holds."""


@dataclass(frozen=True)
class Share:
    set_id: str
    k: int
    n: int
    index: int
    value: bytes  # 16 bytes
    sealed: bytes  # nonce, ciphertext, tag
    token: str = ""  # the [tokens.*] name of a card's PIN; "": the daemon's own token

    def same_set(self, other: Share) -> bool:
        return (self.set_id, self.k, self.n, self.sealed, self.token) == \
            (other.set_id, other.k, other.n, other.sealed, other.token)

    def line(self) -> str:
        fields = [PREFIX, self.set_id, str(self.k), str(self.n), str(self.index),
                  _b64(self.value), _b64(self.sealed)]
        if self.token:
            fields.append(self.token)
        body = ".".join(fields)
        return f"{body}.{_check(body)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check(body: str) -> str:
    return hashlib.sha256(body.encode("ascii")).hexdigest()[:8]


def _aad(set_id: str, k: int, n: int, token: str) -> bytes:
    return (f"{PREFIX}.{set_id}.{k}.{n}" + (f".{token}" if token else "")).encode("ascii")


def token_name_ok(token: str) -> bool:
    """A [tokens.*] name as the signer's config allows it (NAME_RE there; kept here so that
    this module imports nothing of the signer's)."""
    return (0 < len(token) <= 64 and token[0].isascii() and token[0].islower()
            and all(c.isascii() and (c.islower() or c.isdigit() or c in "_-") for c in token))


def whose(token: str) -> str:
    return f"token {token!r}" if token else "the signer's own token"


def check_counts(k: int, n: int) -> None:
    if not 2 <= k <= n <= MAX_SHARES:
        raise ShareError(f"k-of-n shares need 2 <= k <= n <= {MAX_SHARES} (k={k}, n={n}): "
                         "with k=1 any one custodian holds the PIN")


def split(pin: bytes, k: int, n: int, token: str = "") -> list[Share]:
    """n shares of `pin`, any k of which give it back (see the module docstring); `token`:
    the [tokens.*] name of the card whose PIN this is ("": the daemon's own token)."""
    check_counts(k, n)
    if token and not token_name_ok(token):
        raise ShareError(f"bad token name {token!r} (want [a-z][a-z0-9_-]{{0,63}})")
    key = os.urandom(16)
    set_id = os.urandom(8).hex()
    nonce = os.urandom(_NONCE)
    sealed = nonce + AESGCM(key).encrypt(nonce, pin, _aad(set_id, k, n, token))
    return [Share(set_id, k, n, index, bytes(value), sealed, token)
            for index, value in Shamir.split(k, n, key, False)]


def parse(raw: bytes) -> Share:
    """A share from what a custodian sent (one line); ShareError says what is wrong with it."""
    text = raw.strip()
    if len(text) > MAX_LINE:
        raise ShareError("not a share: too long")
    try:
        line = text.decode("ascii")
    except UnicodeDecodeError:
        raise ShareError("not a share: not ASCII") from None
    parts = line.split(".")
    if len(parts) not in (8, 9) or parts[0] != PREFIX:
        # (the message never holds PREFIX and a dot: the posture suite looks for that in logs)
        raise ShareError(f"not a share: want the one line the ceremony wrote (it starts "
                         f"{PREFIX})")
    body, check = line.rsplit(".", 1)
    if check != _check(body):
        raise ShareError("the share is damaged (its checksum does not match): copy it again "
                         "from the ceremony's file")
    _prefix, set_id, k_s, n_s, index_s, value_s, sealed_s = parts[:7]
    token = parts[7] if len(parts) == 9 else ""
    if len(parts) == 9 and not token_name_ok(token):
        raise ShareError("the share is damaged (its token name is not a name)")
    try:
        k, n, index = int(k_s), int(n_s), int(index_s)
        value, sealed = _unb64(value_s), _unb64(sealed_s)
        bytes.fromhex(set_id)
    except (ValueError, binascii.Error):
        raise ShareError("the share is damaged (a field does not decode)") from None
    try:
        check_counts(k, n)
    except ShareError as exc:
        raise ShareError(f"the share is damaged: {exc}") from None
    if len(set_id) != 16 or not 1 <= index <= n or len(value) != 16 \
            or len(sealed) < _NONCE + 16 + 1:
        raise ShareError("the share is damaged (a field is out of range)")
    return Share(set_id, k, n, index, value, sealed, token)


def combine(shares: list[Share]) -> bytes:
    """The PIN from k shares of one set, or ShareError when they do not open the seal (one
    is forged, damaged or from another ceremony): then nothing may be tried on the token."""
    if not shares:
        raise ShareError("no shares")
    first = shares[0]
    if any(not s.same_set(first) for s in shares):
        raise ShareError("the shares are from different ceremonies")
    if len({s.index for s in shares}) != len(shares) or len(shares) < first.k:
        raise ShareError(f"{first.k} distinct shares are needed")
    key = Shamir.combine([(s.index, s.value) for s in shares[:first.k]], False)
    nonce, sealed = first.sealed[:_NONCE], first.sealed[_NONCE:]
    try:
        return AESGCM(key).decrypt(nonce, sealed,
                                   _aad(first.set_id, first.k, first.n, first.token))
    except InvalidTag:
        raise ShareError("the shares do not open the sealed PIN: one of them is forged, "
                         "damaged or from another ceremony") from None


@dataclass
class _Sent:
    custodian: str
    share: Share
    at: float


class Round:
    """The shares sent since the last unlock, in the token process's memory only: at most one
    per custodian and one per index, each kept for `window` seconds after it came (a clock
    read by the caller: monotonic). `add` answers how many count now; when k distinct
    custodians' shares are in, `take` gives the PIN and forgets every share, whatever the
    outcome (a failed combination starts a new round: nothing is retried on the token)."""

    def __init__(self) -> None:
        self._sent: list[_Sent] = []

    def _expire(self, now: float, window: float) -> None:
        self._sent = [s for s in self._sent if now - s.at < window]

    def add(self, custodian: str, raw: bytes, k: int, now: float, window: float,
            token: str = "") -> str:
        """Count a custodian's share for `token` (the [tokens.*] name; "": the daemon's own);
        returns "added" or "again" (this custodian's share already counts: once). ShareError
        when the share cannot count: a share of another token's PIN is refused here, before
        it counts, so it can never be combined and tried on this token."""
        self._expire(now, window)
        share = parse(raw)
        if share.token != token:
            raise ShareError(f"the share is for {whose(share.token)}, not {whose(token)}: "
                             "send it with the unlock of the token it was made for")
        if share.k != k:
            raise ShareError(f"the share is for {share.k} of {share.n} custodians, but this "
                             f"signer needs {k}: it is from another ceremony")
        for s in self._sent:
            if s.custodian == custodian:
                return "again"
        for s in self._sent:
            if not s.share.same_set(share):
                raise ShareError("the share is from another ceremony than the shares already "
                                 "sent")
            if s.share.index == share.index:
                raise ShareError(f"share number {share.index} was already sent by another "
                                 "custodian: each custodian sends their own")
        self._sent.append(_Sent(custodian, share, now))
        return "added"

    def custodians(self, now: float, window: float) -> list[str]:
        self._expire(now, window)
        return [s.custodian for s in self._sent]

    def ready(self, k: int) -> bool:
        return len(self._sent) >= k

    def take(self) -> bytes:
        """The PIN from the shares in (ShareError if they do not open the seal); the round is
        empty afterwards either way."""
        sent, self._sent = self._sent, []
        return combine([s.share for s in sent])

    def clear(self) -> None:
        self._sent = []
