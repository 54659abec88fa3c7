"""Audit log segments: naming, order, and reading backwards (pure file handling; the chain
across segments, rotation and compression through the daemon are in tests/signer)."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from signer import segments


def test_a_closed_segment_is_named_after_its_first_seq(tmp_path: Path) -> None:
    active = tmp_path / "audit.jsonl"
    assert segments.closed_name(active, 1000).name == "audit.000000001000.jsonl"


def test_segments_are_ordered_by_seq_and_the_active_one_comes_last(tmp_path: Path) -> None:
    active = tmp_path / "audit.jsonl"
    for name in ("audit.000000000010.jsonl", "audit.000000000000.jsonl.gz",
                 "audit.000000000010.jsonl.gz", "audit.jsonl", "other.000000000005.jsonl",
                 "audit.000000000020.log"):
        (tmp_path / name).write_bytes(b"")
    names = [s.path.name for s in segments.of_log(active)]
    # the plain copy wins over a .gz of the same segment (a gzip cut short)
    assert names == ["audit.000000000000.jsonl.gz", "audit.000000000010.jsonl", "audit.jsonl"]
    assert [s.path.name for s in segments.resolve([tmp_path / "audit.000000000010.jsonl",
                                                   tmp_path / "audit.000000000000.jsonl.gz"])
            ] == ["audit.000000000000.jsonl.gz", "audit.000000000010.jsonl"]
    with pytest.raises(ValueError, match="more than one log"):
        segments.resolve([tmp_path])


def test_a_compressed_segment_reads_like_a_plain_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.000000000000.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"one\ntwo\nthr")
    seg = segments.resolve([path])[0]
    assert list(segments.lines(seg)) == [(4, b"one\n"), (8, b"two\n"), (11, b"thr")]
    assert list(segments.lines(seg, 4)) == [(8, b"two\n"), (11, b"thr")]


def test_reading_backwards_gives_every_complete_line_and_skips_a_torn_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    monkeypatch.setattr(segments, "BLOCK", 7)  # lines across many block boundaries
    path = tmp_path / "log"
    rng = random.Random(15)
    for _ in range(300):
        lines = [b"x" * rng.randint(0, 20) + b"\n" for _ in range(rng.randint(0, 10))]
        torn = b"t" * rng.randint(0, 5)
        path.write_bytes(b"".join(lines) + torn)
        expected, offset = [], 0
        for line in lines:
            offset += len(line)
            expected.append((offset, line))
        assert list(segments.reverse_lines(path, offset + len(torn))) == expected[::-1]
