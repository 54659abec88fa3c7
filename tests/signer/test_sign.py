"""Signatures through the gateway, checked by openssl and by `signer verify`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.signer.conftest import MakeSigner, MiB, Signer, one_line_error

PROFILES = ["dev", "rsa", "pss"]


def _files(tmp_path: Path, data: bytes, sig: bytes, suffix: str) -> tuple[Path, Path]:
    art = tmp_path / "artifact.bin"
    art.write_bytes(data)
    out = tmp_path / f"artifact.{suffix}"
    out.write_bytes(sig)
    return art, out


def openssl_cms_verify(art: Path, sig: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                           str(sig), "-content", str(art), "-CAfile", str(cert),
                           "-out", os.devnull], capture_output=True, text=True, check=False)


def openssl_dgst_verify(art: Path, sig: Path, cert: Path, pss: bool
                        ) -> subprocess.CompletedProcess[str]:
    pub = sig.with_suffix(".pub.pem")
    pub.write_text(subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"],
                                  capture_output=True, text=True, check=True).stdout)
    opts = ["-sigopt", "rsa_padding_mode:pss"] if pss else []
    return subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                           str(sig), *opts, str(art)], capture_output=True, text=True,
                          check=False)


def cert_of(signer: Signer, profile: str) -> Path:
    return signer.lab.certs / ("rsa.pem" if profile in ("rsa", "pss") else f"{profile}.pem")


@pytest.mark.control("SGN-09")
@pytest.mark.parametrize("profile", PROFILES)
def test_cms_signature_is_accepted_by_openssl_cms_verify(shared: Signer, tmp_path: Path,
                                                         profile: str) -> None:
    data = os.urandom(100_000)
    r = shared.gw(f"sign --profile {profile} --format cms --name app.bin", data)
    assert r.returncode == 0, r.stderr
    art, sig = _files(tmp_path, data, r.stdout, "p7s")
    v = openssl_cms_verify(art, sig, cert_of(shared, profile))
    assert v.returncode == 0, v.stderr
    assert "Verification successful" in v.stderr
    art.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert openssl_cms_verify(art, sig, cert_of(shared, profile)).returncode != 0


@pytest.mark.control("SGN-09")
@pytest.mark.parametrize("profile", PROFILES)
def test_raw_signature_is_accepted_by_openssl_dgst_verify(shared: Signer, tmp_path: Path,
                                                          profile: str) -> None:
    data = os.urandom(50_000)
    r = shared.gw(f"sign --profile {profile} --format raw", data)
    assert r.returncode == 0, r.stderr
    art, sig = _files(tmp_path, data, r.stdout, "sig")
    v = openssl_dgst_verify(art, sig, cert_of(shared, profile), pss=profile == "pss")
    assert v.returncode == 0 and "Verified OK" in v.stdout, v.stderr
    art.write_bytes(b"x" + data)
    assert openssl_dgst_verify(art, sig, cert_of(shared, profile), profile == "pss"
                               ).returncode != 0


@pytest.mark.control("SGN-09")
@pytest.mark.parametrize(("fmt", "profile"), [("cms", "dev"), ("raw", "dev"), ("cms", "pss"),
                                              ("raw", "pss")])
def test_signer_verify_accepts_good_and_rejects_tampered(shared: Signer, tmp_path: Path,
                                                         fmt: str, profile: str) -> None:
    data = os.urandom(10_000)
    r = shared.gw(f"sign --profile {profile} --format {fmt}", data)
    assert r.returncode == 0, r.stderr
    art, sig = _files(tmp_path, data, r.stdout, fmt)
    pss = ["--pss"] if profile == "pss" else []
    cert = cert_of(shared, profile)
    ok = shared.lab.signer("verify", "--format", fmt, "--cert", cert, *pss, art, sig)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    art.write_bytes(data + b"\0")
    bad = shared.lab.signer("verify", "--format", fmt, "--cert", cert, *pss, art, sig)
    assert bad.returncode == 1 and b"INVALID" in bad.stdout
    other = shared.lab.certs / "release.pem"
    art.write_bytes(data)
    wrong_key = shared.lab.signer("verify", "--format", fmt, "--cert", other, *pss, art, sig)
    assert wrong_key.returncode == 1


@pytest.mark.control("SGN-05")
def test_each_signature_has_a_matching_audit_entry(signer: Signer) -> None:
    import hashlib

    data = b"release artifact"
    r = signer.gw('sign --profile dev --format raw --name "app v1.bin"', data)
    assert r.returncode == 0
    (entry,) = signer.events("sign")
    assert entry["client"] == "build1" and entry["profile"] == "dev"
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert entry["sig_sha256"] == hashlib.sha256(r.stdout).hexdigest()
    assert entry["name"] == "app v1.bin" and entry["format"] == "raw"


@pytest.mark.control("SGN-07")
def test_exactly_max_size_is_signed_and_one_byte_more_is_refused(shared: Signer) -> None:
    assert shared.gw("sign --profile small --format raw", b"a" * 1024).returncode == 0
    r = shared.gw("sign --profile small --format raw", b"a" * 1025)
    assert r.returncode == 65
    assert "larger than the profile's maximum of 1024 bytes" in one_line_error(r)


@pytest.mark.control("SGN-07")
def test_oversize_stream_is_cut_off_early(shared: Signer) -> None:
    """A large upload to a small profile is refused as soon as it passes the limit."""
    r = shared.gw("sign --profile dev --format raw", b"\0" * (MiB + 1))
    assert r.returncode == 65
    one_line_error(r)
    deny = shared.events("deny")[-1]
    assert deny["reason"] == "sign: artifact too large"


@pytest.mark.control("SGN-07")
def test_empty_artifact_is_refused(shared: Signer) -> None:
    r = shared.gw("sign --profile dev --size 0", b"")  # as `signer submit` declares it
    assert r.returncode == 65
    assert "empty artifact" in one_line_error(r)


def test_format_defaults_to_cms(shared: Signer, tmp_path: Path) -> None:
    r = shared.gw("sign --profile dev", b"data")
    art, sig = _files(tmp_path, b"data", r.stdout, "p7s")
    assert openssl_cms_verify(art, sig, cert_of(shared, "dev")).returncode == 0


def test_large_artifact_streams_through(make_signer: MakeSigner, tmp_path: Path) -> None:
    s = make_signer(profile_overrides={"dev": {"max_size": 64 * MiB}})
    data = os.urandom(MiB) * 48
    r = s.gw("sign --profile dev --format raw", data)
    assert r.returncode == 0, r.stderr
    art, sig = _files(tmp_path, data, r.stdout, "sig")
    assert openssl_dgst_verify(art, sig, cert_of(s, "dev"), pss=False).returncode == 0
