"""What may go into an authorized_keys line of the signer's forced-command accounts.

The role renders each line from inventory values (`restrict,from="...",command="... NAME ..."
KEY`): a newline in a key adds a line of its own choosing (without `restrict` or the forced
command), a quote in a name or a `from` pattern ends the option early. So every value is checked
here, before anything is written, and each problem names its entry. `invoke inventory.check`
applies the same rules (toolkit/runner/inventory_check.py loads this file).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Any

# The signer's own name rule (signer/config.py NAME_RE); a custodian's name, and a build
# client's with the account prefix before it, is also a Unix account, which useradd keeps to
# 32 characters.
NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
ACCOUNT_MAX = 32
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa",
)
BLOB = re.compile(r"[A-Za-z0-9+/]+={0,2}")
COMMENT = re.compile(r"[^\x00-\x1f\x7f]*")
# sshd's from= patterns: addresses, CIDR, host names, wildcards, negation. Never a quote, a
# comma (the list separator: one pattern per entry), a space or a control character.
FROM = re.compile(r"!?[A-Za-z0-9.:/*?_-]{1,253}")
PATH = re.compile(r"/[A-Za-z0-9._/-]*")
# Before a client's name (which starts with a letter): a Unix account's start, or nothing.
ACCOUNT_PREFIX = re.compile(r"([a-z_][a-z0-9_-]*)?")


def key_problem(key: Any) -> str | None:
    """Why `key` is not one OpenSSH public key line of a known type (None when it is)."""
    if not isinstance(key, str):
        return f"not a public key line (a {type(key).__name__})"
    text = key.strip()
    if any(c in text for c in "\r\n\x00"):
        return "more than one line (one public key per entry)"
    parts = text.split(" ", 2)
    if len(parts) < 2:
        return "not an OpenSSH public key line (type, base64 key, optional comment)"
    kind, blob = parts[0], parts[1]
    if kind not in KEY_TYPES:
        return f"unknown key type {kind[:40]!r} (one of {', '.join(KEY_TYPES)})"
    if not BLOB.fullmatch(blob):
        return "the key is not base64"
    try:
        raw = base64.b64decode(blob, validate=True)
        (n,) = struct.unpack(">I", raw[:4])
        inner = raw[4:4 + n].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        return "the key is not an OpenSSH key blob"
    if inner != kind:
        return f"the key says it is {inner[:40]!r}, the line says {kind!r}"
    if len(parts) == 3 and not COMMENT.fullmatch(parts[2]):
        return "control characters in the comment"
    return None


def entry_problems(entries: Any, var: str, role: str, prefix: str = "") -> list[str]:
    """One line per problem of the entries of `var` (signer_clients, signer_custodians); the
    account of an entry is `prefix` + its name."""
    if not isinstance(entries, list):
        return [f"{var}: not a list"]
    problems: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{var}[{i}]: not a mapping with name, ssh_key and from")
            continue
        name = entry.get("name")
        good_name = isinstance(name, str) and NAME.fullmatch(name) is not None
        where = f"{var}[{name}]" if good_name else f"{var}[{i}]"
        if not good_name:
            problems.append(f"{where}.name: {str(name)[:40]!r} is not a signer name "
                            f"({NAME.pattern})")
        elif isinstance(name, str) and len(prefix + name) > ACCOUNT_MAX:
            problems.append(f"{where}.name: its account {prefix + name!r} is longer than "
                            f"{ACCOUNT_MAX} characters")
        why = key_problem(entry.get("ssh_key"))
        if why:
            problems.append(f"{where}.ssh_key: {why}")
        problems += [f"{where}.from: {p}" for p in from_problems(entry.get("from"))]
    return problems


def _entries(entries: Any) -> list[dict[str, str]]:
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)] \
        if isinstance(entries, list) else []


def from_problems(sources: Any) -> list[str]:
    """Why the `from` list of an entry cannot go into from="..." (empty when it can)."""
    if not isinstance(sources, list) or not sources:
        return ["a non-empty list of address patterns is needed"]
    return [f"{str(p)[:60]!r} is not one address, network or host pattern (no quotes, commas "
            "or spaces)" for p in sources if not isinstance(p, str) or not FROM.fullmatch(p)]


def signer_authorized_keys_problems(clients: Any, custodians: Any, venv: Any = "/",
                                    socket: Any = "/", prefix: Any = "") -> list[str]:
    """Every problem of the values that make up the authorized_keys lines, one line each."""
    problems: list[str] = []
    if not isinstance(prefix, str) or not ACCOUNT_PREFIX.fullmatch(prefix):
        problems.append(f"signer_client_account_prefix: {str(prefix)[:40]!r} cannot start an "
                        f"account name ({ACCOUNT_PREFIX.pattern})")
        prefix = ""
    problems += entry_problems(clients, "signer_clients", "client", prefix)
    problems += entry_problems(custodians, "signer_custodians", "custodian")
    accounts = [prefix + e["name"] for e in _entries(clients)] + [
        e["name"] for e in _entries(custodians)]
    for account in sorted({a for a in accounts if accounts.count(a) > 1}):
        problems.append(f"account {account!r}: two forced-command accounts would be one (a "
                        "build client's is signer_client_account_prefix + its name)")
    for var, value in (("signer_venv", venv), ("signer_socket", socket)):
        if not isinstance(value, str) or not PATH.fullmatch(value):
            problems.append(f"{var}: {str(value)[:60]!r} is not a plain absolute path "
                            "(it goes into the forced command)")
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"signer_authorized_keys_problems": signer_authorized_keys_problems}
