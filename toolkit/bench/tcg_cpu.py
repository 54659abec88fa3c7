"""Which CPU model the lab's TCG guest should emulate (lab.vm.TCG_CPU), measured, not assumed.

The guest's own userland (the cached base image of the default release, mounted read-only) runs
the same Python workload under QEMU's user-mode emulator (`qemu-x86_64`, Debian package
`qemu-user`: the same TCG code generator as the system emulator) with each CPU model, the
models taking turns, several rounds. The figure is the ratio of medians: QEMU's `max` against the
lab's model. glibc, OpenSSL and Python pick their vector routines from what the CPU offers, so
the model decides which code the guest runs; process start-up (code translation) is measured
apart, since it gains little.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

WORK = r"""
import hashlib, json, re, zlib
d = b'abcdefgh' * 300000
for _ in range(3):
    zlib.compress(d); hashlib.sha256(d).hexdigest(); json.loads(json.dumps(list(range(30000))))
    s = d.decode(); s.find('zz'); s.replace('a', 'b'); re.findall('ab+c', s[:200000])
"""
START = "import json, ssl, subprocess, asyncio, email.parser"


def _python(root: Path) -> tuple[Path, list[str]]:
    """The image's python3 and the sys.path entries it needs when run from outside its root."""
    libs = sorted(root.glob("usr/lib/python3.*/"), key=lambda p: p.name)
    libs = [p for p in libs if (p / "os.py").exists()]
    if not libs:
        raise RuntimeError(f"no Python standard library in {root}/usr/lib")
    lib = libs[-1]
    return root / "usr/bin/python3", [str(lib), str(lib / "lib-dynload")]


def _timed(model: str, root: Path, code: str) -> float:
    exe, path = _python(root)
    prog = f"import sys; sys.path[:0] = {path!r}\n{code}"
    t = time.perf_counter()
    subprocess.run(["qemu-x86_64", "-cpu", model, "-L", str(root), str(exe), "-S", "-c", prog],
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t


def run(rounds: int = 3) -> dict[str, Any]:
    from lab import image, vm

    if shutil.which("qemu-x86_64") is None:
        return {"measured": False, "why": "qemu-x86_64 is not installed (apt install qemu-user)"}
    base = image.image_dir(image.DEFAULT_RELEASE)
    if not image.is_built(base):
        return {"measured": False, "why": "no cached base image of the default release: "
                                          "run `invoke lab.up` first"}
    models = {"max": "max", "lab": vm.TCG_CPU}
    times: dict[str, dict[str, list[float]]] = {k: {"work": [], "start": []} for k in models}
    with tempfile.TemporaryDirectory(prefix="bench-tcg-") as tmp:
        raw, mnt = Path(tmp) / "root.raw", Path(tmp) / "root"
        mnt.mkdir()
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image.artefacts(base)["disk"]),
                        str(raw)], check=True)
        subprocess.run(["mount", "-o", "loop,ro", str(raw), str(mnt)], check=True)
        try:
            for _ in range(rounds):
                for key, model in models.items():
                    times[key]["work"].append(_timed(model, mnt, WORK))
                    times[key]["start"].append(_timed(model, mnt, START))
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    med = {k: {w: statistics.median(v) for w, v in t.items()} for k, t in times.items()}
    return {
        "measured": True, "lab_model": vm.TCG_CPU, "rounds": rounds,
        "work_s": {k: round(v["work"], 2) for k, v in med.items()},
        "start_s": {k: round(v["start"], 2) for k, v in med.items()},
        "work_max_over_lab": round(med["max"]["work"] / med["lab"]["work"], 2),
        "start_max_over_lab": round(med["max"]["start"] / med["lab"]["start"], 2),
    }
