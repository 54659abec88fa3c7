"""PKCS#11 URIs (RFC 7512), the subset that names one object: token, object (label), id, type,
and the token's serial (a key on one given card, not on any card of that label)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_KNOWN = {"token", "object", "id", "type", "manufacturer", "model", "serial",
          "library-manufacturer", "library-description", "library-version", "slot-description",
          "slot-manufacturer", "slot-id"}
_TYPES = {"private", "public", "cert", "secret-key", "data"}


class URIError(ValueError):
    pass


@dataclass(frozen=True)
class PKCS11URI:
    token: str | None
    label: str
    key_id: bytes | None
    type: str
    serial: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.token is not None:
            parts.append(f"token={_pct(self.token.encode())}")
        if self.serial is not None:
            parts.append(f"serial={_pct(self.serial.encode())}")
        parts.append(f"object={_pct(self.label.encode())}")
        if self.key_id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.key_id))
        parts.append(f"type={self.type}")
        return "pkcs11:" + ";".join(parts)


def _pct(raw: bytes) -> str:
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in raw)


def parse(text: str) -> PKCS11URI:
    """Parse a URI naming one key. Query attributes (pin-value, module-path) are refused:
    the PIN must never sit in a config value and the module comes from [daemon]."""
    if not text.startswith("pkcs11:"):
        raise URIError("not a PKCS#11 URI (must start with 'pkcs11:')")
    body = text[len("pkcs11:"):]
    if "?" in body:
        raise URIError("query attributes (pin-value, module-path...) are not allowed")
    attrs: dict[str, bytes] = {}
    for part in body.split(";") if body else []:
        name, sep, value = part.partition("=")
        if not sep or name not in _KNOWN:
            raise URIError(f"unknown or malformed path attribute {part!r}")
        if name in attrs:
            raise URIError(f"attribute {name!r} given twice")
        attrs[name] = unquote_to_bytes(value)
    if "object" not in attrs:
        raise URIError("'object' (the key label) is required")
    typ = attrs.get("type", b"private").decode()
    if typ not in _TYPES:
        raise URIError(f"unknown type {typ!r}")
    try:
        token = attrs["token"].decode() if "token" in attrs else None
        label = attrs["object"].decode()
        serial = attrs["serial"].decode() if "serial" in attrs else None
    except UnicodeDecodeError as exc:
        raise URIError("token, object and serial must be UTF-8") from exc
    return PKCS11URI(token=token, label=label, key_id=attrs.get("id"), type=typ, serial=serial)
