"""The lab's smart card: a CAC card that QEMU emulates in its USB CCID reader.

`ccid-card-emulated,backend=certificates` (libcacard) presents three certificates of an NSS
database on the controller as a CAC card with their RSA keys; the guest reaches the card only
through the reader (pcscd, OpenSC's CAC driver), so it can ask the card to sign but never read
a key, as with a chip. The database is made here at run time with certutil, in
`<state dir>/card/nssdb` (0700, never in the repo), once per instance state:

- `signing`: the card's code-signing key (RSA-2048, made in the database by `certutil -R`),
  its certificate issued by the lab CA from that request (code-signing EKU), as an EV token's
  comes from its CA;
- `spare1`, `spare2`: self-signed fillers, because libcacard's certificates backend takes
  exactly three. No profile uses them: they prove that the deploy picks the key it was told
  to (by URI), not the first one on the card.

The database has no password (libcacard opens it without one). The card's PIN (`pin`, made
here, 0600) is what the deploy hands the daemon, as a key ceremony's PIN would be; the emulated
card accepts any PIN (libcacard logs in to the NSS database, which has none), one of the lab
card's differences from a real one (README, "Real tokens").
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from lab.ca import CA, LabCA

NICKNAMES = ("signing", "spare1", "spare2")
SIGNING_SUBJECT = "CN=signlab card code signing,O=signlab"
# What OpenSC's CAC driver makes of the card (measured with pkcs11-tool -L -O on the VM): the
# token label is the CN of the first certificate's subject, and the key behind that
# certificate is `CAC ID Certificate` with id 00 01 (the other two: `CAC Email Signature
# Certificate` 00 02, `CAC Email Encryption Certificate` 00 03). The serial derives from the
# card's contents, so it changes with each instance's database: the lab names no serial.
TOKEN_LABEL = "signlab card code signing"  # noqa: S105 (a label, not a password)
KEY_URI = ("pkcs11:token=signlab%20card%20code%20signing;object=CAC%20ID%20Certificate;"
           "id=%00%01;type=private")


class CardError(RuntimeError):
    pass


def _certutil(*args: str | Path) -> None:
    r = subprocess.run(["certutil", *map(str, args)], capture_output=True, check=False)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines() or [f"exit {r.returncode}"]
        raise CardError(f"certutil {args[0]}: {err[-1]} (is libnss3-tools installed?)")


def card_dir(state_dir: Path) -> Path:
    return state_dir / "card"


def nssdb(state_dir: Path) -> Path:
    return card_dir(state_dir) / "nssdb"


def pin_file(state_dir: Path) -> Path:
    """The card's PIN on the controller (the inventory's token_cards pin_src)."""
    return card_dir(state_dir) / "pin"


def signing_cert(state_dir: Path) -> Path:
    """The card's signing certificate (PEM), as the lab CA issued it."""
    return card_dir(state_dir) / "signing.pem"


def ensure(state_dir: Path, ca: CA | None = None) -> Path:
    """Make the card's database once per instance state; its directory."""
    db = nssdb(state_dir)
    if (db / "cert9.db").exists() and signing_cert(state_dir).exists() \
            and pin_file(state_dir).exists():
        return db
    ca = ca or LabCA(state_dir)
    if not ca.exists():
        raise CardError(f"no lab CA in {ca.root}: run `invoke lab.up` first")
    top = card_dir(state_dir)
    top.mkdir(mode=0o700, parents=True, exist_ok=True)
    top.chmod(0o700)
    if db.exists():
        shutil.rmtree(db)  # half made by an interrupted run: made again, whole
    db.mkdir(mode=0o700)
    spec = f"sql:{db}"
    _certutil("-N", "-d", spec, "--empty-password")
    noise = top / "noise"
    noise.write_bytes(Path("/dev/urandom").open("rb").read(2048))
    try:
        der = top / "signing.csr.der"
        _certutil("-R", "-d", spec, "-s", SIGNING_SUBJECT, "-k", "rsa", "-g", "2048",
                  "-Z", "SHA256", "-z", noise, "-o", der)
        csr = top / "signing.csr"
        r = subprocess.run(["openssl", "req", "-inform", "DER", "-in", str(der), "-out",
                            str(csr)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise CardError(f"openssl req: {r.stderr.strip()}")
        pem = ca.issue(csr, signing_cert(state_dir), "code_signing", days=365)
        _certutil("-A", "-d", spec, "-n", "signing", "-t", ",,", "-a", "-i", pem)
        for i, nick in enumerate(NICKNAMES[1:], start=1):
            _certutil("-S", "-d", spec, "-n", nick, "-s", f"CN=signlab card spare {i}",
                      "-x", "-t", ",,", "-k", "rsa", "-g", "2048", "-Z", "SHA256",
                      "-z", noise, "-v", "12", "-m", str(1000 + i))
    finally:
        noise.unlink(missing_ok=True)
    pin = pin_file(state_dir)
    pin.touch(mode=0o600)
    # 8 digits: the longest PIN the CAC applet takes (OpenSC: pin min/max 4/8)
    pin.write_text("".join(secrets.choice("0123456789") for _ in range(8)) + "\n")
    return db


def qdev_args(state_dir: Path) -> str:
    """ccid-card-emulated's properties for this instance's card."""
    certs = ",".join(f"cert{i}={n}" for i, n in enumerate(NICKNAMES, start=1))
    return f"backend=certificates,db=sql:{nssdb(state_dir)},{certs}"
