"""Look for secrets (the token's PINs) in what a host logs, on the controller.

The posture suite brings the host's logs to the controller (the journal in journalctl's export
format, /var/log and the other log files as a tar stream) and searches them here: a search on
the host would need the PIN on a command line there, which is the very leak it looks for (sudo,
auditd's execve records and the suite's own channel log every command). Nothing here prints a
secret: `Secret` hides its value from repr, and a hit names where it is (file, journal field,
unit, time), never the text around it.

A secret is searched as given and in the encodings a log applies: auditd writes an argument or
a proctitle with a space, a quote or a NUL in it as upper-case hex. A short secret (a hardware
token's 6-digit PIN) would turn up by chance inside the numbers logs are full of (timestamps,
PIDs, inode numbers): as given, it counts only where no letter or digit touches it (`pin=123456`,
not `1764612648123456`), and the journal fields that journald itself fills with numbers and ids
are not searched. Long secrets (the lab's 32-character PINs) count wherever they appear.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import re
import shlex
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# The fields that say where a journal entry comes from (never the message itself).
_ORIGIN = (b"_SYSTEMD_UNIT", b"_SYSTEMD_USER_UNIT", b"SYSLOG_IDENTIFIER", b"_COMM", b"_UID")
_GZIP, _XZ, _BZ2, _ZSTD = b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh", b"\x28\xb5\x2f\xfd"
MAX_DEPTH = 3  # a compressed file inside a compressed file inside ...
SHORT = 12  # a secret shorter than this counts only between non-alphanumerics (see above)
# Every custodian's share of the PIN starts with this (signer/shares.py: PREFIX and a dot;
# tests/unit/test_pin_shares.py holds the two equal). No one but its custodian ever sees a
# share, not even the controller, so a log search looks for the marker: any share in a log is
# found, whoever's it is. No message of the signer holds it.
SHARE_MARKER = b"signer-share-1."
# Filled by journald, never with what a process says: numbers, ids, timestamps.
_JOURNALD_FIELDS = frozenset({
    b"_PID", b"_UID", b"_GID", b"_BOOT_ID", b"_MACHINE_ID", b"_HOSTNAME", b"_TRANSPORT",
    b"_CAP_EFFECTIVE", b"_AUDIT_SESSION", b"_AUDIT_LOGINUID", b"_SOURCE_REALTIME_TIMESTAMP",
    b"_SOURCE_MONOTONIC_TIMESTAMP", b"_SYSTEMD_INVOCATION_ID", b"_STREAM_ID",
    b"_SYSTEMD_OWNER_UID", b"_SYSTEMD_SESSION", b"_LINE_BREAK", b"_RUNTIME_SCOPE",
})


class Secret:
    """A secret value that never shows itself in a repr, a traceback or an assertion message."""

    __slots__ = ("_bounded", "_value")

    def __init__(self, value: bytes) -> None:
        self._value = value
        self._bounded = re.compile(
            rb"(?<![A-Za-z0-9])" + re.escape(value) + rb"(?![A-Za-z0-9])") if value else None

    def __repr__(self) -> str:
        return f"<secret, {len(self._value)} bytes>"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self._value)

    def _encoded(self) -> tuple[bytes, ...]:
        """Hex-encoded, as auditd writes an argument or a proctitle."""
        hexed = self._value.hex()
        return tuple(dict.fromkeys((hexed.upper().encode(), hexed.encode())))

    def same_as(self, other: Secret) -> bool:
        return self._value == other._value

    def found_in(self, data: bytes) -> bool:
        v = self._value
        if not v:
            return False
        if v in data and (len(v) >= SHORT or (self._bounded is not None
                                              and self._bounded.search(data) is not None)):
            return True
        return any(n in data for n in self._encoded())


@dataclass
class Findings:
    """Where each secret was found (labels and places only) and what could not be searched."""

    hits: list[str] = field(default_factory=list)
    unsearched: list[str] = field(default_factory=list)
    searched: int = 0  # files and journal entries looked at (a search of nothing proves nothing)

    def add(self, other: Findings) -> None:
        self.hits += other.hits
        self.unsearched += other.unsearched
        self.searched += other.searched


def journal_entries(export: bytes) -> Iterator[dict[bytes, bytes]]:
    """The entries of journalctl's export format (text fields `NAME=value`, binary fields
    `NAME\\n<le64 size><data>\\n`, entries separated by an empty line)."""
    pos, end = 0, len(export)
    entry: dict[bytes, bytes] = {}
    while pos < end:
        nl = export.find(b"\n", pos)
        if nl < 0:
            nl = end
        line = export[pos:nl]
        if not line:
            if entry:
                yield entry
            entry = {}
            pos = nl + 1
            continue
        name, eq, value = line.partition(b"=")
        if eq:
            pos = nl + 1
        else:  # binary field: the size, the data, a newline
            (size,) = struct.unpack("<Q", export[nl + 1:nl + 9].ljust(8, b"\0"))
            value = export[nl + 9:nl + 9 + size]
            pos = nl + 9 + size + 1
        entry[name] = value
    if entry:
        yield entry


def search_journal(export: bytes, secrets: dict[str, Secret]) -> Findings:
    """Every journal entry that holds a secret, by field and origin (unit, identifier, uid)."""
    found = Findings()
    if not any(s.found_in(export) for s in secrets.values()):
        found.searched = export.count(b"\n__CURSOR=") + export.startswith(b"__CURSOR=")
        return found
    for entry in journal_entries(export):
        found.searched += 1
        for label, secret in secrets.items():
            fields = [n.decode(errors="replace") for n, v in entry.items()
                      if not n.startswith(b"__") and n not in _JOURNALD_FIELDS
                      and secret.found_in(v)]
            if fields:
                origin = ", ".join(f"{n.decode()}={entry[n].decode(errors='replace')[:60]}"
                                   for n in _ORIGIN if n in entry)
                when = entry.get(b"__REALTIME_TIMESTAMP", b"?").decode()
                found.hits.append(f"{label}: journal entry at {when} (usec), field(s) "
                                  f"{', '.join(sorted(fields))} ({origin})")
    return found


def _decompressed(data: bytes) -> bytes | None:
    """The content of a compressed file (None: a format the standard library cannot read)."""
    if data.startswith(_GZIP):
        # Concatenated members (gzip -c >> file) included; a truncated file gives what it has.
        out = io.BytesIO()
        d = zlib.decompressobj(wbits=31)
        rest = data
        while rest:
            out.write(d.decompress(rest))
            rest = d.unused_data
            if rest and not rest.startswith(_GZIP):
                break
            if rest:
                d = zlib.decompressobj(wbits=31)
        return out.getvalue()
    if data.startswith(_XZ):
        return lzma.decompress(data)
    if data.startswith(_BZ2):
        return bz2.decompress(data)
    return None


def search_file(name: str, data: bytes, secrets: dict[str, Secret], depth: int = 0) -> Findings:
    """One file's content, and the content of the file it compresses (rotated logs, sudo's
    I/O logs), searched for every secret."""
    found = Findings(searched=1)
    for label, secret in secrets.items():
        if secret.found_in(data):
            found.hits.append(f"{label}: {name}")
    if data.startswith((_GZIP, _XZ, _BZ2)) and depth < MAX_DEPTH:
        try:
            inner = _decompressed(data)
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
            found.unsearched.append(f"{name}: cannot decompress ({type(exc).__name__})")
            return found
        if inner is not None:
            deeper = search_file(f"{name} (decompressed)", inner, secrets, depth + 1)
            deeper.searched -= 1
            found.add(deeper)
    elif data.startswith(_ZSTD):
        found.unsearched.append(f"{name}: zstd-compressed, not searched")
    return found


def search_tar(stream: bytes, secrets: dict[str, Secret]) -> Findings:
    """Every regular file of a tar stream (gzip-compressed or not)."""
    found = Findings()
    try:
        archive = tarfile.open(fileobj=io.BytesIO(stream), mode="r:*")
    except tarfile.TarError as exc:
        found.unsearched.append(f"the archive of the host's log files: {exc}")
        return found
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                fh = archive.extractfile(member)
                if fh is None:
                    found.unsearched.append(f"/{member.name}: cannot be read from the archive")
                    continue
                found.add(search_file(f"/{member.name}", fh.read(), secrets))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            found.unsearched.append(f"the archive of the host's log files ends early: {exc}")
    return found


def decompress_gzip(data: bytes) -> bytes:
    """A gzip stream from the host (the journal export, compressed for the trip)."""
    return gzip.decompress(data)


# `run(command)` as root on the host: (exit status, standard output as bytes, standard error).
RootRun = Callable[[str], tuple[int, bytes, str]]


def search_host_logs(run: RootRun, log_paths: list[str], secrets: dict[str, Secret]) -> Findings:
    """Every log the host keeps, brought to the controller through `run` and searched here.

    Every journal (system and users', persistent and volatile: root's journalctl reads them
    all), every field of every entry, compressed for the trip; then the log files: `log_paths`
    (/var/log, the signer's audit log, sudo's log: the caller's inventory says where), and
    auditd's log directory wherever auditd.conf puts it, as one tar stream. The commands hold
    no secret (the host logs them): only paths."""
    found = Findings()
    rc, journal, err = run("bash -o pipefail -c 'journalctl --no-pager -q -o export | gzip -1 -c'")
    if rc != 0:
        found.unsearched.append(f"the journal: journalctl failed: {err[-300:]}")
    else:
        found.add(search_journal(decompress_gzip(journal), secrets))
    _rc, conf, _err = run(
        "sed -n 's/^[[:space:]]*log_file[[:space:]]*=[[:space:]]*//p' /etc/audit/auditd.conf")
    audit_file = conf.decode(errors="replace").strip()
    paths = list(log_paths) + ([posixpath.dirname(audit_file)] if audit_file else [])
    _rc, listed, _err = run("for p in " + " ".join(shlex.quote(p) for p in paths)
                            + '; do [ -e "$p" ] && printf "%s\\n" "${p#/}"; done')
    existing = listed.decode(errors="replace").split()
    rc, files, err = run("tar -C / --exclude=var/log/journal --ignore-failed-read -czf - "
                         + " ".join(shlex.quote(p) for p in sorted(set(existing))))
    if rc not in (0, 1):  # 1: a file changed while it was read (logs do)
        found.unsearched.append(f"the log files: tar failed: {err[-300:]}")
    else:
        found.add(search_tar(files, secrets))
    return found
