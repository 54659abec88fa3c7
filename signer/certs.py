"""Certificates and CSRs signed by a token key (asn1crypto builds them, the token signs the
SHA-256 of the to-be-signed part), and the checks that a certificate belongs to a key."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asn1crypto import csr, keys, pem, x509

from signer.algorithms import Algorithm
from signer.errors import Exit, SignerError


def _time(when: datetime) -> x509.Time:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
    return x509.Time({"utc_time" if when.year < 2050 else "general_time": when})


_DN_KEYS = {"CN": "common_name", "O": "organization_name", "OU": "organizational_unit_name",
            "C": "country_name", "L": "locality_name", "ST": "state_or_province_name",
            "EMAILADDRESS": "email_address", "E": "email_address"}


def _name(subject: str) -> x509.Name:
    """`CN=signer dev, O=Example` (RFC 4514 order, no escapes) or a bare common name."""
    if "=" not in subject:
        return x509.Name.build({"common_name": subject})
    attrs: dict[str, str] = {}
    for part in subject.split(","):
        key, _sep, value = part.partition("=")
        name = _DN_KEYS.get(key.strip().upper())
        if name is None or not value.strip():
            raise SignerError(Exit.USAGE, f"subject {subject!r}: unknown or empty attribute "
                              f"{key.strip()!r} (use CN, O, OU, C, L, ST, emailAddress)")
        attrs[name] = value.strip()
    return x509.Name.build(attrs)


def self_signed(spki: keys.PublicKeyInfo, alg: Algorithm, sign_digest: Callable[[bytes], bytes],
                subject: str, days: int) -> x509.Certificate:
    """A self-signed leaf for a dev profile or the audit key: digitalSignature only, no EKU (so
    that `openssl cms -verify` accepts it for its default S/MIME purpose), not a CA."""
    now = datetime.now(UTC).replace(microsecond=0)
    ski = hashlib.sha1(spki["public_key"].contents, usedforsecurity=False).digest()
    tbs = x509.TbsCertificate({
        "version": "v3",
        "serial_number": secrets.randbits(127) | 1,
        "signature": alg.signed_digest_algorithm(),
        "issuer": _name(subject),
        "validity": {"not_before": _time(now - timedelta(minutes=5)),
                     "not_after": _time(now + timedelta(days=days))},
        "subject": _name(subject),
        "subject_public_key_info": spki,
        "extensions": [
            {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
            {"extn_id": "key_usage", "critical": True,
             "extn_value": {"digital_signature", "non_repudiation"}},
            {"extn_id": "key_identifier", "critical": False, "extn_value": ski},
        ],
    })
    signature = sign_digest(hashlib.sha256(tbs.dump()).digest())
    return x509.Certificate({"tbs_certificate": tbs,
                             "signature_algorithm": alg.signed_digest_algorithm(),
                             "signature_value": signature})


def request(spki: keys.PublicKeyInfo, alg: Algorithm, sign_digest: Callable[[bytes], bytes],
            subject: str) -> csr.CertificationRequest:
    info = csr.CertificationRequestInfo({
        "version": "v1", "subject": _name(subject), "subject_pk_info": spki, "attributes": []})
    signature = sign_digest(hashlib.sha256(info.dump()).digest())
    return csr.CertificationRequest({"certification_request_info": info,
                                     "signature_algorithm": alg.signed_digest_algorithm(),
                                     "signature": signature})


def to_pem(obj: x509.Certificate | csr.CertificationRequest) -> bytes:
    kind = "CERTIFICATE" if isinstance(obj, x509.Certificate) else "CERTIFICATE REQUEST"
    return bytes(pem.armor(kind, obj.dump()))


def load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
        if pem.detect(data):
            _kind, _headers, data = pem.unarmor(data)
        cert = x509.Certificate.load(data)
        cert.native  # noqa: B018  (parse it all now: asn1crypto is lazy)
    except OSError as exc:
        raise SignerError(Exit.CONFIG, f"{path}: cannot read certificate: "
                          f"{exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SignerError(Exit.CONFIG, f"{path}: not a certificate: {exc}") from None
    return cert


def load_public_key(path: Path) -> bytes:
    """DER SubjectPublicKeyInfo from a PEM/DER public key or certificate file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignerError(Exit.USAGE, f"{path}: cannot read: {exc.strerror}") from None
    kind = None
    if pem.detect(data):
        kind, _headers, data = pem.unarmor(data)
    try:
        if kind == "CERTIFICATE":
            return bytes(x509.Certificate.load(data).public_key.dump())
        spki = keys.PublicKeyInfo.load(data)
        spki.native  # noqa: B018
        return bytes(spki.dump())
    except (ValueError, TypeError) as exc:
        raise SignerError(Exit.USAGE, f"{path}: not a public key or certificate: {exc}") \
            from None


def matches(cert: x509.Certificate, spki: keys.PublicKeyInfo) -> bool:
    return bool(cert.public_key.dump() == spki.dump())


def load_chain(path: Path) -> tuple[x509.Certificate, ...]:
    """The CA certificates (PEM, issuer after subject) sent with a profile's signatures."""
    try:
        data = path.read_bytes()
        chain = tuple(x509.Certificate.load(der) for _k, _h, der in pem.unarmor(data, True))
        for cert in chain:
            cert.native  # noqa: B018
    except OSError as exc:
        raise SignerError(Exit.CONFIG, f"{path}: cannot read certificate chain: "
                          f"{exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SignerError(Exit.CONFIG, f"{path}: not a PEM certificate chain: {exc}") from None
    if not chain:
        raise SignerError(Exit.CONFIG, f"{path}: no certificate in the chain file")
    return chain
