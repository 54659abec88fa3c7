"""`raw`: the token's signature over the artifact's SHA-256, as `openssl dgst -sha256 -verify`
reads it (DER ECDSA-Sig-Value for ECDSA, the bare RSA signature otherwise)."""

from __future__ import annotations

from collections.abc import Callable

from signer.algorithms import verify_digest
from signer.formats.base import Format


def sign(digest: bytes, sign_digest: Callable[[bytes], bytes]) -> bytes:
    return sign_digest(digest)


def verify(digest: bytes, signature: bytes, spki_der: bytes, pss: bool) -> bool:
    return verify_digest(spki_der, signature, digest, pss)


FORMAT = Format(name="raw", keep=0, needs_cert=False,
                algorithms=("ecdsa-p256", "rsa3072-pkcs1", "rsa3072-pss", "rsa2048-pkcs1"),
                sign=lambda job: sign(job.digest, job.sign_digest))
