"""`cms`: detached CMS SignedData (RFC 5652), DER, as `openssl cms -verify -binary -inform DER
-content ARTIFACT` reads it.

Signed attributes (content type, signing time, message digest) are always present, so the token
signs the SHA-256 of the attributes and the artifact is only ever represented by its digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from asn1crypto import algos, cms, x509

from signer.algorithms import Algorithm, is_pss, verify_digest
from signer.formats.base import Format, Job


class CMSError(ValueError):
    pass


def _signed_attrs(digest: bytes, when: datetime) -> cms.CMSAttributes:
    # UTCTime up to 2049 as RFC 5652 11.3 requires; asn1crypto picks the encoding.
    return cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time",
                          "values": [cms.Time({"utc_time": when.replace(microsecond=0)})]}),
        cms.CMSAttribute({"type": "message_digest", "values": [digest]}),
    ])


def sign(digest: bytes, cert: x509.Certificate, alg: Algorithm,
         sign_digest: Callable[[bytes], bytes], when: datetime | None = None) -> bytes:
    attrs = _signed_attrs(digest, when or datetime.now(UTC))
    # The signature covers the DER of the attributes as a SET OF (tag 0x31), not as the
    # [0] IMPLICIT field they sit in (RFC 5652 5.4).
    signature = sign_digest(hashlib.sha256(attrs.dump()).digest())
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": cert.issuer, "serial_number": cert.serial_number})}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
        "signed_attrs": attrs,
        "signature_algorithm": alg.signed_digest_algorithm(),
        "signature": signature,
    })
    signed_data = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
        "encap_content_info": {"content_type": "data"},
        "certificates": [cms.CertificateChoices({"certificate": cert})],
        "signer_infos": [signer_info],
    })
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump())


def verify(digest: bytes, der: bytes, spki_der: bytes) -> None:
    """Check a detached SignedData against the artifact's digest and a trusted public key.
    Raises CMSError with the reason; returns when valid."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise CMSError("not a CMS SignedData")
        sd = info["content"]
        if sd["encap_content_info"]["content"].native is not None:
            raise CMSError("not a detached signature (the content is embedded)")
        infos = sd["signer_infos"]
        if len(infos) != 1:
            raise CMSError(f"{len(infos)} signers, expected 1")
        si = infos[0]
        if si["digest_algorithm"]["algorithm"].native != "sha256":
            raise CMSError("digest algorithm is not SHA-256")
        attrs = si["signed_attrs"]
        if not isinstance(attrs, cms.CMSAttributes) or not len(attrs):
            raise CMSError("no signed attributes")
        found: dict[str, object] = {}
        for attr in attrs:
            name = attr["type"].native
            if name in found or len(attr["values"]) != 1:
                raise CMSError(f"signed attribute {name} repeated")
            found[name] = attr["values"][0].native
        if found.get("content_type") != "data":
            raise CMSError("content type attribute is not id-data")
        if found.get("message_digest") != digest:
            raise CMSError("the artifact's digest does not match (wrong or modified file)")
        signed = b"\x31" + attrs.dump()[1:]
        alg = si["signature_algorithm"]
        if not verify_digest(spki_der, bytes(si["signature"]), hashlib.sha256(signed).digest(),
                             pss=is_pss(alg)):
            raise CMSError("signature does not verify with the given key")
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, CMSError):
            raise
        raise CMSError(f"not a valid CMS structure: {exc}") from None




def _sign_job(job: Job) -> bytes:
    assert job.cert is not None
    return sign(job.digest, job.cert, job.alg, job.sign_digest)


FORMAT = Format(name="cms", keep=0, needs_cert=True,
                algorithms=("ecdsa-p256", "rsa3072-pkcs1", "rsa3072-pss", "rsa2048-pkcs1"),
                sign=_sign_job)
