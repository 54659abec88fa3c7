"""The signature algorithms a profile can use, in the three vocabularies that meet here: the
token's (PKCS#11 mechanism), the wire's (DER encodings that openssl reads) and the verifier's
(cryptography).

Everything signs a SHA-256 digest computed by the daemon while the artifact streams in, so the
token only ever sees 32 bytes (or the DigestInfo around them): memory stays flat for any size, and
one code path serves `raw`, `cms` (whose signed attributes are hashed the same way), certificates,
CSRs and audit checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, core
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import MGF, KeyType, Mechanism

# DER prefix of DigestInfo { sha256, NULL } (RFC 8017, section 9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass(frozen=True)
class Algorithm:
    name: str
    key_type: KeyType
    bits: int

    @property
    def mechanism(self) -> tuple[Mechanism, Any]:
        if self.key_type == KeyType.EC:
            return Mechanism.ECDSA, None
        if self.name.endswith("-pss"):
            return Mechanism.RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32)
        return Mechanism.RSA_PKCS, None

    def token_input(self, digest: bytes) -> bytes:
        """What the token signs for this SHA-256 digest."""
        if len(digest) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")
        if self.key_type == KeyType.RSA and not self.name.endswith("-pss"):
            return _SHA256_DIGEST_INFO + digest
        return digest

    def encode(self, token_signature: bytes) -> bytes:
        """The token's output as openssl expects it: ECDSA r||s becomes a DER ECDSA-Sig-Value."""
        if self.key_type == KeyType.EC:
            half = len(token_signature) // 2
            return encode_dss_signature(int.from_bytes(token_signature[:half], "big"),
                                        int.from_bytes(token_signature[half:], "big"))
        return token_signature

    def signed_digest_algorithm(self) -> algos.SignedDigestAlgorithm:
        """The AlgorithmIdentifier for CMS SignerInfo, X.509 and PKCS#10."""
        if self.key_type == KeyType.EC:
            return algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
        if self.name.endswith("-pss"):
            return algos.SignedDigestAlgorithm({
                "algorithm": "rsassa_pss",
                "parameters": algos.RSASSAPSSParams({
                    "hash_algorithm": {"algorithm": "sha256"},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": "sha256"},
                    },
                    "salt_length": 32,
                }),
            })
        return algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa", "parameters": core.Null()})


ECDSA_P256 = Algorithm("ecdsa-p256", KeyType.EC, 256)
RSA3072_PKCS1 = Algorithm("rsa3072-pkcs1", KeyType.RSA, 3072)
RSA3072_PSS = Algorithm("rsa3072-pss", KeyType.RSA, 3072)
# Pre-provisioned keys on cards (PIV, CAC, most EV tokens) are RSA-2048: the size they make.
RSA2048_PKCS1 = Algorithm("rsa2048-pkcs1", KeyType.RSA, 2048)
BY_NAME = {a.name: a for a in (ECDSA_P256, RSA3072_PKCS1, RSA3072_PSS, RSA2048_PKCS1)}


def verify_digest(spki_der: bytes, signature: bytes, digest: bytes, pss: bool) -> bool:
    """Check a signature over a SHA-256 digest with a DER SubjectPublicKeyInfo."""
    key = load_der_public_key(spki_der)
    prehashed = Prehashed(hashes.SHA256())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(prehashed))
        elif isinstance(key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO) if pss
                else padding.PKCS1v15())
            key.verify(signature, digest, pad, prehashed)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def is_pss(alg: algos.SignedDigestAlgorithm) -> bool:
    return bool(alg["algorithm"].native == "rsassa_pss")
