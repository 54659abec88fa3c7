"""The wheelhouses that `invoke deploy` copies to signing hosts, built from hash locks.

Supported hosts are listed once, in TARGETS: Debian 12 (CPython 3.11, glibc 2.36) and Debian 13
(CPython 3.13, glibc 2.41), both x86_64. Each target has its own lock,
``requirements/signer-host-py311.lock``, ``...-py313.lock`` (committed, reviewed like code), and
its own wheelhouse, ``build/wheelhouse/<target>/`` (``cp311-manylinux_2_36``, ...). The signer
role picks the directory from the host's Python version (its ``python`` facts) and stops, before
it copies anything, on a Python that has no target here.

One lock per target rather than one shared lock, because that is the simplest to review: each
file is exactly what uv writes for one host, verify() compares a wheelhouse with exactly one file,
and nothing has to prove that two resolutions agree. Today the two locks are identical (same pins;
uv writes the hashes of every file of a pinned version, wheels for all platforms included), so a
`diff` of the two shows at a glance where hosts would differ; a dependency that one day resolves
differently for 3.11 and 3.13 (a release that drops 3.11, a marker) needs no change of design.
Because the lock hashes every platform's wheel, a hash does not say which host a wheel is for:
verify() also refuses a wheel whose tags the target's Python cannot install.

``invoke lock-deps`` writes the locks with ``uv pip compile --generate-hashes``: uv, not
pip-tools, because uv resolves for a *target* (``--python-version 3.13 --python-platform
x86_64-manylinux_2_40``) whatever the controller runs, ships as one wheel with no dependency on
the controller's pip version, and writes the same requirements format pip reads. (uv 0.13 names
manylinux platforms up to 2_40: Debian 13's glibc 2.41 is resolved as 2.40, which only matters for
a project whose only wheels need 2.41; the wheel that is downloaded is chosen by pip for 2.41.)

The signer itself is built here from this checkout, so its hash cannot be committed. Its wheel
is built with a fixed SOURCE_DATE_EPOCH (same sources, same bytes), its sha256 is computed at build
time and written with the target's pins into ``build/wheelhouse/<target>/requirements.txt``, which
the host installs with ``pip install --no-index --find-links <wheels> --require-hashes -r``.
`verify()` runs before deploy touches a host and refuses a wheelhouse that does not match: the
third-party part must equal the target's committed lock, every wheel's sha256 must be a hash of its
pin and its tags installable by the target's Python, no file may be missing or extra, and the signer
wheel must hold exactly this checkout's package files. The deploy role copies the directory and
reinstalls only when a file changed, so a second deploy stays `changed=0`; a stamp over the sources
and the lock makes `build()` skip an unchanged build. Two deploys may run at once on one controller
(two lab VMs): `build()` holds an exclusive lock (flock) on ``build/wheelhouse/.build.lock`` while
it builds and verifies, so neither sees the other's half-written directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / "build" / "wheelhouse"  # one directory per target below it
BUILD_LOCK = ".build.lock"  # in WHEELHOUSE: held by build()
REQUIREMENTS = "requirements.txt"  # in a target's wheelhouse: what the host installs
STAMP = ".sources.sha256"
SIGNER = "signing-host"
LOCK_COMMAND = "invoke lock-deps"
# uv 0.13's newest manylinux platform name (see the module docstring).
UV_MAX_GLIBC = (2, 40)


@dataclass(frozen=True)
class Target:
    """A supported signing host: its CPython (x86_64) and glibc."""

    name: str  # the wheelhouse directory, build/wheelhouse/<name>/
    python: str  # major.minor, as the host's `python` facts give it
    abi: str
    glibc: tuple[int, int]

    @property
    def lock(self) -> Path:
        return ROOT / "requirements" / f"signer-host-py{self.python.replace('.', '')}.lock"

    def platforms(self) -> list[str]:
        # pip does not widen manylinux_2_x to older glibc versions by itself: list them, newest
        # first (the order the host's own pip prefers).
        major, newest = self.glibc
        return [*(f"manylinux_{major}_{minor}_x86_64" for minor in range(newest, 16, -1)),
                "manylinux2014_x86_64"]

    def pip_args(self) -> list[str]:
        return ["--python-version", self.python, "--implementation", "cp", "--abi", self.abi,
                *(a for p in self.platforms() for a in ("--platform", p))]

    def uv_args(self) -> list[str]:
        major, minor = min(self.glibc, UV_MAX_GLIBC)
        return ["--python-version", self.python,
                "--python-platform", f"x86_64-manylinux_{major}_{minor}"]

    def tags(self) -> frozenset[Tag]:
        """The wheel tags the target's Python installs (CPython, stable ABI, pure Python)."""
        version = tuple(int(x) for x in self.python.split("."))
        return frozenset([*cpython_tags(version, [self.abi], self.platforms()),
                          *compatible_tags(version, f"cp{self.python.replace('.', '')}",
                                           self.platforms())])


# Every supported host. The signer role has the same table (roles/signer/vars/main.yml,
# signer_wheelhouse_targets; a unit test holds them equal).
TARGETS = (
    Target("cp311-manylinux_2_36", "3.11", "cp311", (2, 36)),  # Debian 12
    Target("cp313-manylinux_2_41", "3.13", "cp313", (2, 41)),  # Debian 13
)
# build() rebuilds by itself when the sources or the lock change; a wheelhouse that fails the
# check after that was changed by something else, so it is refused, not silently rebuilt.
_REBUILD = "; find out what changed it, then delete the directory to rebuild it"
SOURCE_DATE_EPOCH = "1700000000"


class WheelhouseError(RuntimeError):
    """One-line reason why the wheelhouse could not be built or is refused."""


def supported() -> str:
    return ", ".join(f"Python {t.python} ({t.name})" for t in TARGETS)


def target_for(python: str) -> Target:
    """The target of a host whose Python is `python` (major.minor), or refused."""
    for t in TARGETS:
        if t.python == python:
            return t
    raise WheelhouseError(f"no wheelhouse for Python {python}: supported are {supported()}")


def target_named(name: str) -> Target:
    for t in TARGETS:
        if t.name == name or t.python == name:
            return t
    raise WheelhouseError(f"no target {name}: supported are {supported()}")


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


def read_lock(lock: Path) -> dict[str, Pin]:
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


def lock(upgrade: bool = False, packages: tuple[str, ...] = (),
         targets: tuple[Target, ...] = TARGETS) -> None:
    """Write each target's lock from pyproject.toml's run-time dependencies (keeps pins unless
    upgraded)."""
    for target in targets:
        lock_target(target, upgrade, packages)


def lock_target(target: Target, upgrade: bool = False, packages: tuple[str, ...] = (),
                lock_file: Path | None = None) -> None:
    lock_file = lock_file or target.lock
    # uv is in the dev extras: the checkout's venv, or the one running this (a git worktree).
    venvs = (ROOT / ".venv" / "bin" / "uv", Path(sys.executable).parent / "uv")
    exe = next((str(uv) for uv in venvs if uv.exists()), None) or shutil.which("uv")
    if exe is None:
        raise WheelhouseError("uv is not installed: run `make setup` (it is in the dev extras)")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "pip", "compile", "--quiet", "pyproject.toml", "--generate-hashes",
           "--only-binary", ":all:", *target.uv_args(), "--custom-compile-command", LOCK_COMMAND,
           "--output-file", str(lock_file)]
    if upgrade:
        cmd.append("--upgrade")
    for p in packages:
        cmd += ["--upgrade-package", p]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WheelhouseError(f"uv pip compile ({target.name}) failed: {_last_line(proc.stderr)}")
    check_lock_covers(project_dependencies(), read_lock(lock_file), _show(lock_file))


def _sources() -> list[Path]:
    files = [ROOT / "pyproject.toml"]
    files += sorted(p for p in (ROOT / "signer").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def sources_digest(lock_file: Path) -> str:
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


def build(force: bool = False, wheelhouse: Path | None = None,
          targets: tuple[Target, ...] = TARGETS) -> Path:
    """Build (or reuse) each target's wheelhouse from its lock, verify it, and return the
    directory that holds them (one subdirectory per target)."""
    wheelhouse = wheelhouse or WHEELHOUSE
    with _build_lock(wheelhouse):
        for stale in wheelhouse.iterdir():  # the files of the one-target layout before it
            if stale.is_file() and stale.name != BUILD_LOCK:
                stale.unlink()
        for target in targets:
            _build_target(force, wheelhouse / target.name, target)
    return wheelhouse


@contextmanager
def _build_lock(wheelhouse: Path) -> Iterator[None]:
    """One build at a time per wheelhouse on this controller (another deploy waits here)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    with (wheelhouse / BUILD_LOCK).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"==> wheelhouse: {_show(wheelhouse)} is being built by another run; waiting",
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_target(force: bool, wheelhouse: Path, target: Target) -> None:
    lock_file = target.lock
    pins = read_lock(lock_file)
    check_lock_covers(project_dependencies(), pins, _show(lock_file))
    digest = sources_digest(lock_file)
    stamp = wheelhouse / STAMP
    if force or not stamp.exists() or stamp.read_text().strip() != digest:
        _build(wheelhouse, target, lock_file)
        stamp.write_text(digest + "\n")
    verify(wheelhouse, target)


def _build(wheelhouse: Path, target: Target, lock_file: Path) -> None:
    print(f"==> wheelhouse: building the signer and its locked dependencies into {wheelhouse}",
          flush=True)
    tmp = wheelhouse.with_name(wheelhouse.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The signer (pure Python) from this checkout, without its dependencies. setuptools builds
    # in the checkout's build/lib and keeps what an earlier build put there: a module since
    # removed or turned into a package (signer/audit.py -> signer/audit/) would ride along in
    # the wheel. Its scratch directories go first, so the wheel holds this checkout only.
    for leftover in [ROOT / "build" / "lib", *(ROOT / "build").glob("bdist.*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp), str(ROOT))
    # ... the locked third-party wheels for the target, each checked by pip against its hashes ...
    _pip("download", "--quiet", "--require-hashes", "--no-deps", "--only-binary=:all:",
         *target.pip_args(), "--dest", str(tmp), "-r", str(lock_file))
    ours = [p for p in tmp.glob("*.whl") if _wheel_name(p) == SIGNER]
    if len(ours) != 1:
        raise WheelhouseError(f"pip wheel gave {len(ours)} {SIGNER} wheels, expected one")
    _keep_unchanged_signer(ours[0], wheelhouse)
    version = parse_wheel_filename(ours[0].name)[1]
    signer_line = f"{SIGNER}=={version} \\\n    --hash=sha256:{_sha256(ours[0])}\n"
    (tmp / REQUIREMENTS).write_text(
        f"# What a {target.name} signing host installs (pip install --no-index --require-hashes\n"
        f"# -r). Written by toolkit/runner/wheelhouse.py: the signer built from this checkout,\n"
        f"# then {_show(lock_file)} unchanged.\n" + signer_line + lock_file.read_text()
    )
    # ... and the host's install replayed offline: the signer's own dependencies must all be in
    # the lock, pinned and hashed, or pip refuses here instead of on the host.
    with tempfile.TemporaryDirectory() as scratch:
        _pip("download", "--quiet", "--no-index", "--find-links", str(tmp), "--require-hashes",
             "--only-binary=:all:", *target.pip_args(), "--dest", scratch,
             "-r", str(tmp / REQUIREMENTS))
    shutil.rmtree(wheelhouse, ignore_errors=True)
    tmp.rename(wheelhouse)


def _keep_unchanged_signer(new: Path, wheelhouse: Path) -> None:
    """Keep the bytes of an unchanged signer wheel: the host then sees no change at all."""
    old = wheelhouse / new.name
    if old.is_file() and _same_contents(old.read_bytes(), new.read_bytes()):
        shutil.copyfile(old, new)


def verify(wheelhouse: Path, target: Target, lock_file: Path | None = None) -> None:
    """Refuse (WheelhouseError) a target's wheelhouse that does not match its committed lock."""
    lock_file = lock_file or target.lock
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
    tags = target.tags()
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
        if not parse_wheel_filename(f.name)[3] & tags:
            raise WheelhouseError(
                f"{where}: {f.name} is not a wheel for {target.name} "
                f"(CPython {target.python}, glibc {target.glibc[0]}.{target.glibc[1]}){_REBUILD}")
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
