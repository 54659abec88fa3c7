"""The lab's card (lab/card.py): its NSS database made at run time under the state directory,
three certificates (libcacard's certificates backend takes exactly three), the signing one
issued by the lab CA with the code-signing EKU, a PIN the CAC applet accepts, kept 0600."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lab import card
from lab.ca import LabCA

pytestmark = pytest.mark.skipif(not shutil.which("certutil"),
                                reason="needs certutil (libnss3-tools, scripts/bootstrap)")


def test_the_card_is_made_once_with_three_certificates_and_the_cas_signing_one(
        tmp_path: Path) -> None:
    LabCA(tmp_path).ensure("t")
    db = card.ensure(tmp_path)
    assert db == tmp_path / "card" / "nssdb"
    assert (tmp_path / "card").stat().st_mode & 0o777 == 0o700
    listed = subprocess.run(["certutil", "-L", "-d", f"sql:{db}"], capture_output=True,
                            text=True, check=True).stdout
    keys = subprocess.run(["certutil", "-K", "-d", f"sql:{db}"], capture_output=True,
                          text=True, check=True).stdout
    for nick in card.NICKNAMES:
        assert nick in listed and nick in keys
    cert = card.signing_cert(tmp_path)
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(LabCA(tmp_path).cert),
                         "-purpose", "any", str(cert)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-ext",
                           "extendedKeyUsage"], capture_output=True, text=True,
                          check=True).stdout
    assert card.TOKEN_LABEL in text and "Code Signing" in text
    pin = card.pin_file(tmp_path)
    assert pin.stat().st_mode & 0o777 == 0o600
    assert pin.read_text().strip().isdigit() and len(pin.read_text().strip()) == 8
    before = (db / "cert9.db").read_bytes(), pin.read_text()
    assert card.ensure(tmp_path) == db  # kept: the same card for the instance's life
    assert ((db / "cert9.db").read_bytes(), pin.read_text()) == before
    assert card.qdev_args(tmp_path) == (f"backend=certificates,db=sql:{db},"
                                        "cert1=signing,cert2=spare1,cert3=spare2")


def test_no_card_without_the_lab_ca(tmp_path: Path) -> None:
    with pytest.raises(card.CardError, match="no lab CA"):
        card.ensure(tmp_path)
