"""Signer integrity, round 2 (issue 24): what a start-up believes of a log the daemon did not
verify, roll-back without the key, the clock, and the memory a compressed segment costs."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

from signer import audit, certs
from toolkit.local_signer import Lab

# --- compressed segments are read as streams -------------------------------------------------


def test_a_compressed_segment_costs_bounded_memory_at_start(lab: Lab, tmp_path: Path) -> None:
    """A 52 KB `.gz` segment of repeated state-checkpoint lines (about 12 MB once inflated, as
    a crafted or very repetitive segment compresses) with a snapshot for them: the search for
    the last state checkpoint keeps one line, not every candidate (it cost 15 MiB here before,
    and grows with the inflated size)."""
    _, line = audit.seal(audit.body(1, audit.GENESIS, "checkpoint",
                                    {"state": "00" * 32, "sig": "A" * 96},
                                    "2026-01-01T00:00:00.000000Z"))
    seg = tmp_path / "audit.000000000000.jsonl.gz"
    seg.write_bytes(gzip.compress(line * 30000, 9))
    assert 40_000 < seg.stat().st_size < 60_000
    snapshots = tmp_path / "checkpoints"
    snapshots.mkdir()
    audit.snapshot_path(snapshots, 1).write_bytes(b"{}")
    spki = certs.load_public_key(lab.certs / "audit.pem")
    tracemalloc.start()
    try:
        try:
            audit.scan(tmp_path / "audit.jsonl", lambda _e, _v: None, spki, snapshots,
                       lambda _b: None)
        except audit.ChainError:
            pass  # the forged line is refused; what matters is what finding it cost
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{peak / 2**20:.1f} MiB"
