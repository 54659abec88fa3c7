"""Certificate authorities made at run time with openssl, for the lab and the tests: one module
for every CA they need, so that each certificate profile (its extension block) is written once.

- `LabCA`: the lab's CA, an RSA-3072 root in the instance's state directory (`<state>/ca/`,
  0700; never in the repo), the stand-in for the commercial CA that issues a production
  profile's code-signing certificate. `lab.up` makes it; the lab inventory names its
  certificate as the `chain` of the profiles whose certificate it issues, so the deploy
  installs it on the host, and the lab suite issues those certificates from the CSRs the deploy
  fetched (code-signing EKU), as a real CA would.
- `CA` itself serves the others: the log collector's TLS CA (lab/collector.py, EC P-256,
  a server and a client certificate each bound to one DNS name), the throw-away forwarding
  pair of the bench and the tests (toolkit/local_forwarder.py), and the test CA and TSA of
  tests/signer/pki.py (time-stamping EKU).

Keys are made unencrypted (`-nodes`) in a 0700 directory and chmod 0600: they live as long as
the lab instance or the test session, and nothing here is a production key.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

RSA = "rsa:3072"
EC = "ec"  # P-256
_EC_ARGS = ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]

# Every certificate profile a lab or test CA issues: the openssl extension section of each.
PROFILES: dict[str, tuple[str, ...]] = {
    "ca": ("basicConstraints = critical, CA:true", "keyUsage = critical, keyCertSign, cRLSign",
           "subjectKeyIdentifier = hash"),
    "code_signing": ("basicConstraints = critical, CA:false",
                     "keyUsage = critical, digitalSignature", "extendedKeyUsage = codeSigning",
                     "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"),
    "time_stamping": ("basicConstraints = critical, CA:false",
                      "keyUsage = critical, digitalSignature",
                      "extendedKeyUsage = critical, timeStamping",
                      "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"),
    "tls_server": ("basicConstraints = critical, CA:false",
                   "keyUsage = critical, digitalSignature", "extendedKeyUsage = serverAuth",
                   "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"),
    "tls_client": ("basicConstraints = critical, CA:false",
                   "keyUsage = critical, digitalSignature", "extendedKeyUsage = clientAuth",
                   "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"),
}


def extensions(dns: str | None = None) -> str:
    """The extension file: one section per profile; with `dns`, each leaf profile also names
    that DNS name (subjectAltName), which is what TLS peers check."""
    out = []
    for name, lines in PROFILES.items():
        out.append(f"[{name}]")
        out.extend(lines)
        if dns is not None and name != "ca":
            out.append(f"subjectAltName = DNS:{dns}")
    return "\n".join(out) + "\n"


class CAError(RuntimeError):
    pass


def _openssl(*args: str | Path) -> None:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise CAError(f"openssl {args[0]}: {last}")


def _new_key_args(key: str) -> list[str]:
    return ["-newkey", *(_EC_ARGS if key == EC else [key]), "-nodes"]


def request(key_path: Path, csr: Path, subject: str, key: str = EC) -> Path:
    """A new key (0600) and a certificate signing request for it; the request."""
    _openssl("req", "-new", *_new_key_args(key), "-keyout", key_path, "-out", csr,
             "-subj", subject)
    key_path.chmod(0o600)
    return csr


class CA:
    """A root CA in `root` (0700): `cert` (public) and `key` (0600). `create` makes it,
    `issue` signs a CSR with a profile of PROFILES, `leaf` makes a key and its certificate."""

    leaf_days = 30

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "ca.key"
        self.cert = root / "ca.pem"
        self.ext = root / "extensions.cnf"

    def exists(self) -> bool:
        return self.cert.exists() and self.key.exists()

    def _dir(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)

    def create(self, subject: str, days: int, key: str = RSA) -> Path:
        """A new self-signed root (`subject` as openssl writes it: `/CN=...`); its certificate."""
        self._dir()
        self.ext.write_text(extensions())
        _openssl("req", "-x509", *_new_key_args(key), "-keyout", self.key, "-out", self.cert,
                 "-days", str(days), "-subj", subject, "-config", self.ext, "-extensions", "ca")
        self.key.chmod(0o600)
        return self.cert

    def issue(self, csr: Path, out: Path, profile: str = "code_signing",
              subject: str | None = None, *, days: int | None = None, dns: str | None = None
              ) -> Path:
        """A certificate for the key of `csr` with the extensions of `profile`, valid `days`
        (default `leaf_days`), bound to the DNS name `dns` if given; `subject` replaces the
        CSR's."""
        if profile not in PROFILES or profile == "ca":
            raise CAError(f"no leaf certificate profile {profile!r}")
        # written at each use: the profiles are this module's, not an older run's file
        ext = self.ext if dns is None else out.with_name(f"{out.name}.ext")
        ext.write_text(extensions(dns))
        args: list[str | Path] = [
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
            "-days", str(days or self.leaf_days), "-sha256", "-extfile", ext,
            "-extensions", profile, "-out", out]
        if subject:
            args += ["-subj", subject]
        _openssl(*args)
        return out

    def leaf(self, name: str, profile: str, days: int, dns: str | None = None,
             key: str = EC) -> tuple[Path, Path]:
        """A new key `<name>.key` (0600) and its certificate `<name>.pem` next to the CA's,
        subject CN=`dns` (or `name`): (key, certificate)."""
        self._dir()
        key_path = self.root / f"{name}.key"
        csr = request(key_path, self.root / f"{name}.csr", f"/CN={dns or name}", key)
        return key_path, self.issue(csr, self.root / f"{name}.pem", profile, days=days,
                                  dns=dns)


class LabCA(CA):
    """The CA of one lab instance (`<state dir>/ca/`): `cert` is installed on the host as the
    chain, `key` stays on the controller."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / "ca")

    def ensure(self, name: str) -> Path:
        """Make the CA once per instance state (kept across lab.down/up, like the keys)."""
        if self.exists():
            return self.cert
        return self.create(f"/CN=signlab {name} lab CA", 365)
