"""`openpgp` and `openpgp-cleartext`: OpenPGP v4 signatures (RFC 9580) made with a key that
never leaves the token.

`openpgp` is a signature of a binary document (type 0x00): the detached `.sig` (or, armoured
by the client, `.asc`) that `gpgv --keyring K FILE.sig FILE` and `sqv --keyring K FILE.sig
FILE` check. `openpgp-cleartext` is a signature of a canonical text document (type 0x01) over
the text as the cleartext framework reads it (RFC 9580 7.2: CRLF line endings, trailing
whitespace removed, the last line ending belongs to the framework): the client wraps it
around the text it sent, which gives apt's `InRelease`. Two format names, not an option of
one: what may be signed is the profile's decision, and a profile may allow only one of them.

What the token signs. The host streams the artifact (it never keeps it), hashes it as the
signature type requires, and appends the hashed trailer it fixed itself when the request
arrived: signature type, public-key and hash algorithm, and the hashed subpackets (signature
creation time, issuer fingerprint). The SHA-256 of that is the one digest the token signs, and
it goes into the log and into a custodian's statement (`openpgp=...`) with every value of the
trailer, so `signer approve --artifact` recomputes it from the custodian's own copy. No client
ever chooses a byte of the trailer: a signing oracle over client-chosen digests would also sign
certifications (type 0x13, a key of the attacker's bound to our key) or key bindings.

Why v4: gpgv 2.2 (Debian 12) and apt read v4 only; v6 keys need GnuPG-incompatible tooling.
Why no library: the kept Python OpenPGP libraries (PGPy, unmaintained; pysequoia, not in the
host's locked requirements) sign with private keys they hold. The packets below are the few
RFC 9580 needs for a signature, a public key, a user ID and its self-signature; gpgv and sqv,
in the tests, are the judges. RSA PKCS#1 v1.5 and ECDSA P-256 only: no PSS in OpenPGP v4, and
the tokens here offer no Ed25519 (signer.algorithms).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from signer.algorithms import Algorithm
from signer.formats.base import Context, Format, FormatError, Job

PUBKEY_RSA = 1
PUBKEY_ECDSA = 19
HASH_SHA256 = 8
SIG_BINARY = 0x00
SIG_TEXT = 0x01
SIG_POSITIVE_CERT = 0x13
P256_OID = bytes.fromhex("2a8648ce3d030107")
# Subpacket types
SUB_CREATED = 2
SUB_ISSUER = 16
SUB_PREFERRED_HASH = 21
SUB_KEY_FLAGS = 27
SUB_ISSUER_FPR = 33
KEY_FLAGS_CERTIFY_SIGN = 0x03
# Packet tags
TAG_SIGNATURE = 2
TAG_PUBLIC_KEY = 6
TAG_USER_ID = 13
ALGORITHMS = {"rsa3072-pkcs1": PUBKEY_RSA, "ecdsa-p256": PUBKEY_ECDSA}
TYPES = {"binary": SIG_BINARY, "text": SIG_TEXT}
FIELD = "openpgp"  # the log's and the statement's field (signer.policy.FORMAT_FIELDS)


class OpenPGPError(FormatError):
    """A key, a field or a request the openpgp format cannot use."""


# --- packets -----------------------------------------------------------------------------------

def mpi(value: int) -> bytes:
    """RFC 9580 3.2: bit count, then the big-endian bytes without leading zeros."""
    return value.bit_length().to_bytes(2, "big") + value.to_bytes((value.bit_length() + 7) // 8,
                                                                   "big")


def packet(tag: int, body: bytes) -> bytes:
    """A packet with an OpenPGP (new) format header (RFC 9580 4.2.1)."""
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        n -= 192
        length = bytes([(n >> 8) + 192, n & 0xFF])
    else:
        length = b"\xff" + n.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def subpacket(kind: int, data: bytes) -> bytes:
    n = len(data) + 1
    if n >= 192:
        raise OpenPGPError("subpacket too long")
    return bytes([n, kind]) + data


@dataclass(frozen=True)
class PublicKey:
    """A v4 primary key: its creation time is part of what the fingerprint hashes, so it is a
    fixed value of the profile (`openpgp_created`), never the time a certificate is made."""

    created: int
    algorithm: int  # PUBKEY_RSA or PUBKEY_ECDSA
    material: bytes  # the algorithm-specific fields

    @property
    def body(self) -> bytes:
        return b"\x04" + self.created.to_bytes(4, "big") + bytes([self.algorithm]) + self.material

    @property
    def fingerprint(self) -> bytes:
        body = self.body
        # SHA-1 is what a v4 fingerprint is (RFC 9580 5.5.4.2): a name, not a signature's hash
        return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body,
                            usedforsecurity=False).digest()

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]


def public_key(spki_der: bytes, created: int) -> PublicKey:
    """The token key's public half as an OpenPGP v4 key created at `created`."""
    key = load_der_public_key(spki_der)
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return PublicKey(created, PUBKEY_RSA, mpi(numbers.n) + mpi(numbers.e))
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        point = key.public_numbers()
        q = b"\x04" + point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
        return PublicKey(created, PUBKEY_ECDSA,
                         bytes([len(P256_OID)]) + P256_OID + mpi(int.from_bytes(q, "big")))
    raise OpenPGPError("only RSA and ECDSA P-256 keys can make OpenPGP signatures here")


@dataclass(frozen=True)
class Trailer:
    """The signature's fields before the data's hash: all fixed by the host."""

    sig_type: int
    algorithm: int
    hashed: bytes  # the hashed subpacket area

    @property
    def prefix(self) -> bytes:
        """Version to hashed subpackets: the start of the signature packet, also hashed."""
        return (bytes([4, self.sig_type, self.algorithm, HASH_SHA256])
                + len(self.hashed).to_bytes(2, "big") + self.hashed)

    @property
    def hashed_trailer(self) -> bytes:
        """What follows the data in the hash (RFC 9580 5.2.4, v4)."""
        prefix = self.prefix
        return prefix + b"\x04\xff" + len(prefix).to_bytes(4, "big")


def document_trailer(sig_type: int, algorithm: int, created: int, fingerprint: bytes) -> Trailer:
    """A document signature's hashed subpackets: creation time and issuer fingerprint."""
    return Trailer(sig_type, algorithm,
                   subpacket(SUB_CREATED, created.to_bytes(4, "big"))
                   + subpacket(SUB_ISSUER_FPR, b"\x04" + fingerprint))


def signature_packet(trailer: Trailer, key_id: bytes, digest: bytes, token_signature: bytes
                     ) -> bytes:
    """The signature packet around the token's signature of `digest` (as signer.algorithms
    encodes it: the bare RSA signature, a DER ECDSA-Sig-Value)."""
    if trailer.algorithm == PUBKEY_RSA:
        values = mpi(int.from_bytes(token_signature, "big"))
    else:
        r, s = decode_dss_signature(token_signature)
        values = mpi(r) + mpi(s)
    unhashed = subpacket(SUB_ISSUER, key_id)  # for verifiers older than the fingerprint
    return packet(TAG_SIGNATURE, trailer.prefix + len(unhashed).to_bytes(2, "big") + unhashed
                  + digest[:2] + values)


def certificate(key: PublicKey, user_id: str, created: int,
                sign_digest: Callable[[bytes], bytes]) -> bytes:
    """The transferable public key: the primary key, one user ID and its positive
    certification, made by the token (`sign_digest`) at `created`."""
    if created < key.created:
        raise OpenPGPError("the self-signature cannot be older than the key "
                           "(openpgp_created is in the future)")
    uid = user_id.encode("utf-8")
    trailer = Trailer(SIG_POSITIVE_CERT, key.algorithm,
                      subpacket(SUB_CREATED, created.to_bytes(4, "big"))
                      + subpacket(SUB_KEY_FLAGS, bytes([KEY_FLAGS_CERTIFY_SIGN]))
                      + subpacket(SUB_PREFERRED_HASH, bytes([HASH_SHA256]))
                      + subpacket(SUB_ISSUER_FPR, b"\x04" + key.fingerprint))
    body = key.body
    digest = hashlib.sha256(b"\x99" + len(body).to_bytes(2, "big") + body
                            + b"\xb4" + len(uid).to_bytes(4, "big") + uid
                            + trailer.hashed_trailer).digest()
    return (packet(TAG_PUBLIC_KEY, body) + packet(TAG_USER_ID, uid)
            + signature_packet(trailer, key.key_id, digest, sign_digest(digest)))


# --- armour and the cleartext framework -----------------------------------------------------

def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(data: bytes, kind: str = "SIGNATURE") -> bytes:
    """ASCII armour (RFC 9580 6.2), with the CRC24 line older verifiers still expect."""
    b64 = base64.b64encode(data).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    crc = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode("ascii")
    return (f"-----BEGIN PGP {kind}-----\n\n" + "\n".join(lines) + f"\n={crc}\n"
            f"-----END PGP {kind}-----\n").encode("ascii")


def _lines(text: bytes) -> list[bytes]:
    """The cleartext's lines: trailing whitespace removed, the framework's last line ending
    not a line of its own."""
    lines = [line.rstrip(b" \t\r") for line in text.split(b"\n")]
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def cleartext(text: bytes, signature: bytes) -> bytes:
    """The cleartext-signed message (InRelease): the text, dash-escaped, and the armoured
    signature the host made over it."""
    body = b"".join((b"- " + line if line.startswith(b"-") else line) + b"\n"
                    for line in _lines(text))
    return b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n" + body + armor(signature)


class _Canonical:
    """Hashes a stream as the cleartext framework reads it (RFC 9580 7.2), whatever the
    chunks: CRLF between lines, trailing spaces, tabs and CRs removed, no last line ending.
    Only a run of blanks that may turn out to be trailing is held back, not the line."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.first = True  # no line started yet
        self.in_line = False  # the current line's separator is hashed
        self.blanks = b""  # blanks after the current line's last content, not yet hashed

    def _start_line(self) -> None:
        if not self.first:
            self.h.update(b"\r\n")
        self.first = False
        self.in_line = True

    def _text(self, part: bytes) -> None:
        content = part.rstrip(b" \t\r")
        if content:
            if not self.in_line:
                self._start_line()
            self.h.update(self.blanks + content)
            self.blanks = part[len(content):]
        else:
            self.blanks += part

    def update(self, chunk: bytes | memoryview) -> None:
        *complete, rest = bytes(chunk).split(b"\n")
        for part in complete:
            self._text(part)
            if not self.in_line:  # an empty line is a line too
                self._start_line()
            self.in_line = False
            self.blanks = b""
        self._text(rest)

    def digest_with(self, trailer: bytes) -> bytes:
        # a last line of blanks only is the framework's line ending (`_lines`)
        self.h.update(trailer)
        return self.h.digest()


class _Binary:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def update(self, chunk: bytes | memoryview) -> None:
        self.h.update(chunk)

    def digest_with(self, trailer: bytes) -> bytes:
        self.h.update(trailer)
        return self.h.digest()


# --- the request's field: what is logged, approved and signed --------------------------------

def _time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class Request:
    """The `openpgp` field: `v4 TYPE ALG created=TIME fpr=HEX sha256:DIGEST` (DIGEST: the hash
    of the data and the trailer, the one value the token signs)."""

    sig_type: str  # binary | text
    algorithm: str  # a profile algorithm (ALGORITHMS)
    created: int
    fingerprint: bytes
    digest: bytes

    @property
    def trailer(self) -> Trailer:
        return document_trailer(TYPES[self.sig_type], ALGORITHMS[self.algorithm],
                                self.created, self.fingerprint)

    def field(self) -> str:
        return (f"v4 {self.sig_type} {self.algorithm} created={_time(self.created)} "
                f"fpr={self.fingerprint.hex().upper()} sha256:{self.digest.hex()}")

    @classmethod
    def parse(cls, text: str) -> Request:
        try:
            version, sig_type, algorithm, created, fpr, digest = text.split(" ")
            if (version != "v4" or sig_type not in TYPES or algorithm not in ALGORITHMS
                    or not created.startswith("created=") or not fpr.startswith("fpr=")
                    or not digest.startswith("sha256:")):
                raise ValueError(text)
            out = cls(sig_type, algorithm, _epoch(created[8:]), bytes.fromhex(fpr[4:]),
                      bytes.fromhex(digest[7:]))
        except ValueError:
            raise OpenPGPError(f"not an openpgp request field: {text[:120]!r}") from None
        if len(out.fingerprint) != 20 or len(out.digest) != 32:
            raise OpenPGPError("bad fingerprint or digest length in the openpgp field")
        return out


def digest_file(chunks: Iterable[bytes], sig_type: str, trailer: Trailer) -> bytes:
    """What the token signs for this data (client side and custodians: recompute)."""
    hasher = _Canonical() if sig_type == "text" else _Binary()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest_with(trailer.hashed_trailer)


def recompute(field: str, chunks: Iterable[bytes]) -> Request:
    """A custodian's check: the field with the digest recomputed from their own copy."""
    req = Request.parse(field)
    return Request(req.sig_type, req.algorithm, req.created, req.fingerprint,
                   digest_file(chunks, req.sig_type, req.trailer))


class _Stream:
    def __init__(self, sig_type: str, ctx: Context) -> None:
        if ctx.key_created is None:
            raise OpenPGPError("the profile has no openpgp_created (the key's OpenPGP "
                               "creation time)")
        if ctx.alg.name not in ALGORITHMS:
            raise OpenPGPError(f"{ctx.alg.name} cannot make OpenPGP v4 signatures")
        self.sig_type = sig_type
        self.alg = ctx.alg
        self.key = public_key(ctx.public_key, ctx.key_created)
        self.created = max(ctx.now, self.key.created)
        self.hasher = _Canonical() if sig_type == "text" else _Binary()

    def update(self, chunk: bytes | memoryview) -> None:
        self.hasher.update(chunk)

    def fields(self) -> Mapping[str, str]:
        trailer = document_trailer(TYPES[self.sig_type], ALGORITHMS[self.alg.name],
                                   self.created, self.key.fingerprint)
        digest = self.hasher.digest_with(trailer.hashed_trailer)
        return {FIELD: Request(self.sig_type, self.alg.name, self.created,
                               self.key.fingerprint, digest).field()}


def sign(req: Request, alg: Algorithm, sign_digest: Callable[[bytes], bytes]) -> bytes:
    if req.algorithm != alg.name:
        raise OpenPGPError(f"request for {req.algorithm}, profile key is {alg.name}")
    return signature_packet(req.trailer, req.fingerprint[-8:], req.digest,
                            sign_digest(req.digest))


def _sign_job(job: Job) -> bytes:
    return sign(Request.parse(job.extra[FIELD]), job.alg, job.sign_digest)


FORMAT = Format(name="openpgp", keep=0, needs_cert=False,
                algorithms=tuple(ALGORITHMS), sign=_sign_job,
                stream=lambda ctx: _Stream("binary", ctx))
CLEARTEXT = Format(name="openpgp-cleartext", keep=0, needs_cert=False,
                   algorithms=tuple(ALGORITHMS), sign=_sign_job,
                   stream=lambda ctx: _Stream("text", ctx))
