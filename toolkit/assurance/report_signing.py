"""The operator's detached signature over a verify run: who produced the report, and that no
file of it was edited since.

A run directory (reports/verify/<host>/<time>/) holds the report in four renderings and the
pytest log. `SHA256SUMS` lists every file with its SHA-256 (the `sha256sum` format) and
`SHA256SUMS.sig` is the operator's OpenSSH signature over that list, in its own namespace so that
it cannot be replayed as any other kind of SSH signature:

    ssh-keygen -Y sign -n signhost-report -f ADMIN_KEY SHA256SUMS

One signature over a manifest rather than one per file: a reviewer gets one answer for the whole
run, and a file added to or taken from the directory is noticed. The check by hand is

    ssh-keygen -Y verify -f allowed_signers -I OPERATOR -n signhost-report -s SHA256SUMS.sig \\
        < SHA256SUMS && sha256sum -c SHA256SUMS

and `invoke verify.check-signature` does the same and names the signer.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "signhost-report"
MANIFEST = "SHA256SUMS"
SIGNATURE = MANIFEST + ".sig"


class SigningError(Exception):
    """The report could not be signed (one line: ssh-keygen's own reason)."""


class BadInput(Exception):
    """What was given to check cannot be used: no such report or allowed-signers file."""


class NotVerified(Exception):
    """The report is not signed, not signed by an allowed signer, or was changed since."""


@dataclass(frozen=True)
class Verified:
    directory: Path
    principals: tuple[str, ...]
    key: str  # e.g. "ED25519 key SHA256:..."
    files: tuple[str, ...]


def _ssh_keygen(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["ssh-keygen", *args], input=stdin, capture_output=True,
                              timeout=60, check=False)
    except FileNotFoundError as exc:
        raise BadInput("ssh-keygen (OpenSSH) is not installed") from exc
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def fingerprint(key: Path) -> str:
    """`SHA256:... (ED25519)` of a private or public key file; SigningError if it is none."""
    pub = key.with_name(key.name + ".pub")
    proc = _ssh_keygen(["-l", "-f", str(pub if pub.exists() else key)])
    if proc.returncode != 0:
        raise SigningError(f"{key}: not an SSH key: {_last_line(proc.stderr)}")
    fields = proc.stdout.split()
    return f"{fields[1]} {fields[-1]}" if len(fields) >= 2 else proc.stdout.strip()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _covered(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.name not in (MANIFEST, SIGNATURE))


def write_manifest(directory: Path) -> Path:
    """SHA256SUMS over every file of the run directory."""
    path = directory / MANIFEST
    path.write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in _covered(directory)))
    return path


def sign(directory: Path, key: Path) -> Path:
    """Sign the run directory's manifest with the operator's key; the signature's path."""
    manifest = write_manifest(directory)
    (directory / SIGNATURE).unlink(missing_ok=True)
    proc = _ssh_keygen(["-Y", "sign", "-n", NAMESPACE, "-f", str(key), str(manifest)])
    if proc.returncode != 0 or not (directory / SIGNATURE).exists():
        raise SigningError(f"ssh-keygen -Y sign with {key}: {_last_line(proc.stderr)}")
    return directory / SIGNATURE


def run_directory(path: Path) -> Path:
    """The run directory a path names: itself, a file in it, or a host's directory (its
    `latest` run)."""
    if not path.exists():
        raise BadInput(f"{path}: no such report")
    if path.is_file():
        path = path.parent
    if (path / "latest").is_dir() and not (path / MANIFEST).exists():
        path = path / "latest"
    return path.resolve()


def _manifest(directory: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in (directory / MANIFEST).read_text().splitlines():
        match = re.fullmatch(r"([0-9a-f]{64})  (\S.*)", line)
        if match is None:
            raise NotVerified(f"{MANIFEST}: malformed line {line[:80]!r}")
        entries[match.group(2)] = match.group(1)
    return entries


def check(path: Path, allowed_signers: Path) -> Verified:
    """Verify a run against an allowed-signers file (ssh-keygen's format: principal, key)."""
    if not allowed_signers.is_file():
        raise BadInput(f"allowed signers {allowed_signers}: no such file")
    directory = run_directory(path)
    manifest, signature = directory / MANIFEST, directory / SIGNATURE
    if not signature.exists() or not manifest.exists():
        raise NotVerified(f"{directory}: not signed (no {SIGNATURE})")
    found = _ssh_keygen(["-Y", "find-principals", "-s", str(signature), "-f",
                         str(allowed_signers)])
    principals = tuple(p for p in found.stdout.split() if p)
    if found.returncode != 0 or not principals:
        raise NotVerified(f"{directory}: signed by a key that {allowed_signers} does not allow "
                          f"({_last_line(found.stderr)})")
    proc = _ssh_keygen(["-Y", "verify", "-f", str(allowed_signers), "-I", principals[0],
                        "-n", NAMESPACE, "-s", str(signature)], stdin=manifest.read_bytes())
    if proc.returncode != 0:
        raise NotVerified(f"{directory}: bad signature over {MANIFEST}: "
                          f"{_last_line(proc.stderr + proc.stdout)}")
    key = re.search(r"with (\S+ key \S+)", proc.stdout)
    listed = _manifest(directory)
    for name, digest in listed.items():
        file = directory / name
        if "/" in name or not file.is_file():
            raise NotVerified(f"{directory}: {name} is signed but missing")
        if _sha256(file) != digest:
            raise NotVerified(f"{directory}: {name} was changed after it was signed")
    extra = [p.name for p in _covered(directory) if p.name not in listed]
    if extra:
        raise NotVerified(f"{directory}: not covered by the signature: {', '.join(extra)}")
    return Verified(directory, principals, key.group(1) if key else "?", tuple(listed))
