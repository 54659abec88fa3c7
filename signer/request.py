"""The SSH command parser: `SSH_ORIGINAL_COMMAND` bytes in, a typed command or ParseError out.

Pure and strict: the command line is never given to a shell, every token is checked against a
whitelist, and anything unexpected (unknown command or option, non-UTF-8, control characters,
oversize) is an error. Tested with hypothesis.
"""

from __future__ import annotations

import unicodedata

from signer.errors import Exit

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:  # the gateway parses here once per SSH request: `collections` is not loaded
    from collections.abc import Mapping

MAX_COMMAND = 4096
MAX_NAME = 255
# The token rules, as patterns for messages and tests; checked by the functions below with set
# membership, not `re`: the gateway starts once per SSH request and `re` (with `enum`,
# `functools`, `collections` under it) was a third of its start-up.
PROFILE_PATTERN = "[a-z][a-z0-9_-]{0,63}"
ID_PATTERN = "[0-9a-f]{32}"
SIZE_PATTERN = "0|[1-9][0-9]{0,15}"  # 0: an empty artifact, refused as such (65)
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_NAME_CHARS = _LOWER | frozenset("0123456789_-")
_HEX = frozenset("0123456789abcdef")
_DIGITS = frozenset("0123456789")
_QUOTING = frozenset("'\"\\")
_SPACES = " \t\r\n"  # shlex's whitespace


def is_name(tok: str) -> bool:
    """PROFILE_PATTERN: the names of profiles, clients and custodians."""
    return 0 < len(tok) <= 64 and tok[0] in _LOWER and all(c in _NAME_CHARS for c in tok)


def is_id(tok: str) -> bool:
    """ID_PATTERN: a request id."""
    return len(tok) == 32 and all(c in _HEX for c in tok)


def is_size(tok: str) -> bool:
    """SIZE_PATTERN: a declared byte count."""
    return tok == "0" or (0 < len(tok) <= 16 and tok[0] != "0"
                          and all(c in _DIGITS for c in tok))


def split(text: str) -> list[str]:
    """shlex.split(text, posix=True), without importing shlex (and `re`) for the plain command
    lines clients send: with no quote and no backslash, shlex splits on its whitespace alone."""
    if _QUOTING.isdisjoint(text):
        for space in _SPACES[1:]:
            text = text.replace(space, " ")
        return [t for t in text.split(" ") if t]
    import shlex

    return shlex.split(text, comments=False, posix=True)
# The names in signer.formats.REGISTRY (which the gateway does not import: start-up time)
FORMATS = ("cms", "raw", "authenticode", "openpgp", "openpgp-cleartext")
# Control (C0, DEL, C1), format (bidi overrides, zero-width), line/paragraph separators,
# surrogates and private use: nothing that can start a new line or disguise text in a log, a
# terminal or the statement a custodian reads before approving.
_BAD_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) in _BAD_CATEGORIES for c in text)


class ParseError(ValueError):
    """A bad command line (exit 64) or a bad value in it (exit 65)."""

    def __init__(self, message: str, code: int = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Command:
    """A parsed command: immutable values, compared by type and fields. (Not a dataclass:
    `dataclasses` costs the gateway, which starts once per SSH request, milliseconds.)"""

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()  # in wire order; subclasses keep their parent's

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def fields(self) -> dict[str, object]:
        return dict(zip(self._fields, self._values(), strict=True))

    def __eq__(self, other: object) -> bool:
        return (type(self) is type(other) and isinstance(other, _Command)
                and self._values() == other._values())

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"{type(self).__name__}({args})"

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)


class Sign(_Command):
    __slots__ = ("format", "name", "profile", "size", "timestamped")
    _fields = ("profile", "format", "name", "size", "timestamped")

    def __init__(self, profile: str, format: str, name: str, size: int,
                 timestamped: bool = False) -> None:
        self.profile = profile
        self.format = format
        self.name = name
        self.size = size  # declared by the client: a shorter (cut) stream is not signed
        # declared by the client: it adds an RFC 3161 timestamp (profiles may require it)
        self.timestamped = timestamped


class _Id(_Command):
    __slots__ = ("id",)
    _fields = ("id",)

    def __init__(self, id: str) -> None:
        self.id = id


class Status(_Id):
    __slots__ = ()


class Fetch(_Id):
    __slots__ = ()


class Approve(_Id):
    __slots__ = ()


class Cancel(_Id):
    __slots__ = ()


class Reject(_Id):
    __slots__ = ()


class _Profile(_Command):
    __slots__ = ("profile",)
    _fields = ("profile",)

    def __init__(self, profile: str) -> None:
        self.profile = profile


class Freeze(_Profile):
    __slots__ = ()


class Thaw(_Profile):
    __slots__ = ()


class Requests(_Command):
    __slots__ = ()


class Unlock(_Command):
    """`unlock` sends the whole PIN on stdin; `unlock --share` one custodian's share of it
    (signer/shares.py), when the signer is configured for k-of-n shares. `--token NAME`: the
    PIN (or share) of the card [tokens.NAME] with pin_source prompt, not of the daemon's own
    token (None: left out on the wire, so an `unlock` is what it always was)."""

    __slots__ = ("share", "token")
    _fields = ("share", "token")

    def __init__(self, share: bool = False, token: str | None = None) -> None:
        self.share = share
        self.token = token


UNLOCK_USAGE = ("unlock: takes --share and --token NAME only (the PIN, or your share of it, "
                "goes on stdin)")


def _parse_unlock(args: list[str]) -> Unlock:
    share, token, i = False, None, 0
    while i < len(args):
        if args[i] == "--share" and not share:
            share, i = True, i + 1
        elif args[i] == "--token" and token is None and i + 1 < len(args):
            if not is_name(args[i + 1]):
                raise ParseError(f"unlock: bad token name (want {PROFILE_PATTERN})")
            token, i = args[i + 1], i + 2
        else:
            raise ParseError(UNLOCK_USAGE)
    return Unlock(share=share, token=token)


Command = (Sign | Status | Fetch | Cancel | Requests | Approve | Reject | Unlock | Freeze
           | Thaw)


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise ParseError(f"name longer than {MAX_NAME} characters", Exit.DATA)
    if _has_control(name):
        raise ParseError("name contains control or format characters", Exit.DATA)
    return name


def _profile(tok: str) -> str:
    if not is_name(tok):
        raise ParseError("bad profile name")
    return tok


def _id(tok: str) -> str:
    if not is_id(tok):
        raise ParseError("bad request id (want 32 hex digits)")
    return tok


def _parse_sign(args: list[str]) -> Sign:
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        opt = args[i]
        if opt not in ("--profile", "--format", "--name", "--size", "--timestamped"):
            raise ParseError(f"sign: unknown option {opt[:40]!r}")
        if opt in opts:
            raise ParseError(f"sign: {opt} given twice")
        if opt == "--timestamped":  # a flag, no value
            opts[opt] = ""
            i += 1
            continue
        if i + 1 >= len(args):
            raise ParseError(f"sign: {opt} needs a value")
        opts[opt] = args[i + 1]
        i += 2
    if "--profile" not in opts:
        raise ParseError("sign: --profile is required")
    fmt = opts.get("--format", "cms")
    if fmt not in FORMATS:
        raise ParseError(f"sign: --format must be one of {', '.join(FORMATS)}")
    profile, name = _profile(opts["--profile"]), check_name(opts.get("--name", ""))
    if "--size" not in opts:
        raise ParseError(SIZE_REQUIRED)
    return Sign(profile=profile, format=fmt, name=name, size=_size(opts["--size"]),
                timestamped="--timestamped" in opts)


# Without the size, a stream that ends early (an SSH connection cut mid-upload) looks like a
# complete, shorter artifact: its prefix would be signed and logged. So `sign` needs it.
SIZE_REQUIRED = ("sign: --size BYTES is required (the artifact's exact byte count, e.g. "
                 "--size $(stat -c %s FILE); `signer submit` sends it): a stream cut short "
                 "is never signed")


def _size(tok: str) -> int:
    if not is_size(tok):
        raise ParseError("sign: --size must be a byte count")
    return int(tok)


def parse(raw: bytes | None) -> Command:
    if raw is None or not raw.strip():
        raise ParseError("no command (this account only runs signer commands)")
    if len(raw) > MAX_COMMAND:
        raise ParseError(f"command longer than {MAX_COMMAND} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("command is not valid UTF-8") from None
    if _has_control(text.replace("\t", " ")):
        raise ParseError("command contains control or format characters")
    try:
        tokens = split(text)
    except ValueError as exc:
        raise ParseError(f"cannot split command: {exc}") from None
    if not tokens:
        raise ParseError("no command")
    verb, args = tokens[0], tokens[1:]
    if verb == "sign":
        return _parse_sign(args)
    if verb == "unlock":
        return _parse_unlock(args)
    arity = {"status": 1, "fetch": 1, "cancel": 1, "approve": 1, "reject": 1, "freeze": 1,
             "thaw": 1, "requests": 0}
    if verb not in arity:
        raise ParseError(f"unknown command {verb[:40]!r} (sign, status, fetch, cancel, "
                         "requests, approve, reject, unlock, freeze, thaw)")
    if len(args) != arity[verb]:
        raise ParseError(f"{verb}: expects {arity[verb]} argument(s)")
    if verb == "status":
        return Status(_id(args[0]))
    if verb == "fetch":
        return Fetch(_id(args[0]))
    if verb == "approve":
        return Approve(_id(args[0]))
    if verb == "cancel":
        return Cancel(_id(args[0]))
    if verb == "reject":
        return Reject(_id(args[0]))
    if verb == "freeze":
        return Freeze(_profile(args[0]))
    if verb == "thaw":
        return Thaw(_profile(args[0]))
    return Requests()


def to_wire(cmd: Command) -> dict[str, str | int | bool]:
    """The command as the gateway sends it to the daemon (JSON object; strings, the declared
    size as an integer and `timestamped: true`, each left out when not declared so older
    daemons understand)."""
    out: dict[str, str | int | bool] = {"cmd": type(cmd).__name__.lower()}
    for k, v in cmd.fields().items():
        if v is True or (isinstance(v, str | int) and not isinstance(v, bool)):
            out[k] = v
    return out


def from_wire(obj: Mapping[str, object]) -> Command:
    """The daemon re-validates everything: the gateway is a separate, less trusted process."""
    def s(k: str) -> str:
        v = obj.get(k)
        if not isinstance(v, str):
            raise ParseError(f"field {k!r} missing")
        return v
    cmd = s("cmd")
    if cmd == "sign":
        fmt = s("format")
        if fmt not in FORMATS:
            raise ParseError("bad format")
        size = obj.get("size")
        if size is None:  # a gateway older than this rule: its cut streams would be signed
            raise ParseError(SIZE_REQUIRED)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 53:
            raise ParseError("bad size")
        timestamped = obj.get("timestamped", False)
        if not isinstance(timestamped, bool):
            raise ParseError("bad timestamped")
        return Sign(profile=_profile(s("profile")), format=fmt, name=check_name(s("name")),
                    size=size, timestamped=timestamped)
    if cmd == "status":
        return Status(_id(s("id")))
    if cmd == "fetch":
        return Fetch(_id(s("id")))
    if cmd == "approve":
        return Approve(_id(s("id")))
    if cmd == "cancel":
        return Cancel(_id(s("id")))
    if cmd == "reject":
        return Reject(_id(s("id")))
    if cmd == "freeze":
        return Freeze(_profile(s("profile")))
    if cmd == "thaw":
        return Thaw(_profile(s("profile")))
    if cmd == "requests":
        return Requests()
    if cmd == "unlock":
        share, token = obj.get("share", False), obj.get("token")
        if not isinstance(share, bool):
            raise ParseError("bad share")
        if token is not None and not (isinstance(token, str) and is_name(token)):
            raise ParseError("bad token")
        return Unlock(share=share, token=token)
    raise ParseError("unknown command")
