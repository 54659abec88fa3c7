"""The PKCS#11 token: find it, log in, check that keys are resident, sign digests, make keys.

The `keys` commands (run by an operator) use it directly; the daemon uses it inside its token
process (signer/tokenproc.py), which holds the one logged-in session, the "PKCS#11 session
holder" the design asks for. In one process, one session is shared by every thread:
python-pkcs11 serialises operations on a session.

One signature at a time, in any case: python-pkcs11 initialises the module with
`C_Initialize(NULL)`, which promises it no concurrent calls (SoftHSM2 then takes no locks of its
own, and two sessions signing at once in one process fail with CKR_GENERAL_ERROR). The daemon's
token process takes its requests one at a time, and orders them (a checkpoint before the
profiles' signatures waiting); the `keys` commands sign from one thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from asn1crypto import keys as asn1keys
from pkcs11 import Attribute, KeyType, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from signer.algorithms import Algorithm
from signer.errors import Exit, SignerError
from signer.uri import PKCS11URI

# Attributes a resident key must have, with the value it must have (issue 4, "Key protection").
RESIDENCY = (
    (Attribute.SENSITIVE, True),
    (Attribute.ALWAYS_SENSITIVE, True),
    (Attribute.NEVER_EXTRACTABLE, True),
    (Attribute.LOCAL, True),
    (Attribute.EXTRACTABLE, False),
)
P256_PARAMS = encode_named_curve_parameters("secp256r1")

# Errors that mean "the token went away", as opposed to "this operation was refused".
_GONE = (p11e.TokenNotPresent, p11e.TokenNotRecognised, p11e.DeviceRemoved, p11e.DeviceError,
         p11e.SessionClosed, p11e.SessionHandleInvalid, p11e.UserNotLoggedIn)


def _unavailable(label: str, exc: Exception) -> SignerError:
    return SignerError(Exit.UNAVAILABLE,
                       f"token {label!r} unavailable ({type(exc).__name__}): check that it is "
                       "plugged in, then restart the daemon")


def pin_tries(flags: int) -> tuple[str | None, str | None]:
    """(why not to try a PIN, a warning) from the token's flags (C_GetTokenInfo).

    A card counts wrong PINs and locks its user PIN after a few (3 on PIV and most EV tokens;
    then only the security officer, or nobody, can unlock it). The daemon never spends the
    last try: with CKF_USER_PIN_FINAL_TRY (or LOCKED) set, it refuses before C_Login, so a
    wrong PIN (a PIN changed since the ceremony, a mistyped one) can never lock the card.
    CKF_USER_PIN_COUNT_LOW (a wrong PIN was given since the last good one) is only a warning:
    refusing on it would leave a card that one mistyped `unlock` made unusable until reset.
    A token that counts nothing (SoftHSM2 sets COUNT_LOW after a wrong PIN, never the others)
    gives no refusal."""
    if flags & TokenFlag.USER_PIN_LOCKED:
        return ("the token's user PIN is locked (CKF_USER_PIN_LOCKED): the security officer "
                "must reset it", None)
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return ("the token has one PIN try left (CKF_USER_PIN_FINAL_TRY): the signer will not "
                "spend it; check the PIN, then have the security officer reset the counter "
                "(a good login elsewhere, or the SO PIN)", None)
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        return None, ("the token reports a wrong PIN since the last good login "
                      "(CKF_USER_PIN_COUNT_LOW)")
    return None, None


@dataclass(frozen=True)
class KeyInfo:
    label: str
    key_id: bytes
    object_class: str
    key_type: str
    residency: dict[str, bool]


def _not_found_hint(module: Path) -> str:
    """What to do when the module shows no such token: a software token is initialised, a
    card or USB token is plugged in (its PIN, keys and label come from whoever provisioned it:
    the signer never initialises hardware)."""
    if "softhsm" in module.name.lower():
        return ("initialise it first (softhsm2-util --init-token --label LABEL, as the token "
                "role does)")
    return ("insert the card in its reader or plug the token in (the reader must be allowed "
            "by the host's USB policy and pcscd running); `pkcs11-tool --module "
            f"{module} --list-token-slots` lists the tokens the module sees, with their labels "
            "and serials")


class Token:
    """A token found by label in a PKCS#11 module."""

    def __init__(self, module: Path, label: str, serial: str | None = None) -> None:
        self.label = label
        which = f"token {label!r}" + (f" with serial {serial!r}" if serial else "")
        try:
            self._lib = pkcs11.lib(str(module))
            if serial:
                self._token = self._lib.get_token(token_label=label, token_serial=serial.encode())
            else:
                self._token = self._lib.get_token(token_label=label)
        except p11e.NoSuchToken:
            raise SignerError(Exit.UNAVAILABLE,
                              f"{which} not found in {module}: {_not_found_hint(module)}"
                              ) from None
        except p11e.MultipleTokensReturned:
            raise SignerError(Exit.UNAVAILABLE,
                              f"several tokens labelled {label!r} in {module}: give "
                              "token_serial") from None
        except (RuntimeError, OSError, p11e.PKCS11Error) as exc:
            raise SignerError(Exit.UNAVAILABLE,
                              f"cannot load PKCS#11 module {module}: {exc}") from None
        self._session: Any = None
        self._lock = threading.Lock()

    @property
    def logged_in(self) -> bool:
        return self._session is not None

    def pin_flags(self) -> int:
        """The token's flags as it reports them now (C_GetTokenInfo again: python-pkcs11's
        Token keeps those of when it was found)."""
        try:
            return int(self._token.slot.get_token().flags)
        except _GONE as exc:
            raise _unavailable(self.label, exc) from None
        except p11e.PKCS11Error as exc:
            raise SignerError(Exit.UNAVAILABLE, f"cannot read token {self.label!r}'s "
                              f"flags: {type(exc).__name__}") from None

    def login(self, pin: str, rw: bool = False) -> str | None:
        """Open the session; returns a warning from the token's PIN flags, if any. A wrong
        PIN is NOPERM so that callers can tell it from a missing token; the PIN itself never
        appears in an error. Never tries the PIN when the token has one try left
        (`pin_tries`)."""
        with self._lock:
            if self._session is not None:
                return None
            refuse, warning = pin_tries(self.pin_flags())
            if refuse is not None:
                raise SignerError(Exit.NOPERM, refuse)
            try:
                self._session = self._token.open(rw=rw, user_pin=pin)
            except p11e.PinIncorrect:
                raise SignerError(Exit.NOPERM, "the token refused the PIN") from None
            except p11e.PinLocked:
                raise SignerError(Exit.NOPERM, "the token's user PIN is locked: the security "
                                  "officer must reset it") from None
            except _GONE as exc:
                raise _unavailable(self.label, exc) from None
            except p11e.PKCS11Error as exc:
                raise SignerError(Exit.UNAVAILABLE,
                                  f"cannot log in to token {self.label!r}: "
                                  f"{type(exc).__name__}") from None
            return warning

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                try:
                    self._session.close()
                except p11e.PKCS11Error:
                    pass
                self._session = None

    def _s(self) -> Any:
        if self._session is None:
            raise SignerError(Exit.UNAVAILABLE, "the daemon is locked: a custodian must run "
                              "`unlock`")
        return self._session

    def private_key(self, uri: PKCS11URI) -> Any:
        try:
            return self._s().get_key(object_class=ObjectClass.PRIVATE_KEY, label=uri.label,
                                     id=uri.key_id)
        except p11e.NoSuchKey:
            raise SignerError(Exit.NOPERM, f"no private key {uri} on the token") from None
        except p11e.MultipleObjectsReturned:
            raise SignerError(Exit.NOPERM, f"several private keys match {uri}: give an id=")\
                from None
        except _GONE as exc:
            raise _unavailable(self.label, exc) from None

    def residency_problems(self, uri: PKCS11URI, alg: Algorithm) -> list[str]:
        """Why the key is not a resident, non-extractable key of the expected type ([] = ok)."""
        try:
            key = self.private_key(uri)
        except SignerError as exc:
            if exc.code == Exit.UNAVAILABLE:
                raise
            return [exc.message]
        problems: list[str] = []
        try:
            for attr, want in RESIDENCY:
                try:
                    have = bool(key[attr])
                except p11e.AttributeTypeInvalid:
                    have = None
                if have is not want:
                    problems.append(f"{attr.name}={have} (want {want})")
            if key.key_type != alg.key_type:
                problems.append(f"key type {key.key_type.name}, want {alg.key_type.name}")
            elif alg.key_type == KeyType.EC:
                if key[Attribute.EC_PARAMS] != P256_PARAMS:
                    problems.append("EC key not on P-256")
            elif key.key_length != alg.bits:
                problems.append(f"RSA key of {key.key_length} bits, want {alg.bits}")
        except _GONE as exc:
            raise _unavailable(self.label, exc) from None
        return problems

    def sign_digest(self, key: Any, alg: Algorithm, digest: bytes) -> bytes:
        """Sign a SHA-256 digest; the result is in the encoding openssl expects."""
        return alg.encode(self.sign_input(key, alg, alg.token_input(digest)))

    def sign_input(self, key: Any, alg: Algorithm, data: bytes) -> bytes:
        """One signature of `alg.token_input(...)`, as the token returns it (the token
        process's whole job)."""
        mech, param = alg.mechanism
        try:
            return bytes(key.sign(data, mechanism=mech, mechanism_param=param))
        except _GONE as exc:
            raise _unavailable(self.label, exc) from None
        except p11e.PKCS11Error as exc:
            raise SignerError(Exit.SOFTWARE, f"the token refused to sign: "
                              f"{type(exc).__name__}") from None

    def public_key_info(self, uri: PKCS11URI) -> asn1keys.PublicKeyInfo:
        """The public half, from the token's public key object of the same label (and id)."""
        try:
            pub = self._s().get_key(object_class=ObjectClass.PUBLIC_KEY, label=uri.label,
                                    id=uri.key_id)
        except p11e.NoSuchKey:
            raise SignerError(Exit.NOPERM, f"no public key {uri} on the token") from None
        except _GONE as exc:
            raise _unavailable(self.label, exc) from None
        if pub.key_type == KeyType.EC:
            return asn1keys.PublicKeyInfo.load(encode_ec_public_key(pub))
        rsa_pub = asn1keys.RSAPublicKey.load(encode_rsa_public_key(pub))
        return asn1keys.PublicKeyInfo({"algorithm": {"algorithm": "rsa"}, "public_key": rsa_pub})

    def public_key_info_unlocked(self, uri: PKCS11URI) -> asn1keys.PublicKeyInfo | None:
        """The public half read in a public session (no PIN): what a locked daemon uses to
        check the audit log's checkpoints at start. None when the token keeps it private."""
        if self._session is not None:
            return self.public_key_info(uri)
        try:
            with self._token.open() as s:
                pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, label=uri.label,
                                id=uri.key_id)
                if pub.key_type != KeyType.EC:
                    return None
                return asn1keys.PublicKeyInfo.load(encode_ec_public_key(pub))
        except (p11e.NoSuchKey, p11e.MultipleObjectsReturned):
            return None
        except _GONE as exc:
            raise _unavailable(self.label, exc) from None
        except p11e.PKCS11Error:
            return None

    def exists(self, label: str) -> bool:
        return any(True for _ in self._s().get_objects({Attribute.LABEL: label}))

    def generate(self, uri: PKCS11URI, alg: Algorithm) -> None:
        """Generate a key pair on the token: sensitive, never extractable, signing only."""
        if self.exists(uri.label):
            raise SignerError(Exit.EXISTS, f"a key labelled {uri.label!r} already exists on "
                              f"token {self.label!r}: refusing to replace it")
        key_id = uri.key_id if uri.key_id is not None else os.urandom(8)
        private = {
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
            Attribute.UNWRAP: False, Attribute.DERIVE: False,
        }
        public = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                  Attribute.WRAP: False}
        s = self._s()
        try:
            if alg.key_type == KeyType.EC:
                params = s.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: P256_PARAMS}, local=True)
                params.generate_keypair(store=True, label=uri.label, id=key_id,
                                        public_template=public, private_template=private)
            else:
                s.generate_keypair(KeyType.RSA, alg.bits, store=True, label=uri.label,
                                   id=key_id, public_template=public, private_template=private)
        except p11e.PKCS11Error as exc:
            raise SignerError(Exit.SOFTWARE, f"key generation failed on token {self.label!r}: "
                              f"{type(exc).__name__}") from None

    def keys(self) -> Iterator[KeyInfo]:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in self._s().get_objects({Attribute.CLASS: cls}):
                res: dict[str, bool] = {}
                if cls == ObjectClass.PRIVATE_KEY:
                    for attr, _want in RESIDENCY:
                        try:
                            res[attr.name] = bool(obj[attr])
                        except p11e.AttributeTypeInvalid:
                            pass
                yield KeyInfo(label=obj.label, key_id=bytes(obj.id),
                              object_class="private" if cls == ObjectClass.PRIVATE_KEY
                              else "public",
                              key_type=obj.key_type.name, residency=res)
