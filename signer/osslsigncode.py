"""The build server's and the custodian's Authenticode tool: osslsigncode (Debian package
`osslsigncode`, 2.5 or later for `extract-data`/`attach-signature`). Never used on the signing
host: the daemon only parses the small request it writes (signer.formats.authenticode)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from asn1crypto import parser

from signer.errors import Exit, SignerError
from signer.formats import authenticode

TOOL = "osslsigncode"


def _run(*args: str | Path, code: int = Exit.DATA, subject: Path | None = None) -> None:
    """Run osslsigncode; SignerError with its reason in one line, naming `subject` (the
    user's file) when given."""
    if shutil.which(TOOL) is None:
        raise SignerError(Exit.UNAVAILABLE, f"{TOOL} not found: install it on this machine "
                          "(Debian: apt install osslsigncode)")
    r = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        lines = [x.strip() for x in (r.stderr + "\n" + r.stdout).splitlines() if x.strip()]
        # osslsigncode prints its verdict last; its first error line says why
        why = next((x for x in lines if "rror" in x or "ailed" in x or "mismatch" in x),
                   lines[-1] if lines else f"exit {r.returncode}")
        where = f"{subject}: " if subject is not None else ""
        raise SignerError(code, f"{where}{TOOL} {args[0]}: {why}")


def extract(artifact: Path, out: Path) -> authenticode.Content:
    """The Authenticode request for `artifact` (SHA-256, no page hashes), written to `out`
    and checked the way the host checks it."""
    _run("extract-data", "-h", "sha256", "-in", artifact, "-out", out, subject=artifact)
    try:
        data = out.read_bytes()
        # osslsigncode 2.9 writes a cabinet's request followed by the rest of the cabinet (its
        # CAB handler keeps copying the input): the request is the first DER element. What
        # follows it is not sent; the host would refuse it (strict parsing), and attach-
        # signature checks that the signature is for this very file anyway.
        _cls, _method, _tag, header, contents, _trailer = parser.parse(data)
        if len(header) + len(contents) < len(data):
            data = data[: len(header) + len(contents)]
            out.write_bytes(data)
        return authenticode.parse(data)
    except authenticode.AuthenticodeError as exc:
        raise SignerError(Exit.DATA, f"{artifact}: {exc}") from None
    except ValueError as exc:  # parser.parse: not DER at all
        raise SignerError(Exit.DATA, f"{artifact}: osslsigncode extract-data wrote no DER "
                          f"request: {exc}") from None


def attach(artifact: Path, signature: Path, out: Path, cafile: Path | None) -> None:
    """Put the host's signature into a copy of the file. osslsigncode checks on the way that it
    is a signature of this very file and that it chains to `cafile` (default: the system's
    trust store)."""
    trust: list[str | Path] = ["-CAfile", cafile] if cafile else []
    _run("attach-signature", "-sigin", signature, *trust, "-in", artifact, "-out", out,
         subject=artifact)


def timestamp(signed: Path, url: str, out: Path) -> None:
    """Add an RFC 3161 timestamp from the TSA at `url` (an unsigned attribute)."""
    # A TSA that does not answer is "try again later", like the signer being busy.
    _run("add", "-ts", url, "-in", signed, "-out", out, code=Exit.UNAVAILABLE)
