"""The wheelhouse that `invoke deploy` copies to signing hosts (they need no PyPI access).

The signer and its run-time dependencies are built into ``build/wheelhouse/`` for the host's
CPython 3.11 (Debian 12). Binary dependencies (python-pkcs11, cryptography, cffi) come as
manylinux wheels, so the host needs no compiler. The signer's own wheel is built with a fixed
SOURCE_DATE_EPOCH so that the same sources give the same bytes: the deploy role copies the
directory and reinstalls only when a file's checksum changes, so a second deploy stays
`changed=0`. A stamp over the sources makes `build()` return at once when nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "build" / "wheelhouse"
STAMP = WHEELHOUSE / ".sources.sha256"
# The host's interpreter: Debian 12's CPython 3.11 on x86_64.
TARGET = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64")
SOURCE_DATE_EPOCH = "1700000000"


class WheelhouseError(RuntimeError):
    """One-line reason why the wheelhouse could not be built."""


def _sources() -> list[Path]:
    files = [ROOT / "pyproject.toml"]
    files += sorted(p for p in (ROOT / "signer").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def sources_digest() -> str:
    h = hashlib.sha256()
    for p in _sources():
        h.update(str(p.relative_to(ROOT)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def _pip(*args: str) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WheelhouseError(f"pip {args[0]} failed: {last}")


def build(force: bool = False) -> Path:
    """Build (or reuse) the wheelhouse and return its directory."""
    digest = sources_digest()
    if not force and STAMP.exists() and STAMP.read_text().strip() == digest:
        return WHEELHOUSE
    print(f"==> wheelhouse: building the signer for the host into {WHEELHOUSE}", flush=True)
    tmp = WHEELHOUSE.with_name("wheelhouse.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The signer itself (pure Python), without its dependencies ...
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp), str(ROOT))
    # ... and its dependencies as binary wheels for the host's platform.
    req = tmp / "requirements.txt"
    req.write_text(_requirements())
    _pip("download", "--quiet", "--only-binary=:all:", *TARGET, "--dest", str(tmp),
         "-r", str(req))
    req.unlink()
    old = {p.name: p.read_bytes() for p in WHEELHOUSE.glob("*.whl")} if WHEELHOUSE.exists() else {}
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    tmp.rename(WHEELHOUSE)
    for p in WHEELHOUSE.glob("*.whl"):
        # Keep the bytes of an unchanged wheel: the host then sees no change at all.
        if p.name in old and _same_contents(old[p.name], p.read_bytes()):
            p.write_bytes(old[p.name])
    STAMP.write_text(digest + "\n")
    return WHEELHOUSE


def _requirements() -> str:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return "\n".join(data["project"]["dependencies"]) + "\n"


def _same_contents(a: bytes, b: bytes) -> bool:
    """Two wheels with the same members (names and bytes), whatever their zip timestamps."""
    import io
    import zipfile

    def members(blob: bytes) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return {i.filename: z.read(i) for i in z.infolist()}

    try:
        return members(a) == members(b)
    except zipfile.BadZipFile:
        return False


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
