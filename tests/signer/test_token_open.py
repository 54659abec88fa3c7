"""A token the module does not show: the error says what to do for that kind of token (a
software token is initialised; a card is inserted), never the other kind's remedy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.local_signer import SOFTHSM_MODULE

OPENSC = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")

OPEN = """
import sys
from pathlib import Path
from signer.errors import SignerError
from signer.token import Token
try:
    Token(Path(sys.argv[1]), "no-such-label")
except SignerError as exc:
    print(exc.code, exc.message)
else:
    print("opened")
"""


def _open(module: Path, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-c", OPEN, str(module)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_missing_software_token_is_to_be_initialised(tmp_path: Path) -> None:
    if not Path(SOFTHSM_MODULE).exists():
        pytest.skip("softhsm2 is not installed")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    out = _open(Path(SOFTHSM_MODULE), {"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"})
    assert out.startswith("69 token 'no-such-label' not found"), out
    assert "softhsm2-util --init-token" in out and "insert the card" not in out, out


def test_a_missing_card_is_to_be_inserted_not_initialised(tmp_path: Path) -> None:
    """OpenSC with no reader at all (no pcscd on this controller's test run: the module sees no
    slot) answers as a card that is not there."""
    if not OPENSC.exists():
        pytest.skip("opensc is not installed")
    out = _open(OPENSC, {"PATH": "/usr/bin:/bin", "OPENSC_CONF": "/dev/null",
                         "PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd.sock")})
    assert out.startswith("69 token 'no-such-label' not found"), out
    assert "insert the card" in out and "--list-token-slots" in out, out
    assert "softhsm" not in out.lower(), out
