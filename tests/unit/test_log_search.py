"""toolkit.assurance.log_search: the posture suite's search for the token PINs in a host's logs, on the
controller. Every hit names where (file, journal field and origin), never the secret."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile

import pytest

from toolkit.assurance.log_search import (
    Secret,
    journal_entries,
    search_file,
    search_journal,
    search_tar,
)

PIN = b"Zq8fK2mWw3rT9pXy"
SECRETS = {"user PIN": Secret(PIN), "SO PIN": Secret(b"11223344")}  # a short, numeric one


def _entry(fields: dict[str, bytes], binary: dict[str, bytes] | None = None) -> bytes:
    out = b"".join(f"{k}=".encode() + v + b"\n" for k, v in fields.items())
    for k, v in (binary or {}).items():
        out += k.encode() + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
    return out + b"\n"


def _export() -> bytes:
    return (
        _entry({"__CURSOR": b"s=1", "__REALTIME_TIMESTAMP": b"100", "_SYSTEMD_UNIT": b"ssh.service",
                "MESSAGE": b"Accepted publickey for admin"})
        + _entry({"__CURSOR": b"s=2", "__REALTIME_TIMESTAMP": b"200", "_UID": b"1000",
                  "_SYSTEMD_USER_UNIT": b"session.scope", "SYSLOG_IDENTIFIER": b"sudo",
                  "MESSAGE": b"admin : COMMAND=/bin/sh -c 'P=" + PIN + b" pkcs11-tool'"})
        # a binary field (a message with a newline in it), the PIN inside
        + _entry({"__CURSOR": b"s=3", "__REALTIME_TIMESTAMP": b"300", "_COMM": b"python3"},
                 {"MESSAGE": b"line one\nline two " + PIN + b"\n\nend"})
    )


def test_a_secret_never_shows_itself() -> None:
    s = Secret(PIN)
    assert PIN.decode() not in repr(s) and PIN.decode() not in str(s) and f"{s}" == repr(s)
    assert repr(s) == "<secret, 16 bytes>"
    assert s.same_as(Secret(PIN)) and not s.same_as(Secret(PIN[:-1]))


def test_journal_export_is_split_into_entries_with_binary_fields() -> None:
    entries = list(journal_entries(_export()))
    assert [e[b"__CURSOR"] for e in entries] == [b"s=1", b"s=2", b"s=3"]
    assert entries[2][b"MESSAGE"] == b"line one\nline two " + PIN + b"\n\nend"


def test_journal_hits_name_the_entry_and_field_not_the_secret() -> None:
    found = search_journal(_export(), SECRETS)
    assert found.searched == 3
    assert len(found.hits) == 2, found.hits
    assert "user PIN: journal entry at 200" in found.hits[0]
    assert "field(s) MESSAGE" in found.hits[0] and "_UID=1000" in found.hits[0]
    assert "SYSLOG_IDENTIFIER=sudo" in found.hits[0]
    assert "at 300" in found.hits[1] and "_COMM=python3" in found.hits[1]
    assert not any(PIN.decode() in h for h in found.hits)


def test_a_clean_journal_is_counted_and_has_no_hits() -> None:
    clean = _export().replace(PIN, b"<nothing>")
    found = search_journal(clean, SECRETS)
    assert found.hits == [] and found.searched == 3


def test_auditd_hex_encoding_is_found() -> None:
    # auditd writes a proctitle (and an argument with a space in it) as upper-case hex
    line = b"type=PROCTITLE msg=audit(1.2:3): proctitle=" + (b"sh\0-c\0P=" + PIN).hex().upper().encode()
    found = search_file("/var/log/audit/audit.log", line, SECRETS)
    assert found.hits == ["user PIN: /var/log/audit/audit.log"]


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_log_files_rotated_compressed_and_nested_are_searched() -> None:
    stream = _tar({
        "var/log/sudo.log": b"nothing here\n",
        "var/log/auth.log.2.gz": gzip.compress(b"x\n11223344\n"),
        "var/log/sudo-io/00/00/01/stdin": gzip.compress(gzip.compress(PIN)),
        "var/log/old.xz": lzma.compress(b"user " + PIN),
        "var/log/other.zst": b"\x28\xb5\x2f\xfd" + b"\0" * 8,
    })
    found = search_tar(stream, SECRETS)
    assert found.searched == 5
    # (xz may keep a short input's bytes as they are: then the raw file is a hit as well)
    assert {h for h in found.hits if h != "user PIN: /var/log/old.xz"} == {
        "SO PIN: /var/log/auth.log.2.gz (decompressed)",
        "user PIN: /var/log/sudo-io/00/00/01/stdin (decompressed) (decompressed)",
        "user PIN: /var/log/old.xz (decompressed)",
    }
    assert found.unsearched == ["/var/log/other.zst: zstd-compressed, not searched"]


def test_a_broken_archive_is_reported_as_not_searched() -> None:
    found = search_tar(b"not a tar stream", SECRETS)
    assert found.hits == [] and found.searched == 0
    assert found.unsearched and "archive" in found.unsearched[0]


@pytest.mark.parametrize("data", [gzip.compress(b"abc")[:-6], b"\x1f\x8b" + b"junk"])
def test_a_broken_compressed_file_is_not_a_silent_pass(data: bytes) -> None:
    found = search_file("/var/log/x.gz", data, SECRETS)
    assert found.hits == []
    assert found.unsearched or found.searched == 1  # truncated: what it has was searched


def test_a_short_numeric_pin_counts_only_where_it_stands_alone() -> None:
    """A 6-digit hardware PIN turns up inside timestamps and ids by chance: not a hit there."""
    pin = Secret(b"648213")
    assert not pin.found_in(b"msg=audit(1764612648213.012:77): pid=648213x")
    assert pin.found_in(b"COMMAND=/usr/bin/pkcs11-tool --pin 648213 --login")
    assert pin.found_in(b"pin=648213\n")
    assert pin.found_in(b"proctitle=" + b"--pin=648213".hex().upper().encode())
    long = Secret(PIN)
    assert long.found_in(b"x" + PIN + b"y")  # a long secret counts wherever it is


def test_journald_numbers_are_not_searched_but_what_a_process_says_is() -> None:
    pin = {"PIN": Secret(b"4242")}
    entry = _entry({"__CURSOR": b"s=9", "__REALTIME_TIMESTAMP": b"4242", "_PID": b"4242",
                    "MESSAGE": b"started"})
    assert search_journal(entry, pin).hits == []
    said = _entry({"__CURSOR": b"s=9", "_PID": b"4242", "_CMDLINE": b"tool --pin 4242"})
    assert [h.split(", field(s) ")[1].split(" ")[0] for h in search_journal(said, pin).hits] == [
        "_CMDLINE"]
