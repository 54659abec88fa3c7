"""No merge-conflict markers in any tracked file (one sat in threat-model/README.md, unseen,
through several CI runs: no parser reads Markdown)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(rb"^(<{7} |>{7} |={7}$)", re.MULTILINE)


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def test_no_tracked_file_holds_a_conflict_marker() -> None:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.split(b"\0")
    hits = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        hits += [f"{name.decode()}:{_line(data, m.start())}"
                 for m in MARKER.finditer(data)]
    assert not hits, f"merge-conflict markers: {hits}"
