"""Profiles on a token beside the daemon's own ([tokens.*], signer/cards.py), with the real daemon
and a second SoftHSM2 token standing in for the card (tests/lab signs through a real card):
the key is found by its URI, never made by `signer keys`; a card that is not there takes its
profiles away (UNAVAILABLE, the journal says so), not the daemon; once it is there, the next
request opens it and signs; a key the card holds as importable is refused."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from signer.errors import Exit
from tests.signer.conftest import MakeSigner, Signer, until
from tests.signer.test_sign import openssl_cms_verify, openssl_dgst_verify
from toolkit.local_signer import SOFTHSM_MODULE, Lab, toml


def make_card(lab: Lab, label: str, key: str = "cardkey") -> tuple[Path, Path]:
    """A token `label` with an RSA-2048 key made on it (sensitive, never extractable) and a
    self-signed certificate for it: (PIN file, certificate)."""
    pin = secrets.token_hex(8)
    pin_file = lab.root / f"{label}.pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", secrets.token_hex(8)], env=lab.env, check=True,
                   capture_output=True)
    cert_path = lab.certs / f"{label}.pem"
    generate(lab, label, pin_file, key, cert_path)
    return pin_file, cert_path


# In a process of its own, with the lab's SOFTHSM2_CONF: SoftHSM2 sees the tokens that exist
# when a process loads it, and the daemon's token processes load it again.
GENERATE = """
import sys
from pathlib import Path
from signer import certs, uri
from signer.algorithms import RSA2048_PKCS1 as A
from signer.token import Token
module, label, pin_file, key, out = sys.argv[1:]
u = uri.parse(f"pkcs11:token={label};object={key};id=%01;type=private")
t = Token(Path(module), label)
t.login(Path(pin_file).read_text().strip(), rw=True)
t.generate(u, A)
h = t.private_key(u)
if out:
    c = certs.self_signed(t.public_key_info(u), A, lambda d: t.sign_digest(h, A, d),
                          f"CN={label}", 30)
    Path(out).write_bytes(certs.to_pem(c))
t.close()
"""


def generate(lab: Lab, label: str, pin_file: Path, key: str, cert: Path | None) -> None:
    """An RSA-2048 key made on token `label` (sensitive, never extractable), and a self-signed
    certificate for it in `cert` if given."""
    r = subprocess.run([sys.executable, "-c", GENERATE, str(SOFTHSM_MODULE), label,
                        str(pin_file), key, str(cert or "")], env=lab.env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr


def with_card(s: Signer, label: str, pin_file: Path, cert: Path | None,
              key: str = "cardkey", **token: Any) -> Signer:
    """`s`'s config plus [tokens.card] (label `label`, its PIN from `pin_file` unless `token`
    says otherwise) and a profile `card` on it (cms and raw with a certificate, raw only
    without)."""
    tables: dict[str, dict[str, Any]] = {
        "tokens.card": {"module": str(SOFTHSM_MODULE), "label": label,
                        "pin_source": f"file:{pin_file}", **token},
        "profiles.card": {"key": f"pkcs11:token={label};object={key};id=%01;type=private",
                          "algorithm": "rsa2048-pkcs1",
                          "formats": ["cms", "raw"] if cert else ["raw"],
                          "max_size": 1 << 20, "clients": ["build1"], "budget_count": 100,
                          "budget_window": 3600, **({"cert": str(cert)} if cert else {})},
    }
    s.config.write_text(s.config.read_text() + "\n" + toml(tables))
    return s


def test_a_profile_on_a_card_signs_through_it_and_openssl_verifies(
        lab: Lab, make_signer: MakeSigner, tmp_path: Path) -> None:
    pin_file, cert = make_card(lab, "card-ok")
    s = with_card(make_signer(start=False), "card-ok", pin_file, cert)
    s.start()
    art = tmp_path / "artifact"
    art.write_bytes(secrets.token_bytes(5000))
    for fmt in ("cms", "raw"):
        r = s.gw(f"sign --profile card --format {fmt}", art.read_bytes())
        assert r.returncode == 0, r.stderr
        sig = tmp_path / f"sig.{fmt}"
        sig.write_bytes(r.stdout)
        v = (openssl_cms_verify(art, sig, cert) if fmt == "cms"
             else openssl_dgst_verify(art, sig, cert, pss=False))
        assert v.returncode == 0, v.stderr
    # the daemon's own token still signs beside it; the audit log names the card's key
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0
    signed = [e for e in s.events("sign") if e["profile"] == "card"]
    assert len(signed) == 2 and "token=card-ok" in signed[0]["key"]


def test_a_missing_card_takes_its_profiles_away_until_it_is_there(
        lab: Lab, make_signer: MakeSigner, tmp_path: Path) -> None:
    label = f"card-late-{secrets.token_hex(2)}"
    pin_file = lab.root / f"{label}.pin"
    pin_file.write_text("0000\n")
    pin_file.chmod(0o600)
    s = with_card(make_signer(start=False), label, pin_file, None)
    s.start()  # the daemon starts without its card
    r = s.gw("sign --profile card --format raw", b"artifact")
    assert r.returncode == Exit.UNAVAILABLE, r.stderr
    assert b"unavailable" in r.stderr and b"plug it in" in r.stderr
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0  # the rest signs
    assert "token card unavailable" in s.log
    assert not [e for e in s.events("sign") if e["profile"] == "card"]
    # the card arrives (here: the token is made, with the PIN the daemon was given)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin",
                    pin_file.read_text().strip(), "--so-pin", secrets.token_hex(8)],
                   env=lab.env, check=True, capture_output=True)
    generate(lab, label, pin_file, "cardkey", None)

    def signs() -> bool:
        return s.gw("sign --profile card --format raw", b"artifact").returncode == 0

    until(signs, timeout=20)
    assert "token card is back" in s.log
    assert [e for e in s.events("sign") if e["profile"] == "card"]


def test_an_importable_key_on_a_card_is_refused(lab: Lab, make_signer: MakeSigner) -> None:
    label = f"card-imp-{secrets.token_hex(2)}"
    pin = secrets.token_hex(8)
    pin_file = lab.root / f"{label}.pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", secrets.token_hex(8)], env=lab.env, check=True,
                   capture_output=True)
    pem = lab.root / f"{label}.key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(pem)], check=True, capture_output=True)
    subprocess.run(["softhsm2-util", "--import", str(pem), "--token", label, "--label",
                    "cardkey", "--id", "01", "--pin", pin], env=lab.env, check=True,
                   capture_output=True)
    pem.unlink()
    s = with_card(make_signer(start=False), label, pin_file, None)
    s.start()
    r = s.gw("sign --profile card --format raw", b"artifact")
    assert r.returncode == Exit.NOPERM, r.stderr
    assert b"not resident" in r.stderr
    failures = s.events("residency-failure")
    assert [e for e in failures if e["profile"] == "card"], failures
    # `signer keys` never makes a key on a card
    g = lab.signer("keys", "generate", "--config", s.config, "--profile", "card")
    assert g.returncode == Exit.CONFIG and b"provisioned" in g.stderr, g.stderr
