"""Custodian approvals: OpenSSH signatures (`ssh-keygen -Y`) over a request's statement.

OpenSSH does the cryptography on both sides: custodians already hold SSH keys (often on hardware
tokens), and `-Y sign/verify` binds a namespace into the signature, so an approval cannot be
replayed as a git commit signature or the other way round.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

NAMESPACE = "signer-approval"
MAX_SIGNATURE = 16 * 1024
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def looks_armored(sig: bytes) -> bool:
    return (len(sig) <= MAX_SIGNATURE and sig.lstrip().startswith(b"-----BEGIN SSH SIGNATURE-----")
            and sig.rstrip().endswith(b"-----END SSH SIGNATURE-----"))


def verify(statement: bytes, signature: bytes, custodian: str, ssh_key: str, workdir: Path
           ) -> bool:
    """True when `signature` is `custodian`'s signature of `statement` in our namespace."""
    if not looks_armored(signature):
        return False
    with tempfile.TemporaryDirectory(dir=workdir, prefix="approval-") as tmp:
        allowed = Path(tmp, "allowed_signers")
        allowed.write_text(f'{custodian} namespaces="{NAMESPACE}" {ssh_key}\n', encoding="ascii")
        sig = Path(tmp, "approval.sig")
        sig.write_bytes(signature)
        try:
            r = subprocess.run(
                ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", custodian,
                 "-n", NAMESPACE, "-s", str(sig)],
                input=statement, capture_output=True, timeout=10, env=_ENV, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def sign(statement: bytes, key: Path) -> bytes:
    """Custodian side: the armored signature (ssh-agent or a key file; may prompt)."""
    r = subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", NAMESPACE],
                       input=statement, stdout=subprocess.PIPE, check=False)
    if r.returncode != 0 or not looks_armored(r.stdout):
        raise OSError(f"ssh-keygen -Y sign failed (exit {r.returncode})")
    return r.stdout
