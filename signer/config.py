"""The TOML configuration: schema, validation, typed result. No I/O besides reading the file.

Every error names the file, the dotted key and the problem on one line, because the deploy role
runs `signer config check` before it replaces a running configuration.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from signer import request, uri
from signer.errors import Exit, SignerError

DEFAULT_REQUEST_TTL = 86400
# How long a custodian's PIN share waits for the others (k-of-n unlock): long enough for
# custodians called one after another, short enough that a share sent and forgotten does not
# wait for a thief's; the shares live in the token process's memory alone, and go with it.
DEFAULT_PIN_SHARE_WINDOW = 900
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
ALGORITHMS = ("ecdsa-p256", "rsa3072-pkcs1", "rsa3072-pss", "rsa2048-pkcs1")
FORMATS = request.FORMATS
# Formats that embed the profile's certificate (and `chain`), and the algorithms each can carry;
# kept here, not imported from signer.formats, so `config check` needs no crypto libraries.
NEEDS_CERT = ("cms", "authenticode")
FORMAT_ALGORITHMS = {"authenticode": ("rsa3072-pkcs1", "rsa2048-pkcs1", "ecdsa-p256"),
                     "openpgp": ("rsa3072-pkcs1", "ecdsa-p256"),
                     "openpgp-cleartext": ("rsa3072-pkcs1", "ecdsa-p256")}
# Formats whose key is an OpenPGP key: its creation time is part of its fingerprint, so the
# profile fixes it (`openpgp_created`) and every signature and exported certificate agree.
OPENPGP = ("openpgp", "openpgp-cleartext")
# Formats whose signatures can carry an RFC 3161 timestamp (added by the client afterwards).
TIMESTAMPED = ("cms", "authenticode")
SSH_KEY_RE = re.compile(
    r"(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?")


@dataclass(frozen=True)
class Profile:
    name: str
    key: uri.PKCS11URI
    algorithm: str
    cert: Path | None
    formats: tuple[str, ...]
    max_size: int
    clients: frozenset[str]
    approvals: int
    custodians: frozenset[str]
    budget_count: int
    budget_window: int
    max_queued: int = 16  # requests waiting for approval, per client
    request_ttl: int = 86400  # seconds a queued request (and its approvals) stays valid
    chain: Path | None = None  # PEM certificates sent with the profile's (authenticode)
    # Only requests whose client says it adds a timestamp (`sign --timestamped`) are signed:
    # a pipeline that forgot its TSA fails before signing, instead of shipping a signature
    # that dies with the certificate. The client's word, not a proof (threat-model/ T-35).
    require_timestamp: bool = False
    # The OpenPGP key's creation time (epoch seconds): part of its fingerprint, which apt's
    # signed-by= keyrings pin. Chosen once per key; changing it is a new OpenPGP key.
    openpgp_created: int | None = None
    # The [tokens.*] name of the token holding the key; None: the daemon's own token.
    token: str | None = None


@dataclass(frozen=True)
class TokenSpec:
    """A hardware token beside the daemon's own ([tokens.NAME]): a card or USB token whose
    keys were provisioned elsewhere (a key ceremony, the CA of an EV certificate). A profile
    uses it when its key URI names this token's label (and, if given, serial). Its own token
    process, PIN and failures: pulling it takes its profiles away, not the daemon.

    With `pin_source = "prompt"` the card starts locked, and locks again each time it is
    pulled and plugged back (its PIN is kept nowhere, not even across a pull): custodians send
    the whole PIN (`unlock --token NAME`) or, with `pin_shares = k`, k shares of it
    (`unlock --token NAME --share`), counted for `pin_share_window` seconds, exactly as for
    the daemon's own token (signer/cards.py)."""
    name: str
    module: Path
    label: str
    pin_source: str  # "prompt" or "file:/path"
    serial: str | None = None
    pin_shares: int = 0
    pin_share_window: int = DEFAULT_PIN_SHARE_WINDOW

    @property
    def pin_file(self) -> Path | None:
        return Path(self.pin_source[5:]) if self.pin_source.startswith("file:") else None


@dataclass(frozen=True)
class Daemon:
    socket: Path
    socket_group: str
    audit_log: Path
    state_dir: Path
    token_module: Path
    token_label: str
    pin_source: str  # "prompt" or "file:/path"
    checkpoint_interval: int
    audit_key: uri.PKCS11URI
    audit_cert: Path | None
    # The token's serial number (RFC 7512 `serial`): with two tokens of the same label
    # plugged in (a spare, an attacker's), the daemon opens only the one it was given.
    token_serial: str | None = None
    # The active segment is closed (renamed `<stem>.<first seq>.<ext>`) at the first state
    # checkpoint after it reaches either limit.
    segment_bytes: int = 256 * 1024 * 1024
    segment_entries: int = 1_000_000
    # pin_source prompt with k-of-n custodian shares: k (0: one custodian sends the whole
    # PIN), and how long (seconds) a share counts while the others come (signer/shares.py).
    pin_shares: int = 0
    pin_share_window: int = DEFAULT_PIN_SHARE_WINDOW

    @property
    def pin_file(self) -> Path | None:
        return Path(self.pin_source[5:]) if self.pin_source.startswith("file:") else None


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: Daemon
    profiles: dict[str, Profile] = field(default_factory=dict)
    clients: dict[str, str] = field(default_factory=dict)  # name -> ssh public key line
    custodians: dict[str, str] = field(default_factory=dict)
    # name -> the local account its gateway runs as (checked with SO_PEERCRED), when given
    accounts: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, TokenSpec] = field(default_factory=dict)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> SignerError:
        return SignerError(Exit.CONFIG, f"{self.path}: {key}: {problem}")

    def table(self, data: dict[str, Any], key: str, allowed: set[str],
              required: set[str]) -> dict[str, Any]:
        value = data.get(key.rsplit(".", 1)[-1])
        if not isinstance(value, dict):
            raise self.fail(key, "missing table" if value is None else "must be a table")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}", "unknown key")
        for k in sorted(required):
            if k not in value:
                raise self.fail(f"{key}.{k}", "missing")
        return value

    def str_(self, t: dict[str, Any], prefix: str, k: str, default: str | None = None) -> str:
        v = t.get(k, default)
        if not isinstance(v, str):
            raise self.fail(f"{prefix}.{k}", "must be a string")
        return v

    def int_(self, t: dict[str, Any], prefix: str, k: str, lo: int, default: int | None = None
             ) -> int:
        v = t.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(f"{prefix}.{k}", "must be an integer")
        if v < lo:
            raise self.fail(f"{prefix}.{k}", f"must be >= {lo}")
        return v

    def abspath(self, t: dict[str, Any], prefix: str, k: str) -> Path:
        v = self.str_(t, prefix, k)
        if not v.startswith("/"):
            raise self.fail(f"{prefix}.{k}", "must be an absolute path")
        return Path(v)

    def names(self, t: dict[str, Any], prefix: str, k: str, known: dict[str, str],
              kind: str) -> frozenset[str]:
        v = t.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(f"{prefix}.{k}", "must be a list of strings")
        for name in v:
            if name not in known:
                raise self.fail(f"{prefix}.{k}", f"unknown {kind} {name!r}")
        if len(set(v)) != len(v):
            raise self.fail(f"{prefix}.{k}", "duplicate names")
        return frozenset(v)

    def key_uri(self, t: dict[str, Any], prefix: str, k: str) -> uri.PKCS11URI:
        try:
            parsed = uri.parse(self.str_(t, prefix, k))
        except uri.URIError as exc:
            raise self.fail(f"{prefix}.{k}", str(exc)) from None
        if parsed.type != "private":
            raise self.fail(f"{prefix}.{k}", "must name a private key (type=private)")
        return parsed


def key_identity(line: str) -> str:
    """What makes two OpenSSH public key lines (type, base64, optional comment) the same key.

    Not their text: one key has many encodings that OpenSSH reads as the same key (an RSA
    exponent or modulus with a leading zero byte, which sshd trims; base64 whose unused last
    bits differ), so two names whose lines differ may still be one key holder, who could then
    meet a 2-of-N alone. The key is parsed (cryptography's load_ssh_public_key) and written
    again in its one canonical form; a security key (`sk-`) counts as the key it wraps, so it
    equals a plain key with the same public point (stricter, never looser). A line cryptography
    cannot read (a placeholder, a truncated key) is compared by its decoded bytes, which still
    catches the same bytes under two names; for the types SSH_KEY_RE allows, cryptography reads
    the encodings OpenSSH reads (the leading zero is tested), so such a line is not a key sshd
    logs anyone in with. `invoke inventory.check` also requires ssh-keygen to read each line."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    parts = line.split()
    material = " ".join(parts[:2])
    try:
        key = serialization.load_ssh_public_key(material.encode("ascii"))
        canonical = key.public_bytes(serialization.Encoding.OpenSSH,
                                     serialization.PublicFormat.OpenSSH)
        return "key " + canonical.decode("ascii")
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        pass
    try:
        return "bytes " + base64.b64decode(parts[1], validate=True).hex()
    except (IndexError, binascii.Error):
        return "text " + material


def _principals(r: _Reader, data: dict[str, Any], kind: str, accounts: dict[str, str]
                ) -> dict[str, str]:
    section = data.get(kind, {})
    if not isinstance(section, dict):
        raise r.fail(kind, "must be a table")
    out: dict[str, str] = {}
    for name in section:
        prefix = f"{kind}.{name}"
        if not NAME_RE.fullmatch(name):
            raise r.fail(prefix, "bad name (want [a-z][a-z0-9_-]{0,63})")
        t = r.table(section, prefix, {"ssh_key", "account"}, {"ssh_key"})
        key = r.str_(t, prefix, "ssh_key").strip()
        if not SSH_KEY_RE.fullmatch(key):
            raise r.fail(f"{prefix}.ssh_key", "not an OpenSSH public key line")
        out[name] = key
        if "account" in t:
            account = r.str_(t, prefix, "account")
            if not ACCOUNT_RE.fullmatch(account):
                raise r.fail(f"{prefix}.account", "not a local account name")
            accounts[name] = account
    return out


def parse(text: str, path: Path) -> Config:
    r = _Reader(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise r.fail("(syntax)", str(exc)) from None
    for k in data:
        if k not in {"daemon", "profiles", "clients", "custodians", "tokens"}:
            raise r.fail(k, "unknown section")
    d = r.table(data, "daemon",
                {"socket", "socket_group", "audit_log", "state_dir", "token_module",
                 "token_label", "token_serial", "pin_source", "checkpoint_interval",
                 "audit_key", "audit_cert", "segment_bytes", "segment_entries",
                 "pin_shares", "pin_share_window"},
                {"socket", "audit_log", "state_dir", "token_module", "token_label", "pin_source",
                 "audit_key"})
    pin_source = _pin_source(r, d, "daemon")
    daemon = Daemon(
        socket=r.abspath(d, "daemon", "socket"),
        socket_group=r.str_(d, "daemon", "socket_group", ""),
        audit_log=r.abspath(d, "daemon", "audit_log"),
        state_dir=r.abspath(d, "daemon", "state_dir"),
        token_module=r.abspath(d, "daemon", "token_module"),
        token_label=r.str_(d, "daemon", "token_label"),
        pin_source=pin_source,
        checkpoint_interval=r.int_(d, "daemon", "checkpoint_interval", 1, 1000),
        audit_key=r.key_uri(d, "daemon", "audit_key"),
        audit_cert=r.abspath(d, "daemon", "audit_cert") if "audit_cert" in d else None,
        token_serial=r.str_(d, "daemon", "token_serial") if "token_serial" in d else None,
        segment_bytes=r.int_(d, "daemon", "segment_bytes", 4096, 256 * 1024 * 1024),
        segment_entries=r.int_(d, "daemon", "segment_entries", 2, 1_000_000),
        **_pin_shares(r, d, "daemon", pin_source),
    )
    tokens = _tokens(r, data, daemon)
    accounts: dict[str, str] = {}
    clients = _principals(r, data, "clients", accounts)
    custodians = _principals(r, data, "custodians", accounts)
    for where, need in [("daemon", daemon.pin_shares),
                     *((f"tokens.{t.name}", t.pin_shares) for t in tokens.values())]:
        if need > len(custodians):
            raise r.fail(f"{where}.pin_shares", f"needs {need} custodians, {len(custodians)} "
                         "configured")
    overlap = set(clients) & set(custodians)
    if overlap:
        raise r.fail("custodians", f"name used by a client too: {sorted(overlap)[0]!r}")
    # One key, one name: a holder of two names could approve twice (2-of-N alone) or act as
    # a client and its custodian. The key decides, not its encoding nor the comment.
    holder: dict[str, str] = {}
    for kind, table in (("clients", clients), ("custodians", custodians)):
        for name, line in table.items():
            material = key_identity(line)
            if material in holder:
                raise r.fail(f"{kind}.{name}.ssh_key", f"the same key as {holder[material]}")
            holder[material] = f"{kind}.{name}"
    profiles_t = data.get("profiles", {})
    if not isinstance(profiles_t, dict):
        raise r.fail("profiles", "must be a table")
    profiles: dict[str, Profile] = {}
    for name in profiles_t:
        p = f"profiles.{name}"
        if not NAME_RE.fullmatch(name):
            raise r.fail(p, "bad name (want [a-z][a-z0-9_-]{0,63})")
        t = r.table(profiles_t, p,
                    {"key", "algorithm", "cert", "formats", "max_size", "clients", "approvals",
                     "custodians", "budget_count", "budget_window", "max_queued",
                     "request_ttl", "chain", "require_timestamp", "openpgp_created"},
                    {"key", "algorithm", "formats", "max_size", "clients", "budget_count",
                     "budget_window"})
        algorithm = r.str_(t, p, "algorithm")
        if algorithm not in ALGORITHMS:
            raise r.fail(f"{p}.algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        formats = t["formats"]
        if (not isinstance(formats, list) or not formats
                or not all(isinstance(f, str) and f in FORMATS for f in formats)):
            raise r.fail(f"{p}.formats", f"must be a non-empty list of {', '.join(FORMATS)}")
        cert = r.abspath(t, p, "cert") if "cert" in t else None
        for f in formats:
            if f in NEEDS_CERT and cert is None:
                raise r.fail(f"{p}.cert", f"required when formats include {f}")
            if algorithm not in FORMAT_ALGORITHMS.get(f, ALGORITHMS):
                raise r.fail(f"{p}.algorithm", f"{algorithm} cannot sign {f} (use "
                             f"{' or '.join(FORMAT_ALGORITHMS[f])})")
        require_timestamp = t.get("require_timestamp", False)
        if not isinstance(require_timestamp, bool):
            raise r.fail(f"{p}.require_timestamp", "must be true or false")
        if require_timestamp and (untimed := [f for f in formats if f not in TIMESTAMPED]):
            raise r.fail(f"{p}.require_timestamp", f"format {untimed[0]} carries no "
                         f"timestamp (only {', '.join(TIMESTAMPED)} do)")
        openpgp_created = None
        if "openpgp_created" in t:
            when = t["openpgp_created"]
            if isinstance(when, str):  # "2026-01-01T00:00:00Z", as the signer role writes it
                try:
                    when = datetime.fromisoformat(when)
                except ValueError:
                    pass
            if not isinstance(when, datetime) or when.tzinfo is None:
                raise r.fail(f"{p}.openpgp_created", "must be a TOML date-time with its offset "
                             "(e.g. 2026-01-01T00:00:00Z)")
            openpgp_created = int(when.timestamp())
            if not 0 < openpgp_created < 1 << 32:
                raise r.fail(f"{p}.openpgp_created", "out of OpenPGP's range (1970 to 2106)")
        elif pgp := [f for f in formats if f in OPENPGP]:
            raise r.fail(f"{p}.openpgp_created", f"required when formats include {pgp[0]} "
                         "(the key's OpenPGP creation time, e.g. 2026-01-01T00:00:00Z)")
        custs = r.names(t, p, "custodians", custodians, "custodian")
        approvals = r.int_(t, p, "approvals", 0, 0)
        if approvals > len(custs):
            raise r.fail(f"{p}.approvals", f"needs {approvals} custodians, {len(custs)} listed")
        profiles[name] = Profile(
            name=name, key=r.key_uri(t, p, "key"), algorithm=algorithm, cert=cert,
            formats=tuple(formats), max_size=r.int_(t, p, "max_size", 1),
            clients=r.names(t, p, "clients", clients, "client"), approvals=approvals,
            custodians=custs, budget_count=r.int_(t, p, "budget_count", 1),
            budget_window=r.int_(t, p, "budget_window", 1),
            max_queued=r.int_(t, p, "max_queued", 1, 16),
            request_ttl=r.int_(t, p, "request_ttl", 1, DEFAULT_REQUEST_TTL),
            chain=r.abspath(t, p, "chain") if "chain" in t else None,
            require_timestamp=require_timestamp, openpgp_created=openpgp_created)
    if daemon.audit_key.token not in (None, daemon.token_label):
        raise r.fail("daemon.audit_key", f"token {daemon.audit_key.token!r} is not "
                     f"daemon.token_label {daemon.token_label!r}")
    for name, pr in list(profiles.items()):
        profiles[name] = dataclasses.replace(pr, token=_token_of(r, f"profiles.{name}.key",
                                                                 pr.key, daemon, tokens))
    for name, pr in profiles.items():
        if pr.key.label == daemon.audit_key.label:
            raise r.fail(f"profiles.{name}.key", "the audit key must not sign artifacts")
    return Config(path=path, daemon=daemon, profiles=profiles, clients=clients,
                  custodians=custodians, accounts=accounts, tokens=tokens)


def _pin_source(r: _Reader, t: dict[str, Any], prefix: str) -> str:
    """`pin_source` of the daemon's token or of a [tokens.*] one: the same rules for both."""
    pin_source = r.str_(t, prefix, "pin_source")
    if pin_source != "prompt" and not (pin_source.startswith("file:/") and len(pin_source) > 6):
        raise r.fail(f"{prefix}.pin_source", "must be 'prompt' or 'file:/absolute/path'")
    return pin_source


def _pin_shares(r: _Reader, t: dict[str, Any], prefix: str, pin_source: str) -> dict[str, int]:
    """`pin_shares` (k; 0: one custodian sends the whole PIN) and `pin_share_window` of the
    daemon's token or of a [tokens.*] one (signer/shares.py): the same rules for both."""
    k = r.int_(t, prefix, "pin_shares", 0, 0)
    if k == 1:
        raise r.fail(f"{prefix}.pin_shares", "must be 0 (the whole PIN) or k >= 2: with one "
                     "share, one custodian holds the PIN")
    if k and pin_source != "prompt":
        raise r.fail(f"{prefix}.pin_shares", "needs pin_source = 'prompt' (shares replace "
                     "the typed PIN, not a PIN file)")
    return {"pin_shares": k,
            "pin_share_window": r.int_(t, prefix, "pin_share_window", 1,
                                       DEFAULT_PIN_SHARE_WINDOW)}


def _tokens(r: _Reader, data: dict[str, Any], daemon: Daemon) -> dict[str, TokenSpec]:
    section = data.get("tokens", {})
    if not isinstance(section, dict):
        raise r.fail("tokens", "must be a table")
    out: dict[str, TokenSpec] = {}
    for name in section:
        prefix = f"tokens.{name}"
        if not NAME_RE.fullmatch(name):
            raise r.fail(prefix, "bad name (want [a-z][a-z0-9_-]{0,63})")
        t = r.table(section, prefix, {"module", "label", "serial", "pin_source", "pin_shares",
                                      "pin_share_window"},
                    {"module", "label", "pin_source"})
        pin_source = _pin_source(r, t, prefix)
        spec = TokenSpec(name=name, module=r.abspath(t, prefix, "module"),
                         label=r.str_(t, prefix, "label"), pin_source=pin_source,
                         serial=r.str_(t, prefix, "serial") if "serial" in t else None,
                         **_pin_shares(r, t, prefix, pin_source))
        if spec.label == daemon.token_label or spec.label in {o.label for o in out.values()}:
            raise r.fail(f"{prefix}.label", f"{spec.label!r} is another token's label too: "
                         "a key URI could not say which token it means")
        out[name] = spec
    return out


def _token_of(r: _Reader, where: str, key: uri.PKCS11URI, daemon: Daemon,
              tokens: dict[str, TokenSpec]) -> str | None:
    """The [tokens.*] name the key URI names by its token label (None: the daemon's token).
    A `serial=` in the URI must be that token's serial: the key is on that one token."""
    if key.token is None or key.token == daemon.token_label:
        serial = daemon.token_serial
        name = None
    else:
        spec = next((t for t in tokens.values() if t.label == key.token), None)
        if spec is None:
            raise r.fail(where, f"token {key.token!r} is neither daemon.token_label "
                         f"{daemon.token_label!r} nor the label of a [tokens.*] table")
        serial, name = spec.serial, spec.name
    if key.serial is not None and key.serial != serial:
        raise r.fail(where, f"serial {key.serial!r} is not the serial configured for token "
                     f"{key.token or daemon.token_label!r} ({serial!r})")
    return name


def load(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SignerError(Exit.CONFIG, f"{path}: cannot read: {exc}") from None
    return parse(text, path)
