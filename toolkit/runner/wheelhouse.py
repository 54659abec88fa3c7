"""The wheelhouse that `invoke deploy` copies to signing hosts, built from a hash lock.

The signer's third-party run-time dependencies are pinned, with the sha256 of every file, in
``requirements/signer-host.lock`` (committed, reviewed like code). ``invoke lock-deps`` writes it
with ``uv pip compile --generate-hashes``: uv, not pip-tools, because uv resolves for a *target*
(``--python-version 3.11 --python-platform x86_64-manylinux_2_36``: the host's Debian 12 CPython
on x86_64, glibc 2.36) whatever the controller runs, ships as one wheel with no dependency on the
controller's pip version, and writes the same requirements format pip reads.

The signer itself is built here from this checkout, so its hash cannot be committed. Its wheel
is built with a fixed SOURCE_DATE_EPOCH (same sources, same bytes), its sha256 is computed at build
time and written with the lock's pins into ``build/wheelhouse/requirements.txt``, which the host
installs with ``pip install --no-index --find-links <wheels> --require-hashes -r``.
`verify()` runs before deploy touches a host and refuses a wheelhouse that does not match: the
third-party part must equal the committed lock, every wheel's sha256 must be a hash of its pin, no
file may be missing or extra, and the signer wheel must hold exactly this checkout's package files.
The deploy role copies the directory and reinstalls only when a file changed, so a second deploy
stays `changed=0`; a stamp over the sources and the lock makes `build()` skip an unchanged build.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "signer-host.lock"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
REQUIREMENTS = "requirements.txt"  # in the wheelhouse: what the host installs
STAMP = ".sources.sha256"
SIGNER = "signing-host"
LOCK_COMMAND = "invoke lock-deps"
# The host: Debian 12's CPython 3.11 on x86_64 with glibc 2.36.
PYTHON_VERSION = "3.11"
GLIBC = (2, 36)
# pip does not widen manylinux_2_x to older glibc versions by itself: list them, newest first
# (the order the host's own pip prefers).
PIP_TARGET = (
    "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
    *(a for minor in range(GLIBC[1], 16, -1)
      for a in ("--platform", f"manylinux_{GLIBC[0]}_{minor}_x86_64")),
    "--platform", "manylinux2014_x86_64",
)
UV_TARGET = ("--python-version", PYTHON_VERSION,
             "--python-platform", f"x86_64-manylinux_{GLIBC[0]}_{GLIBC[1]}")
SOURCE_DATE_EPOCH = "1700000000"
# build() rebuilds by itself when the sources or the lock change; a wheelhouse that fails the
# check after that was changed by something else, so it is refused, not silently rebuilt.
_REBUILD = "; find out what changed it, then delete the directory to rebuild it"


class WheelhouseError(RuntimeError):
    """One-line reason why the wheelhouse could not be built or is refused."""


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503)
    version: str
    hashes: frozenset[str]  # sha256 hex digests


def parse_requirements(text: str, origin: str) -> dict[str, Pin]:
    """The pins of a hash-locked requirements file (`name==version --hash=sha256:...`).

    Anything a lock must not contain (an unpinned name, a missing hash, an option such as
    --index-url or -e, an environment marker) is refused rather than skipped.
    """
    pins: dict[str, Pin] = {}
    logical = ""
    for raw in [*text.splitlines(), ""]:
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if not logical.strip():
            logical = ""
            continue
        words, logical = logical.split(), ""
        hashes = {w.removeprefix("--hash=sha256:") for w in words[1:]
                  if w.startswith("--hash=sha256:")}
        if words[0].startswith("-") or len(hashes) != len(words) - 1:
            raise WheelhouseError(f"{origin}: not a hash-locked requirement: {' '.join(words)}")
        try:
            req = Requirement(words[0])
        except InvalidRequirement as e:
            raise WheelhouseError(f"{origin}: {e}") from None
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or req.marker or req.extras or req.url:
            raise WheelhouseError(f"{origin}: {words[0]} is not pinned with == alone")
        if not hashes:
            raise WheelhouseError(f"{origin}: {words[0]} has no --hash")
        name = canonicalize_name(req.name)
        if name in pins:
            raise WheelhouseError(f"{origin}: {name} is pinned twice")
        pins[name] = Pin(name, spec[0].version, frozenset(hashes))
    return pins


def read_lock(lock: Path = LOCK) -> dict[str, Pin]:
    try:
        return parse_requirements(lock.read_text(), _show(lock))
    except FileNotFoundError:
        raise WheelhouseError(f"no lock file {_show(lock)}: run `{LOCK_COMMAND}`") from None


def project_dependencies() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps: list[str] = data["project"]["dependencies"]
    return deps


def check_lock_covers(dependencies: list[str], pins: dict[str, Pin], origin: str) -> None:
    """Every direct dependency of the signer is pinned by the lock within its declared range."""
    for dep in dependencies:
        req = Requirement(dep)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(Version(pin.version), prereleases=True):
            found = f"{pin.name}=={pin.version}" if pin else "nothing"
            raise WheelhouseError(
                f"{origin} is out of date: pyproject.toml wants {dep}, the lock pins {found}; "
                f"run `{LOCK_COMMAND}`"
            )


def lock(upgrade: bool = False, packages: tuple[str, ...] = (), lock_file: Path = LOCK) -> None:
    """Write the lock from pyproject.toml's run-time dependencies (keeps pins unless upgraded)."""
    uv = ROOT / ".venv" / "bin" / "uv"
    exe = str(uv) if uv.exists() else shutil.which("uv")
    if exe is None:
        raise WheelhouseError("uv is not installed: run `make setup` (it is in the dev extras)")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "pip", "compile", "--quiet", "pyproject.toml", "--generate-hashes",
           "--only-binary", ":all:", *UV_TARGET, "--custom-compile-command", LOCK_COMMAND,
           "--output-file", str(lock_file)]
    if upgrade:
        cmd.append("--upgrade")
    for p in packages:
        cmd += ["--upgrade-package", p]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WheelhouseError(f"uv pip compile failed: {_last_line(proc.stderr)}")
    check_lock_covers(project_dependencies(), read_lock(lock_file), _show(lock_file))


def _sources() -> list[Path]:
    files = [ROOT / "pyproject.toml"]
    files += sorted(p for p in (ROOT / "signer").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def sources_digest(lock_file: Path = LOCK) -> str:
    h = hashlib.sha256()
    for p in [*_sources(), lock_file]:
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def _pip(*args: str) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise WheelhouseError(f"pip {args[0]} failed: {_last_line(proc.stderr)}")


def build(force: bool = False, wheelhouse: Path | None = None, lock_file: Path = LOCK) -> Path:
    """Build (or reuse) the wheelhouse from the lock, verify it, and return its directory."""
    wheelhouse = wheelhouse or WHEELHOUSE
    pins = read_lock(lock_file)
    check_lock_covers(project_dependencies(), pins, _show(lock_file))
    digest = sources_digest(lock_file)
    stamp = wheelhouse / STAMP
    if force or not stamp.exists() or stamp.read_text().strip() != digest:
        _build(wheelhouse, lock_file)
        stamp.write_text(digest + "\n")
    verify(wheelhouse, lock_file)
    return wheelhouse


def _build(wheelhouse: Path, lock_file: Path) -> None:
    print(f"==> wheelhouse: building the signer and its locked dependencies into {wheelhouse}",
          flush=True)
    tmp = wheelhouse.with_name(wheelhouse.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The signer (pure Python) from this checkout, without its dependencies ...
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp), str(ROOT))
    # ... the locked third-party wheels for the host, each checked by pip against its hashes ...
    _pip("download", "--quiet", "--require-hashes", "--no-deps", "--only-binary=:all:",
         *PIP_TARGET, "--dest", str(tmp), "-r", str(lock_file))
    ours = [p for p in tmp.glob("*.whl") if _wheel_name(p) == SIGNER]
    if len(ours) != 1:
        raise WheelhouseError(f"pip wheel gave {len(ours)} {SIGNER} wheels, expected one")
    _keep_unchanged_signer(ours[0], wheelhouse)
    version = parse_wheel_filename(ours[0].name)[1]
    signer_line = f"{SIGNER}=={version} \\\n    --hash=sha256:{_sha256(ours[0])}\n"
    (tmp / REQUIREMENTS).write_text(
        "# What the signing host installs (pip install --no-index --require-hashes -r).\n"
        f"# Written by toolkit/runner/wheelhouse.py: the signer built from this checkout, then\n"
        f"# {_show(lock_file)} unchanged.\n" + signer_line + lock_file.read_text()
    )
    # ... and the host's install replayed offline: the signer's own dependencies must all be in
    # the lock, pinned and hashed, or pip refuses here instead of on the host.
    with tempfile.TemporaryDirectory() as scratch:
        _pip("download", "--quiet", "--no-index", "--find-links", str(tmp), "--require-hashes",
             "--only-binary=:all:", *PIP_TARGET, "--dest", scratch, "-r", str(tmp / REQUIREMENTS))
    shutil.rmtree(wheelhouse, ignore_errors=True)
    tmp.rename(wheelhouse)


def _keep_unchanged_signer(new: Path, wheelhouse: Path) -> None:
    """Keep the bytes of an unchanged signer wheel: the host then sees no change at all."""
    old = wheelhouse / new.name
    if old.is_file() and _same_contents(old.read_bytes(), new.read_bytes()):
        shutil.copyfile(old, new)


def verify(wheelhouse: Path | None = None, lock_file: Path = LOCK) -> None:
    """Refuse (WheelhouseError) a wheelhouse that does not match the committed lock."""
    wheelhouse = wheelhouse or WHEELHOUSE
    where = _show(wheelhouse)
    req_file = wheelhouse / REQUIREMENTS
    if not req_file.is_file():
        raise WheelhouseError(f"{where} has no {REQUIREMENTS}: run `invoke deploy` to build it")
    shipped = parse_requirements(req_file.read_text(), f"{where}/{REQUIREMENTS}")
    locked = read_lock(lock_file)
    signer = shipped.pop(SIGNER, None)
    if signer is None or len(signer.hashes) != 1:
        raise WheelhouseError(
            f"{where}/{REQUIREMENTS} does not pin the {SIGNER} wheel by hash{_REBUILD}")
    if shipped != locked:
        differ = sorted(n for n in {*shipped, *locked} if shipped.get(n) != locked.get(n))
        raise WheelhouseError(
            f"{where}/{REQUIREMENTS} does not match {_show(lock_file)} "
            f"({', '.join(differ)}){_REBUILD}"
        )
    pins = {**locked, SIGNER: signer}
    found: dict[str, Path] = {}
    for f in sorted(wheelhouse.iterdir()):
        if f.name in (REQUIREMENTS, STAMP):
            continue
        try:
            name, version = (str(x) for x in parse_wheel_filename(f.name)[:2])
        except InvalidWheelFilename:
            raise WheelhouseError(
                f"{where}: {f.name} is not a wheel of the lock{_REBUILD}") from None
        pin = pins.get(canonicalize_name(name))
        if pin is None or Version(version) != Version(pin.version):
            raise WheelhouseError(f"{where}: {f.name} is not in the lock{_REBUILD}")
        if name in found:
            raise WheelhouseError(f"{where}: two wheels for {name}: {found[name].name}, {f.name}")
        if _sha256(f) not in pin.hashes:
            raise WheelhouseError(
                f"{where}: {f.name} does not match its hash in the lock{_REBUILD}")
        found[name] = f
    missing = sorted(set(pins) - set(found))
    if missing:
        raise WheelhouseError(f"{where}: no wheel for {', '.join(missing)} of the lock{_REBUILD}")
    _check_signer_is_checkout(found[SIGNER])


def _check_signer_is_checkout(wheel: Path) -> None:
    """The signer wheel holds exactly this checkout's signer package (a swapped wheel whose hash
    was written into requirements.txt with it would pass the hash check)."""
    with zipfile.ZipFile(wheel) as z:
        inside = {i.filename: z.read(i) for i in z.infolist()
                  if i.filename.startswith("signer/")}
        tops = {i.filename.split("/", 1)[0] for i in z.infolist()}
    ours = {str(p.relative_to(ROOT)): p.read_bytes()
            for p in (ROOT / "signer").rglob("*.py") if "__pycache__" not in p.parts}
    extra = tops - {"signer"} - {t for t in tops if t.endswith(".dist-info")}
    if inside != ours or extra:
        raise WheelhouseError(
            f"{_show(wheel)} is not the signer of this checkout{_REBUILD}"
        )


def _wheel_name(p: Path) -> str:
    return str(parse_wheel_filename(p.name)[0])


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_contents(a: bytes, b: bytes) -> bool:
    """Two wheels with the same members (names and bytes), whatever their zip timestamps."""

    def members(blob: bytes) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return {i.filename: z.read(i) for i in z.infolist()}

    try:
        return members(a) == members(b)
    except zipfile.BadZipFile:
        return False


def _show(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


if __name__ == "__main__":
    try:
        print(build(force="--force" in sys.argv))
    except WheelhouseError as e:
        sys.exit(f"wheelhouse: {e}")
