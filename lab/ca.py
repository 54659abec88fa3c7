"""The lab's certificate authority: an RSA-3072 root made at run time in the instance's state
directory (`<state>/ca/`, 0700; never in the repo), the stand-in for the commercial CA that
issues a production profile's code-signing certificate.

`lab.up` makes it; the lab inventory names its certificate as the `chain` of the profiles
whose certificate it issues, so the deploy installs it on the host, and the lab suite issues
those certificates from the CSRs the deploy fetched (code-signing EKU), as a real CA would.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

_EXTENSIONS = """\
[ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[code_signing]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = codeSigning
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class CAError(RuntimeError):
    pass


def _openssl(*args: str | Path) -> None:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise CAError(f"openssl {args[0]}: {last}")


class LabCA:
    """The CA of one lab instance: `cert` (public, installed on the host as the chain) and
    `key` (0600, stays on the controller)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "ca"
        self.key = self.root / "ca.key"
        self.cert = self.root / "ca.pem"
        self.ext = self.root / "extensions.cnf"

    def ensure(self, name: str) -> Path:
        """Make the CA once per instance state (kept across lab.down/up, like the keys)."""
        if self.cert.exists() and self.key.exists():
            return self.cert
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.ext.write_text(_EXTENSIONS)
        _openssl("req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", self.key,
                 "-out", self.cert, "-days", "365", "-subj", f"/CN=signlab {name} lab CA",
                 "-config", self.ext, "-extensions", "ca")
        self.key.chmod(0o600)
        return self.cert

    def issue(self, csr: Path, out: Path, days: int = 30) -> Path:
        """A code-signing certificate (EKU codeSigning) for the key of `csr`."""
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", self.ext,
                 "-extensions", "code_signing", "-out", out)
        return out
