"""`authenticode`: Windows code signing (PE files, and scripts/MSI through their SIP) without the
binary ever reaching the host.

The build server runs `osslsigncode extract-data -h sha256 -in app.exe -out app.req` (a few
hundred bytes whatever the size of app.exe) and sends that file; the host checks it, signs it
and returns the PKCS#7 SignedData that `osslsigncode attach-signature` puts into the file. A
timestamp is added by the build server afterwards (`osslsigncode add -ts URL`): it is an
unsigned attribute, so the host never talks to a TSA and its egress stays closed.

What the host signs is the SpcIndirectDataContent in that request: a subject type (PE image,
SIP-handled file, cabinet) and the Authenticode digest of the file. That digest is all the host
can know about the binary; it is what the audit log, the approval statement and `signer approve
--artifact` (which recomputes it) are about. Why osslsigncode and not a Python library: it is
in Debian, maintained, and implements the hashing rules of every format Windows signs (PE
checksum and certificate-table gaps, MSI streams, script encodings); a Python reimplementation
would be a second, less tested source of truth for exactly the part that decides what a
signature covers. The host needs none of it: it only parses this small DER with asn1crypto.

Only SHA-256 is accepted (the token path signs SHA-256 digests; SHA-1 and MD5 Authenticode are
broken), and only the request form osslsigncode writes: a SignedData without signers,
certificates or CRLs, around exactly one SpcIndirectDataContent.

Page hashes (`extract-data -ph`) are refused, before anything is signed or queued. They sit in
the signed content next to the file's digest (an SpcSerializedObject in SpcPeImageData), but
nothing on this host or in `signer approve --artifact` recomputes them: custodians approve the
file's Authenticode digest, and a request could carry that digest with another file's page
hashes (which Windows checks page by page as it loads the image). Supporting them would mean
the custodians' tool recomputing every page hash and comparing the whole content; refusing
keeps what is signed equal to what is approved, at the cost of a feature most signing
pipelines leave off (signtool only adds them with /ph).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from asn1crypto import algos, cms, core, x509

from signer.algorithms import Algorithm
from signer.formats.base import Format, FormatError, Job

MAX_REQUEST = 8 * 1024  # an extract-data file (no page hashes: refused) is about 150 bytes

SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
SPC_STATEMENT_TYPE = "1.3.6.1.4.1.311.2.1.11"
SPC_SP_OPUS_INFO = "1.3.6.1.4.1.311.2.1.12"
SPC_INDIVIDUAL_CODE_SIGNING = "1.3.6.1.4.1.311.2.1.21"
# The subject types a request may name (SpcAttributeTypeAndOptionalValue.type)
SUBJECTS = {
    "1.3.6.1.4.1.311.2.1.15": "pe",  # SPC_PE_IMAGE_DATA: EXE, DLL, SYS
    "1.3.6.1.4.1.311.2.1.30": "sip",  # SPC_SIPINFO: MSI, PowerShell and other scripts
    "1.3.6.1.4.1.311.2.1.25": "cab",  # SPC_CAB_DATA
}
DIGESTS = {"sha256": 32}
# SpcSerializedObject.classId of the page hashes (SPC_PE_IMAGE_PAGE_HASHES_V1/V2 inside it)
PAGE_HASHES_CLASS_ID = bytes.fromhex("a6b586d5b4a12466ae05a217da8e60d6")
NO_PAGE_HASHES = ("page hashes (extract-data -ph) are not supported: custodians approve the "
                  "file's Authenticode digest, not its page hashes; extract without -ph")


class AuthenticodeError(FormatError):
    """The request is not a well-formed Authenticode content this host signs."""


class _TypeAndValue(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("type", core.ObjectIdentifier),
                                    ("value", core.Any, {"optional": True})]


class _SpcString(core.Choice):  # type: ignore[misc]  # asn1crypto: untyped
    _alternatives: ClassVar[list[Any]] = [("unicode", core.BMPString, {"implicit": 0}),
                                          ("ascii", core.IA5String, {"implicit": 1})]


class _SpcSerializedObject(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("class_id", core.OctetString),
                                    ("serialized_data", core.OctetString)]


class _SpcLink(core.Choice):  # type: ignore[misc]  # asn1crypto: untyped
    _alternatives: ClassVar[list[Any]] = [
        ("url", core.IA5String, {"implicit": 0}),
        ("moniker", _SpcSerializedObject, {"implicit": 1}),
        ("file", _SpcString, {"explicit": 2})]


class _SpcPeImageData(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("flags", core.BitString, {"optional": True}),
                                    ("file", _SpcLink, {"explicit": 0, "optional": True})]


class _DigestInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("digest_algorithm", algos.DigestAlgorithm),
                                    ("digest", core.OctetString)]


class SpcIndirectDataContent(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("data", _TypeAndValue), ("message_digest", _DigestInfo)]


class _Encap(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("content_type", core.ObjectIdentifier),
                                    ("content", SpcIndirectDataContent, {"explicit": 0})]


class _SignedData(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    # cms.SignedData would not know the encapsulated type; the layout is RFC 5652's.
    _fields: ClassVar[list[Any]] = [
        ("version", cms.CMSVersion),
        ("digest_algorithms", cms.DigestAlgorithms),
        ("encap_content_info", _Encap),
        ("certificates", cms.CertificateSet, {"implicit": 0, "optional": True}),
        ("crls", cms.RevocationInfoChoices, {"implicit": 1, "optional": True}),
        ("signer_infos", cms.SignerInfos)]


class _ContentInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto: untyped
    _fields: ClassVar[list[Any]] = [("content_type", cms.ContentType),
                                    ("content", _SignedData, {"explicit": 0})]


@dataclass(frozen=True)
class Content:
    """A checked request: what is signed and what the log and the approval statement show."""

    der: SpcIndirectDataContent
    subject: str  # pe | sip | cab
    digest_algorithm: str
    digest: bytes

    @property
    def label(self) -> str:
        """The Authenticode digest as logged and shown to custodians: `sha256:<hex>`."""
        return f"{self.digest_algorithm}:{self.digest.hex()}"


def parse(request: bytes) -> Content:
    """Check an `osslsigncode extract-data` request; AuthenticodeError says what is wrong."""
    if len(request) > MAX_REQUEST:
        raise AuthenticodeError(f"request larger than {MAX_REQUEST} bytes (page hashes, -ph, "
                                "are not supported)")
    try:
        info = _ContentInfo.load(request, strict=True)
        if info["content_type"].native != "signed_data":
            raise AuthenticodeError("not a PKCS#7 SignedData (want the output of "
                                    "`osslsigncode extract-data`)")
        sd = info["content"]
        if sd["signer_infos"] or sd["certificates"].native or sd["crls"].native:
            raise AuthenticodeError("the request already carries signers, certificates or "
                                    "CRLs")
        encap = sd["encap_content_info"]
        ctype = encap["content_type"].dotted
        if ctype != SPC_INDIRECT_DATA:
            raise AuthenticodeError(f"content type {ctype} is not SpcIndirectDataContent "
                                    f"({SPC_INDIRECT_DATA})")
        spc = encap["content"]
        subject = SUBJECTS.get(spc["data"]["type"].dotted)
        if subject is None:
            raise AuthenticodeError(f"subject type {spc['data']['type'].dotted} is not a PE "
                                    "image, SIP or cabinet")
        _no_page_hashes(subject, spc["data"]["value"])
        alg = spc["message_digest"]["digest_algorithm"]
        name = alg["algorithm"].native
        if name not in DIGESTS:
            raise AuthenticodeError(f"digest algorithm {name} is not supported (only "
                                    f"{', '.join(DIGESTS)}: extract with -h sha256)")
        if alg["parameters"].native is not None:
            raise AuthenticodeError("digest algorithm parameters must be NULL or absent")
        digest = bytes(spc["message_digest"]["digest"].native)
        if len(digest) != DIGESTS[name]:
            raise AuthenticodeError(f"a {name} digest is {DIGESTS[name]} bytes, not "
                                    f"{len(digest)}")
    except AuthenticodeError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise AuthenticodeError(f"not a well-formed Authenticode request: {exc}") from None
    return Content(der=SpcIndirectDataContent.load(spc.untag().dump()), subject=subject,
                   digest_algorithm=name, digest=digest)


def _no_page_hashes(subject: str, value: core.Any) -> None:
    """Refuse page hashes (see the module's docstring): a PE's SpcPeImageData may name its
    file only as osslsigncode and signtool do without them (no moniker), and no subject's
    data may hold the page hashes' class id anywhere."""
    der = bytes(value.dump()) if isinstance(value, core.Any) else b""  # absent: core.Void
    if PAGE_HASHES_CLASS_ID in der:
        raise AuthenticodeError(NO_PAGE_HASHES)
    if subject == "pe" and der:
        data = _SpcPeImageData.load(der, strict=True)
        link = data["file"]
        if link.native is not None and link.name == "moniker":
            raise AuthenticodeError(NO_PAGE_HASHES)


def _attr(oid: str, value_der: bytes) -> cms.CMSAttribute:
    return cms.CMSAttribute({"type": oid, "values": [core.Any.load(value_der)]})


def _sequence(*items: core.Asn1Value) -> bytes:
    body = b"".join(i.dump() for i in items)
    return bytes(core.Sequence.load(b"\x30" + bytes([len(body)]) + body).dump())


def sign(content: Content, cert: x509.Certificate, chain: Sequence[x509.Certificate],
         alg: Algorithm, sign_digest: Callable[[bytes], bytes],
         when: datetime | None = None) -> bytes:
    """PKCS#7 SignedData as Authenticode wants it: SpcIndirectDataContent encapsulated, the
    signed attributes that signtool writes, the signer's certificate and its chain."""
    when = (when or datetime.now(UTC)).replace(microsecond=0)
    # Authenticode's messageDigest covers the content octets of the SpcIndirectDataContent,
    # without its SEQUENCE tag and length.
    message_digest = hashlib.sha256(content.der.contents).digest()
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": [SPC_INDIRECT_DATA]}),
        cms.CMSAttribute({"type": "signing_time",
                          "values": [cms.Time({"utc_time": when})]}),
        _attr(SPC_SP_OPUS_INFO, _sequence()),  # SpcSpOpusInfo: no program name, no URL
        _attr(SPC_STATEMENT_TYPE, _sequence(core.ObjectIdentifier(SPC_INDIVIDUAL_CODE_SIGNING))),
        cms.CMSAttribute({"type": "message_digest", "values": [message_digest]}),
    ])
    signature = sign_digest(hashlib.sha256(attrs.dump()).digest())
    # RSA: rsaEncryption as signtool writes it (the digest algorithm is the SignerInfo's).
    sig_alg = alg.signed_digest_algorithm()
    if sig_alg["algorithm"].native == "sha256_rsa":
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15",
                                               "parameters": core.Null()})
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": cert.issuer, "serial_number": cert.serial_number})}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256",
                                                   "parameters": core.Null()}),
        "signed_attrs": attrs,
        "signature_algorithm": sig_alg,
        "signature": signature,
    })
    signed = _SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256",
                                                     "parameters": core.Null()})],
        "encap_content_info": {"content_type": SPC_INDIRECT_DATA, "content": content.der},
        "certificates": [cms.CertificateChoices({"certificate": c}) for c in (cert, *chain)],
        "signer_infos": [signer_info],
    })
    return bytes(_ContentInfo({"content_type": "signed_data", "content": signed}).dump())


def _check(request: bytes) -> dict[str, str]:
    return {"authenticode": parse(request).label}


def _sign_job(job: Job) -> bytes:
    assert job.cert is not None
    return sign(parse(job.body), job.cert, job.chain, job.alg, job.sign_digest)


# RSA PKCS#1 v1.5 (what EV certificates and every Windows version take) and ECDSA (Windows 10
# and later); no PSS: Windows does not verify RSA-PSS Authenticode signatures.
FORMAT = Format(name="authenticode", keep=MAX_REQUEST, needs_cert=True,
                algorithms=("rsa3072-pkcs1", "rsa2048-pkcs1", "ecdsa-p256"), sign=_sign_job,
                check=_check)
