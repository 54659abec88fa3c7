"""RFC 3161 timestamps for detached CMS signatures, added on the build server (`signer submit
--timestamp URL`): the signing host has no network and never talks to a TSA.

The token (a TimeStampToken, itself a CMS SignedData from the TSA) covers the SHA-256 of the
SignerInfo's signature value and goes into the SignerInfo as the unsigned attribute
id-aa-signatureTimeStampToken (RFC 3161, appendix A), so it proves the signature existed at that
time without changing what the signature covers. What the TSA's answer must match (status,
imprint, nonce) is checked here; whether its certificate is trusted is the verifier's business
(`openssl ts -verify -CAfile ...`).
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.error
import urllib.request

from asn1crypto import algos, cms, tsp

from signer.errors import Exit, SignerError

MAX_REPLY = 1 << 20
TIMEOUT = 60.0


def request_token(url: str, digest: bytes, timeout: float = TIMEOUT) -> cms.ContentInfo:
    """A TimeStampToken for a SHA-256 digest from the TSA at `url` (HTTP POST, RFC 3161 3.4)."""
    if not url.startswith(("http://", "https://")):
        raise SignerError(Exit.USAGE, f"timestamp URL {url!r}: want http:// or https://")
    nonce = secrets.randbits(63)
    query = tsp.TimeStampReq({
        "version": "v1",
        "message_imprint": {"hash_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
                            "hashed_message": digest},
        "nonce": nonce,
        "cert_req": True,
    })
    req = urllib.request.Request(url, data=query.dump(), method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/timestamp-query"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
            body = resp.read(MAX_REPLY + 1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SignerError(Exit.UNAVAILABLE, f"timestamp authority {url}: {reason}") from None
    if len(body) > MAX_REPLY:
        raise SignerError(Exit.DATA, f"timestamp authority {url}: reply too large")
    try:
        reply = tsp.TimeStampResp.load(body)
        status = reply["status"]["status"].native
        if status not in ("granted", "granted_with_mods"):
            text = reply["status"]["status_string"].native
            raise SignerError(Exit.UNAVAILABLE, f"timestamp authority {url} refused: {status}"
                              f"{': ' + ' '.join(text) if text else ''}")
        token = reply["time_stamp_token"]
        info = token["content"]["encap_content_info"]["content"].parsed
        imprint = info["message_imprint"]
        if imprint["hash_algorithm"]["algorithm"].native != "sha256" \
                or imprint["hashed_message"].native != digest:
            raise SignerError(Exit.DATA, f"timestamp authority {url}: the token is for "
                              "another digest")
        if info["nonce"].native != nonce:
            raise SignerError(Exit.DATA, f"timestamp authority {url}: nonce mismatch (a "
                              "replayed or foreign reply)")
    except (ValueError, TypeError, KeyError) as exc:
        raise SignerError(Exit.DATA, f"timestamp authority {url}: not an RFC 3161 reply: "
                          f"{exc}") from None
    return token


def add_to_cms(der: bytes, url: str, timeout: float = TIMEOUT) -> bytes:
    """The detached CMS signature `der` with a timestamp token on its (single) SignerInfo."""
    try:
        info = cms.ContentInfo.load(der)
        sd = info["content"]
        (si,) = sd["signer_infos"]
        signature = bytes(si["signature"].native)
    except (ValueError, TypeError, KeyError) as exc:
        raise SignerError(Exit.DATA, f"not a CMS signature with one signer: {exc}") from None
    token = request_token(url, hashlib.sha256(signature).digest(), timeout)
    attrs = cms.CMSAttributes([cms.CMSAttribute({"type": "signature_time_stamp_token",
                                                 "values": [token]})])
    # Rebuilt from the parsed parts, which keep their original encoding: what the token signed
    # and the certificates stay byte for byte as they were.
    new_si = cms.SignerInfo({**{k: si[k] for k in ("version", "sid", "digest_algorithm",
                                                      "signed_attrs", "signature_algorithm",
                                                      "signature")},
                             "unsigned_attrs": attrs})
    fields = {k: sd[k] for k in ("version", "digest_algorithms", "encap_content_info",
                                 "certificates")}
    new_sd = cms.SignedData({**fields, "signer_infos": [new_si]})
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": new_sd}).dump())
