"""Authenticode through the real daemon and SoftHSM2 token: the build server sends only the
request `osslsigncode extract-data` writes, the host signs it with an RSA-3072 token key whose
certificate a lab CA issued from the token's CSR (code-signing EKU), the client attaches the
signature and a timestamp from a TSA on 127.0.0.1. Outside verifiers decide: `osslsigncode
verify` and signify (PyPI), `openssl cms -verify` and `openssl ts -verify`.

One CA, one TSA, one token key and one daemon for the whole module (about 10 s in all)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import algos, cms, core

from signer.formats import authenticode
from tests.signer.conftest import MiB, Signer, config, one_line_error, profiles
from tests.signer.pki import TSA, LabCA
from tests.signer.test_approvals import _fake_ssh
from tests.signer.test_sign import openssl_cms_verify
from toolkit.local_signer import Lab, write_cab, write_msi, write_pe

pytestmark = pytest.mark.skipif(shutil.which("osslsigncode") is None,
                                reason="osslsigncode not installed (apt install osslsigncode)")
needs_wixl = pytest.mark.skipif(shutil.which("wixl") is None,
                                reason="wixl not installed (apt install wixl)")

# signify needs oscrypto, whose 1.3.0 (the last release) cannot parse OpenSSL version strings
# like "3.0.19" (wbond/oscrypto#78, fixed upstream, unreleased): the verifier runs in its own
# process with that one regular expression corrected before signify is imported.
SIGNIFY = r"""
import importlib.util, sys
spec = importlib.util.find_spec("oscrypto._openssl._libcrypto_cffi")
src = open(spec.origin).read()
src = src.replace(r"'\\b(\\d\\.\\d\\.\\d[a-z]*)\\b'", r"'\\b(\\d\\.\\d+\\.\\d+[a-z]*)\\b'")
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
exec(compile(src, spec.origin, "exec"), mod.__dict__)
from signify.authenticode import AuthenticodeFile
from signify.x509 import Certificate, CertificateStore
with open(sys.argv[2], "rb") as f:
    store = CertificateStore(list(Certificate.from_pems(f.read())), trusted=True)
with open(sys.argv[1], "rb") as f:
    result, error = AuthenticodeFile.from_stream(f).explain_verify(
        trusted_certificate_store=store)
print(result.name, error or "")
sys.exit(0 if result.name == "OK" else 1)
"""


@dataclass
class Win:
    signer: Signer
    ca: LabCA
    tsa: TSA
    ssh: str

    def submit(self, artifact: Path, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return self.signer.lab.signer("submit", "--host", "build1@signer", "--ssh", self.ssh,
                                      "--cafile", self.ca.cert, *args, artifact)


@pytest.fixture(scope="module")
def win(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Win]:
    root = tmp_path_factory.mktemp("authenticode")
    ca = LabCA(root / "ca")
    tsa = TSA(ca, root / "tsa")
    cert = lab.certs / "win.pem"
    ps = profiles(lab)
    # The session's RSA-3072 token key (conftest), with a certificate of its own from the lab
    # CA: no second key to generate. A real release profile has a key of its own.
    win = {"key": "pkcs11:token=signer;object=rsa;type=private", "algorithm": "rsa3072-pkcs1",
           "cert": str(cert), "chain": str(ca.cert), "formats": ["authenticode", "cms", "raw"],
           "max_size": MiB, "clients": ["build1"], "budget_count": 10000,
           "budget_window": 3600}
    ps["win"] = win
    ps["winrel"] = {**win, "formats": ["authenticode"], "approvals": 2,
                    "custodians": ["alice", "bob", "carol"], "require_timestamp": True}
    ps["winec"] = {**win, "key": "pkcs11:token=signer;object=dev;type=private",
                   "algorithm": "ecdsa-p256", "cert": str(lab.certs / "winec.pem"),
                   "formats": ["authenticode"]}
    cfg = config(lab, "authenticode", ps)
    csr = root / "win.csr"
    # The real path of a CA-issued release certificate: CSR signed by the token key,
    # certificate from the CA, `keys import-cert` checks it matches the key and installs it.
    r = lab.signer("keys", "csr", "--config", cfg, "--profile", "win", "--subject",
                   "CN=Example Corp, O=Example Corp", "--out", csr)
    assert r.returncode == 0, r.stderr
    issued = ca.issue(csr, root / "win-issued.pem")
    r2 = lab.signer("keys", "import-cert", "--config", cfg, "--profile", "win", issued)
    assert r2.returncode == 0, r2.stderr
    # ECDSA P-256 (Windows 10 and later verify it): the session's EC key, its own certificate.
    r = lab.signer("keys", "csr", "--config", cfg, "--profile", "winec", "--subject",
                   "CN=Example Corp EC, O=Example Corp", "--out", root / "winec.csr")
    assert r.returncode == 0, r.stderr
    r2 = lab.signer("keys", "import-cert", "--config", cfg, "--profile", "winec",
                    ca.issue(root / "winec.csr", root / "winec-issued.pem"))
    assert r2.returncode == 0, r2.stderr
    s = Signer(lab, cfg)
    s.start()
    yield Win(s, ca, tsa, _fake_ssh(root, s))
    s.stop()
    tsa.stop()


def osslsigncode_verify(w: Win, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["osslsigncode", "verify", "-CAfile", str(w.ca.cert), "-TSA-CAfile",
                           str(w.ca.cert), "-in", str(path)],
                          capture_output=True, text=True, check=False)


def signify_verify(path: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SIGNIFY, str(path), str(ca)],
                          capture_output=True, text=True, check=False)


def flip(path: Path, offset: int) -> Path:
    out = path.with_name("flipped-" + path.name)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(data)
    return out


def extract(path: Path, *args: str) -> bytes:
    req = path.with_name(path.name + ".req")
    req.unlink(missing_ok=True)  # osslsigncode does not write over a file
    subprocess.run(["osslsigncode", "extract-data", *args, "-in", str(path), "-out", str(req)],
                   capture_output=True, check=True)
    return req.read_bytes()


@pytest.mark.control("SGN-09", "SGN-10")
def test_pe_signed_through_the_host_is_accepted_by_osslsigncode_and_signify(
        win: Win, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "app.exe", 300_000)
    request = authenticode.parse(extract(exe, "-h", "sha256"))
    r = win.submit(exe, "--profile", "win", "--format", "authenticode", "--timestamp",
                   win.tsa.url)
    assert r.returncode == 0, r.stderr
    v = osslsigncode_verify(win, exe)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Signature verification: ok" in v.stdout
    assert "Timestamp Server Signature verification: ok" in v.stdout
    assert "CN=Example Corp" in v.stdout and "Issuer : /CN=signer lab CA" in v.stdout
    s = signify_verify(exe, win.ca.cert)
    assert s.returncode == 0, s.stdout + s.stderr
    # What the host saw and logged: the Authenticode digest and the name, a small request.
    entry = win.signer.events("sign")[-1]
    assert entry["format"] == "authenticode" and entry["name"] == "app.exe"
    assert entry["authenticode"] == request.label
    assert entry["size"] < 1024 < exe.stat().st_size
    # A flipped byte in the code section: both verifiers refuse the file.
    bad = flip(exe, 0x400 + 1000)
    assert osslsigncode_verify(win, bad).returncode != 0
    s = signify_verify(bad, win.ca.cert)
    assert s.returncode == 1 and "INVALID_DIGEST" in s.stdout, s.stdout + s.stderr


@pytest.mark.control("SGN-09", "SGN-10")
def test_powershell_script_is_signed_and_timestamped(win: Win, tmp_path: Path) -> None:
    script = tmp_path / "deploy.ps1"
    script.write_bytes(b'Write-Output "signed by the signing host"\r\nexit 0\r\n')
    out = tmp_path / "deploy-signed.ps1"
    r = win.submit(script, "--profile", "win", "--format", "authenticode", "--timestamp",
                   win.tsa.url, "--out", out)
    assert r.returncode == 0, r.stderr
    assert b"# SIG # Begin signature block" in out.read_bytes()
    v = osslsigncode_verify(win, out)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Timestamp Server Signature verification: ok" in v.stdout
    assert win.signer.events("sign")[-1]["name"] == "deploy.ps1"
    assert osslsigncode_verify(win, flip(out, 3)).returncode != 0


@pytest.mark.control("SGN-09", "SGN-10")
def test_cabinet_is_signed_and_timestamped(win: Win, tmp_path: Path) -> None:
    cab = write_cab(tmp_path / "setup.cab", {"setup.exe": os.urandom(70_000),
                                             "readme.txt": b"signed by the signing host\r\n"})
    request = authenticode.parse(_cab_request(cab))
    assert request.subject == "cab"
    r = win.submit(cab, "--profile", "win", "--format", "authenticode", "--timestamp",
                   win.tsa.url)
    assert r.returncode == 0, r.stderr
    v = osslsigncode_verify(win, cab)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Signature verification: ok" in v.stdout
    assert "Timestamp Server Signature verification: ok" in v.stdout
    entry = win.signer.events("sign")[-1]
    assert entry["name"] == "setup.cab" and entry["authenticode"] == request.label
    assert osslsigncode_verify(win, flip(cab, cab.stat().st_size // 3)).returncode != 0


def installer(path: Path, app_size: int) -> tuple[Path, bytes]:
    """An MSI built with wixl at test time around a PE of about `app_size` bytes (and a text
    file), and the PE's bytes."""
    app = write_pe(path.with_name(path.stem + "-app.exe"), app_size).read_bytes()
    return write_msi(path, {"app.exe": app, "readme.txt": b"signed by the signing host\r\n"},
                     name="Example App"), app


def flip_in_payload(msi: Path, payload: bytes) -> Path:
    """A copy of `msi` with one byte flipped inside the file it installs, found by its bytes
    in the embedded cabinet (a PE's random section is stored as is): a byte the Authenticode
    digest covers, not the compound file's slack."""
    data = msi.read_bytes()
    chunk = payload[len(payload) // 2:len(payload) // 2 + 64]
    at = data.find(chunk)
    assert at > 0 and data.find(chunk, at + 1) == -1, "the payload is not stored as is"
    return flip(msi, at + 32)


@needs_wixl
@pytest.mark.control("SGN-09", "SGN-10")
def test_msi_signed_through_the_host_is_accepted_by_osslsigncode_and_signify(
        win: Win, tmp_path: Path) -> None:
    """A Windows Installer package: the client sends the request osslsigncode computes from
    the MSI's streams (a SIP subject), never the installer; the host signs it like any
    Authenticode request."""
    msi, app = installer(tmp_path / "setup.msi", 200_000)
    request = authenticode.parse(extract(msi, "-h", "sha256"))
    assert request.subject == "sip"
    r = win.submit(msi, "--profile", "win", "--format", "authenticode", "--timestamp",
                   win.tsa.url)
    assert r.returncode == 0, r.stderr
    assert f"setup.msi: Authenticode sip {request.label}".encode() in r.stderr
    v = osslsigncode_verify(win, msi)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Signature verification: ok" in v.stdout
    assert "Timestamp Server Signature verification: ok" in v.stdout
    assert "CN=Example Corp" in v.stdout and "Issuer : /CN=signer lab CA" in v.stdout
    s = signify_verify(msi, win.ca.cert)
    assert s.returncode == 0, s.stdout + s.stderr
    entry = win.signer.events("sign")[-1]
    assert entry["format"] == "authenticode" and entry["name"] == "setup.msi"
    assert entry["authenticode"] == request.label
    assert entry["size"] < 1024 < msi.stat().st_size
    # One flipped byte in the installed file: both verifiers refuse the package.
    bad = flip_in_payload(msi, app)
    v = osslsigncode_verify(win, bad)
    assert v.returncode != 0 and "Signature verification: ok" not in v.stdout, v.stdout
    s = signify_verify(bad, win.ca.cert)
    assert s.returncode == 1 and "INVALID_DIGEST" in s.stdout, s.stdout + s.stderr


@needs_wixl
@pytest.mark.control("SGN-04", "SGN-10")
def test_release_msi_needs_two_custodians_who_recompute_the_digest(
        win: Win, tmp_path: Path) -> None:
    """A custodian whose copy of the installer differs from the build's, by another build or
    by one flipped byte, refuses; two with the same copy approve and the MSI is signed."""
    msi, app = installer(tmp_path / "release.msi", 100_000)
    other, _ = installer(tmp_path / "other.msi", 100_000)
    _release_after_two_custodians(win, msi, [other, flip_in_payload(msi, app)])


@needs_wixl
@pytest.mark.control("SGN-10")
def test_a_damaged_msi_is_refused_on_the_build_server_and_nothing_reaches_the_host(
        win: Win, tmp_path: Path) -> None:
    """The installer is read by osslsigncode on the build server only: one cut short gets a
    one-line error naming the file, and the host hears nothing (no entry of any kind)."""
    msi, _ = installer(tmp_path / "broken.msi", 50_000)
    data = msi.read_bytes()
    msi.write_bytes(data[: len(data) // 2])
    entries = len(win.signer.entries())
    r = win.submit(msi, "--profile", "win", "--format", "authenticode")
    assert r.returncode == 65, r.stderr
    err = r.stderr.decode()
    assert err.startswith(f"signer: {msi}: osslsigncode extract-data: ") and \
        err.count("\n") == 1, err
    assert msi.read_bytes() == data[: len(data) // 2]
    assert len(win.signer.entries()) == entries


def _cab_request(cab: Path) -> bytes:
    """The request as the client sends it (signer.osslsigncode trims what osslsigncode 2.9
    appends to a cabinet's request)."""
    from signer import osslsigncode

    osslsigncode.extract(cab, cab.with_name(cab.name + ".req"))
    return cab.with_name(cab.name + ".req").read_bytes()


@pytest.mark.control("SGN-09", "SGN-10")
def test_ecdsa_p256_authenticode_is_accepted_by_osslsigncode_and_signify(
        win: Win, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "ec.exe", 100_000)
    r = win.submit(exe, "--profile", "winec", "--format", "authenticode", "--timestamp",
                   win.tsa.url)
    assert r.returncode == 0, r.stderr
    v = osslsigncode_verify(win, exe)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Timestamp Server Signature verification: ok" in v.stdout
    assert "CN=Example Corp EC" in v.stdout
    s = signify_verify(exe, win.ca.cert)
    assert s.returncode == 0, s.stdout + s.stderr
    der = tmp_path / "ec.p7"
    subprocess.run(["osslsigncode", "extract-signature", "-in", str(exe), "-out", str(der)],
                   capture_output=True, check=True)
    (si,) = cms.ContentInfo.load(der.read_bytes())["content"]["signer_infos"]
    assert si["signature_algorithm"]["algorithm"].native == "sha256_ecdsa"
    bad = flip(exe, 0x400 + 500)
    assert osslsigncode_verify(win, bad).returncode != 0
    assert signify_verify(bad, win.ca.cert).returncode == 1


def _request(content_type: str = authenticode.SPC_INDIRECT_DATA,
             subject: str = "1.3.6.1.4.1.311.2.1.15", digest_alg: str = "sha256",
             digest: bytes = b"\x11" * 32) -> bytes:
    """An extract-data request built field by field, to get each field wrong on its own."""
    spc = authenticode.SpcIndirectDataContent({
        "data": {"type": subject},
        "message_digest": {"digest_algorithm": algos.DigestAlgorithm(
            {"algorithm": digest_alg, "parameters": core.Null()}), "digest": digest}})

    return bytes(authenticode._ContentInfo({"content_type": "signed_data", "content": {
        "version": "v1", "digest_algorithms": [],
        "encap_content_info": {"content_type": content_type, "content": spc},
        "signer_infos": []}}).dump())


@pytest.mark.control("SGN-07", "SGN-10")
@pytest.mark.parametrize(("case", "problem"), [
    ("wrong content type", "is not SpcIndirectDataContent"),
    ("unknown subject", "is not a PE image, SIP or cabinet"),
    ("sha1", "digest algorithm sha1 is not supported"),
    ("short digest", "a sha256 digest is 32 bytes, not 20"),
    ("not DER", "not a well-formed Authenticode request"),
    ("a CMS signature", "already carries signers"),
    ("the whole file", "request larger than 8192 bytes"),
])
def test_malformed_authenticode_requests_are_refused_and_logged(
        win: Win, tmp_path: Path, case: str, problem: str) -> None:
    exe = write_pe(tmp_path / "app.exe", 20_000)
    body = {
        "wrong content type": lambda: _request(content_type="1.2.840.113549.1.7.1"),
        "unknown subject": lambda: _request(subject="1.3.6.1.4.1.311.2.1.99"),
        "sha1": lambda: extract(exe, "-h", "sha1"),
        "short digest": lambda: _request(digest=b"\x22" * 20),
        "not DER": lambda: b"MZ this is not a request",
        "a CMS signature": lambda: win.signer.gw("sign --profile win --format cms",
                                                 b"x").stdout,
        "the whole file": exe.read_bytes,
    }[case]()
    assert body
    before = len(win.signer.events("sign"))
    r = win.signer.gw("sign --profile win --format authenticode --name app.exe", body)
    assert r.returncode == 65
    assert problem in one_line_error(r)
    assert len(win.signer.events("sign")) == before
    deny = win.signer.events("deny")[-1]
    assert deny["client"] == "build1" and deny["profile"] == "win"
    assert problem in deny["reason"] or deny["reason"].endswith("request too large")


@pytest.mark.control("SGN-04", "SGN-10")
def test_requests_with_page_hashes_are_refused_before_signing(win: Win, tmp_path: Path) -> None:
    """Page hashes sit in the signed content beside the file's digest, and nothing a custodian
    runs recomputes them: a request with the approved file's digest and another file's page
    hashes used to be signed. Any request with page hashes is refused (65, a `deny`), its own
    file's too; the same file without them is signed."""
    exe = write_pe(tmp_path / "app.exe", 20_000)
    other = write_pe(tmp_path / "other.exe", 20_000)
    plain = extract(exe, "-h", "sha256")
    digest = authenticode.parse(plain).digest
    own = extract(exe, "-ph", "-h", "sha256")
    theirs = extract(other, "-ph", "-h", "sha256")
    spliced = theirs.replace(authenticode.parse(extract(other, "-h", "sha256")).digest, digest)
    assert spliced != own and len(spliced) == len(own)
    before = len(win.signer.events("sign"))
    for body in (spliced, own):
        r = win.signer.gw("sign --profile win --format authenticode --name app.exe", body)
        assert r.returncode == 65
        assert "page hashes (extract-data -ph) are not supported" in one_line_error(r)
        deny = win.signer.events("deny")[-1]
        assert deny["profile"] == "win" and "page hashes" in deny["reason"], deny
    assert len(win.signer.events("sign")) == before
    r = win.signer.gw("sign --profile win --format authenticode --name app.exe", plain)
    assert r.returncode == 0, r.stderr
    assert win.signer.events("sign")[-1]["authenticode"] == "sha256:" + digest.hex()


def test_a_well_formed_synthetic_request_is_signed(win: Win) -> None:
    """The refusals above are about the field each one breaks, not the way it was built."""
    r = win.signer.gw("sign --profile win --format authenticode", _request())
    assert r.returncode == 0, r.stderr
    assert win.signer.events("sign")[-1]["authenticode"] == "sha256:" + "11" * 32


@pytest.mark.control("SGN-04", "SGN-10")
def test_release_authenticode_needs_two_custodians_who_recompute_the_digest(
        win: Win, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "setup.exe", 50_000)
    _release_after_two_custodians(win, exe, [write_pe(tmp_path / "other.exe", 50_000)])


def _release_after_two_custodians(win: Win, artifact: Path, others: list[Path]) -> None:
    """`artifact` through the release profile: queued, refused by a custodian for each of
    `others` (their own copy, which is not the file of the request), approved by two who
    recompute its Authenticode digest from their copy, then signed and timestamped."""
    label = authenticode.parse(extract(artifact, "-h", "sha256")).label
    lab, s = win.signer.lab, win.signer
    waiting = subprocess.Popen(
        [sys.executable, "-m", "signer", "submit", "--host", "build1@signer", "--profile",
         "winrel", "--format", "authenticode", "--timestamp", win.tsa.url, "--cafile",
         str(win.ca.cert), "--wait", "--poll", "0.2", "--ssh", win.ssh, str(artifact)],
        env=lab.env, stderr=subprocess.PIPE)
    try:
        item = None
        for _ in range(100):  # each look is a gateway process: not too often
            mine = [json.loads(x) for x in s.gw("requests", custodian="alice").stdout.splitlines()]
            mine = [i for i in mine if i["name"] == artifact.name and i["state"] == "pending"]
            if mine:
                item = mine[0]
                break
            time.sleep(0.3)
        assert item is not None
        rid = item["id"]
        assert item["authenticode"] == label and item["format"] == "authenticode"
        assert item["statement"].endswith(f"\nformat=authenticode\nauthenticode={label}\n")
        assert f'name="{artifact.name}"' in item["statement"]
        for other in others:
            r = lab.signer("approve", "--host", "alice@signer", "--key",
                           lab.custodian_keys["alice"], "--artifact", other, "--yes", "--ssh",
                           win.ssh, rid)
            assert r.returncode == 65 and b"its Authenticode digest is" in r.stderr, r.stderr
        for who in ("alice", "bob"):
            r = lab.signer("approve", "--host", f"{who}@signer", "--key",
                           lab.custodian_keys[who], "--artifact", artifact, "--yes", "--ssh",
                           win.ssh, rid)
            assert r.returncode == 0, r.stderr
            assert f"authenticode={label}".encode() in r.stdout
        assert waiting.wait(timeout=60) == 0
    finally:
        waiting.kill()
        _out, err = waiting.communicate()
    v = osslsigncode_verify(win, artifact)
    assert v.returncode == 0, v.stdout + v.stderr + err.decode()
    assert "Timestamp Server Signature verification: ok" in v.stdout
    entry = s.events("sign")[-1]
    assert entry["request"] == rid and entry["authenticode"] == label
    queued = [e for e in s.events("queue") if e["request"] == rid]
    assert queued[0]["authenticode"] == label


@pytest.mark.control("SGN-10")
def test_a_profile_that_requires_a_timestamp_refuses_a_submit_without_one_before_signing(
        win: Win, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "late.exe", 20_000)
    before, queued = exe.read_bytes(), len(win.signer.events("queue"))
    r = win.submit(exe, "--profile", "winrel", "--format", "authenticode")
    assert r.returncode == 64
    assert ("profile 'winrel' requires an RFC 3161 timestamp: submit with --timestamp URL "
            "(nothing was signed)") in r.stderr.decode()
    assert exe.read_bytes() == before
    assert len(win.signer.events("queue")) == queued
    assert win.signer.events("deny")[-1]["reason"] == "sign: timestamp required"
    # The same profile takes the request when the client says it adds a timestamp.
    r = win.signer.gw("sign --profile winrel --format authenticode --timestamped", _request())
    assert r.returncode == 75, r.stderr


@pytest.mark.control("SGN-09", "SGN-10")
def test_cms_signature_with_an_rfc3161_timestamp(win: Win, tmp_path: Path) -> None:
    art = tmp_path / "app.tar"
    art.write_bytes(os.urandom(70_000))
    r = win.submit(art, "--profile", "dev", "--format", "cms", "--timestamp", win.tsa.url)
    assert r.returncode == 0, r.stderr
    sig = tmp_path / "app.tar.p7s"
    v = openssl_cms_verify(art, sig, win.signer.lab.certs / "dev.pem")
    assert v.returncode == 0, v.stderr
    si = cms.ContentInfo.load(sig.read_bytes())["content"]["signer_infos"][0]
    (attr,) = si["unsigned_attrs"]
    assert attr["type"].native == "signature_time_stamp_token"
    token, data = tmp_path / "token.der", tmp_path / "signature.bin"
    token.write_bytes(attr["values"][0].dump())
    data.write_bytes(bytes(si["signature"].native))

    def ts_verify(d: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "ts", "-verify", "-in", str(token), "-token_in",
                               "-data", str(d), "-CAfile", str(win.ca.cert), "-untrusted",
                               str(win.tsa.cert)], capture_output=True, text=True, check=False)

    t = ts_verify(data)
    assert t.returncode == 0 and "Verification: OK" in t.stdout, t.stdout + t.stderr
    # The token is bound to this signature value, not to any other.
    assert ts_verify(flip(data, 0)).returncode != 0
    assert hashlib.sha256(art.read_bytes()).hexdigest() == win.signer.events("sign")[-1]["sha256"]


def test_timestamp_authority_that_is_down_fails_with_one_line(win: Win, tmp_path: Path) -> None:
    art = tmp_path / "app.bin"
    art.write_bytes(b"payload")
    r = win.submit(art, "--profile", "dev", "--timestamp", "http://127.0.0.1:9/")
    assert r.returncode == 69
    err = r.stderr.decode()
    assert err.startswith("signer: timestamp authority http://127.0.0.1:9/")
    assert "Traceback" not in err and not (tmp_path / "app.bin.p7s").exists()
