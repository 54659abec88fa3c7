"""The one interface every signature format implements (autograph's per-format signers): the
daemon and the client look a format up in `signer.formats.REGISTRY` and never branch on its
name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from asn1crypto import x509

from signer.algorithms import Algorithm


class FormatError(ValueError):
    """A request body that the format refuses to sign (the message says why, in one line)."""


@dataclass(frozen=True)
class Job:
    """Everything a format may use to produce a signature."""

    digest: bytes  # SHA-256 of the request body, computed while it streamed in
    body: bytes  # the body itself for formats that keep it (`Format.keep`), else b""
    cert: x509.Certificate | None
    chain: tuple[x509.Certificate, ...]
    alg: Algorithm
    sign_digest: Callable[[bytes], bytes]  # the token, for one SHA-256 digest
    # The fields `check` or the stream gave, as logged (and approved, for a queued request)
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a format that hashes the stream itself (`Format.stream`) knows before the body
    arrives: the values it fixes then are the ones the log, the approval and the signature
    carry."""

    public_key: bytes  # the profile key's SubjectPublicKeyInfo, DER (from the token)
    alg: Algorithm
    key_created: int | None  # the profile's `openpgp_created` (epoch seconds)
    now: int  # the host's time, epoch seconds


class Digester(Protocol):
    def update(self, chunk: bytes | memoryview) -> None: ...

    def fields(self) -> Mapping[str, str]: ...


def no_check(_body: bytes) -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class Format:
    name: str
    # Bytes of the request the daemon keeps for `check` and `sign` (0: the body is only
    # streamed and hashed, whatever its size; the profile's max_size bounds it).
    keep: int
    needs_cert: bool
    algorithms: tuple[str, ...]  # the profile algorithms the format can carry
    sign: Callable[[Job], bytes]
    # Checks a kept body; returns the fields the audit log and the approval statement show
    # besides the body's SHA-256 (FormatError when the body is not signable).
    check: Callable[[bytes], Mapping[str, str]] = no_check
    # A format that signs its own hash of the streamed body (openpgp: the data and a trailer
    # the host fixes) hashes every chunk too; its fields join `check`'s (log, statement, Job).
    stream: Callable[[Context], Digester] | None = None
