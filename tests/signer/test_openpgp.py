"""OpenPGP through the real daemon and SoftHSM2 token: detached signatures (binary and
armoured) and cleartext-signed text (InRelease), with the session's ECDSA P-256 and RSA-3072
token keys, their OpenPGP certificates exported by `signer keys openpgp`. Only outside
verifiers judge: Debian's `gpgv` and `sqv` (Sequoia), and apt itself (`apt-get update` with
its own Dir:: settings against a repository on disk, trusting only the exported certificate).

One daemon for the module; the release profile's test has its own custodians' round."""

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
from hypothesis import given
from hypothesis import strategies as st

from signer.errors import SignerError
from signer.formats import openpgp
from tests.signer.conftest import MiB, Signer, config, one_line_error, profiles
from tests.signer.test_approvals import _fake_ssh
from toolkit.local_signer import Lab

MISSING = [t for t in ("gpgv", "sqv") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed "
                                "(apt install gpgv sqv)")

CREATED = "2026-01-01T00:00:00Z"
KEYS = {"pgp": ("dev", "ecdsa-p256"), "pgprsa": ("rsa", "rsa3072-pkcs1"),
        "pgprel": ("release", "ecdsa-p256")}


@dataclass
class PGP:
    signer: Signer
    ssh: str
    certs: dict[str, Path]  # profile -> its exported certificate (binary)

    def submit(self, profile: str, artifact: Path, *args: str | Path
               ) -> subprocess.CompletedProcess[bytes]:
        return self.signer.lab.signer("submit", "--host", "build1@signer", "--ssh", self.ssh,
                                      "--profile", profile, *args, artifact)


@pytest.fixture(scope="module")
def pgp(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PGP]:
    root = tmp_path_factory.mktemp("openpgp")
    ps = profiles(lab)
    for name, (key, alg) in KEYS.items():
        ps[name] = {"key": f"pkcs11:token=signer;object={key};type=private", "algorithm": alg,
                    "formats": ["openpgp", "openpgp-cleartext"], "openpgp_created": CREATED,
                    "max_size": MiB, "clients": ["build1"], "budget_count": 10000,
                    "budget_window": 3600}
    ps["pgprel"].update(approvals=2, custodians=["alice", "bob", "carol"])
    cfg = config(lab, "openpgp", ps)
    certs = {}
    for name in KEYS:
        certs[name] = root / f"{name}.pgp"
        r = lab.signer("keys", "openpgp", "--config", cfg, "--profile", name, "--uid",
                       f"Example {name} <{name}@example.org>", "--out", certs[name])
        assert r.returncode == 0, r.stderr
    s = Signer(lab, cfg)
    s.start()
    yield PGP(s, _fake_ssh(root, s), certs)
    s.stop()


def gpgv(cert: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    home = cert.parent / "gnupg-home"
    home.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["gpgv", "--homedir", str(home), "--keyring", str(cert),
                           *map(str, files)], capture_output=True, text=True, check=False)


def sqv(cert: Path, sig: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sqv", "--keyring", str(cert), str(sig), str(data)],
                          capture_output=True, text=True, check=False)


def flip(path: Path, offset: int) -> Path:
    out = path.with_name("flipped-" + path.name)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(data)
    return out


def split_cleartext(signed: Path) -> tuple[Path, Path]:
    """As apt's SplitClearSignedFile: the message (dash-escapes removed, the framework's last
    line ending not part of it) and the detached, armoured signature."""
    text = signed.read_text()
    head, rest = text.split("\n\n", 1)
    assert head == "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256"
    body, sig = rest.split("\n-----BEGIN PGP SIGNATURE-----\n", 1)
    lines = [line[2:] if line.startswith("- ") else line for line in body.split("\n")]
    message, signature = signed.with_suffix(".msg"), signed.with_suffix(".sig.asc")
    message.write_text("\n".join(lines))
    signature.write_text("-----BEGIN PGP SIGNATURE-----\n" + sig)
    return message, signature


def release_text(tmp_path: Path) -> Path:
    rel = tmp_path / "Release"
    rel.write_text("Origin: Example\nLabel: Example\nSuite: stable\nCodename: example\n"
                   "Architectures: all\nComponents: main\n"
                   "- a line that needs dash-escaping\ntrailing spaces   \n\n"
                   "SHA256:\n 0123 10 main/binary-all/Packages\n")
    return rel


@pytest.mark.parametrize("profile", ["pgp", "pgprsa"])
@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armored"])
@pytest.mark.control("SGN-11")
def test_detached_signature_is_accepted_by_gpgv_and_sqv(
        pgp: PGP, tmp_path: Path, profile: str, armor: bool) -> None:
    art = tmp_path / "app.tar.gz"
    art.write_bytes(os.urandom(300_000) + b"\r\n  \n")  # binary: nothing is canonicalised
    r = pgp.submit(profile, art, "--format", "openpgp", *(["--armor"] if armor else []))
    assert r.returncode == 0, r.stderr
    sig = tmp_path / ("app.tar.gz.asc" if armor else "app.tar.gz.sig")
    assert sig.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----\n") == armor
    fpr = openpgp.Request.parse(pgp.signer.events("sign")[-1]["openpgp"]).fingerprint
    v = gpgv(pgp.certs[profile], sig, art)
    assert v.returncode == 0, v.stderr
    assert fpr.hex().upper() in v.stderr.replace(" ", "")
    q = sqv(pgp.certs[profile], sig, art)
    assert q.returncode == 0, q.stderr
    assert fpr.hex().upper() in q.stdout
    # a changed byte of the artifact: both refuse
    bad = flip(art, 1000)
    assert gpgv(pgp.certs[profile], sig, bad).returncode != 0
    assert sqv(pgp.certs[profile], sig, bad).returncode != 0
    # the other profile's certificate does not vouch for it
    other = pgp.certs["pgprsa" if profile == "pgp" else "pgp"]
    assert gpgv(other, sig, art).returncode != 0
    assert sqv(other, sig, art).returncode != 0


@pytest.mark.parametrize("profile", ["pgp", "pgprsa"])
@pytest.mark.control("SGN-11")
def test_cleartext_signed_release_is_accepted_by_gpgv_and_sqv(
        pgp: PGP, tmp_path: Path, profile: str) -> None:
    rel = release_text(tmp_path)
    r = pgp.submit(profile, rel, "--format", "openpgp-cleartext")
    assert r.returncode == 0, r.stderr
    inrelease = tmp_path / "InRelease"
    text = inrelease.read_text()
    assert text.startswith("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin:")
    assert "\n- - a line that needs dash-escaping\n" in text
    v = gpgv(pgp.certs[profile], inrelease)
    assert v.returncode == 0, v.stderr
    message, signature = split_cleartext(inrelease)
    q = sqv(pgp.certs[profile], signature, message)
    assert q.returncode == 0, q.stderr
    # The log holds the Release file's own SHA-256, and the signature's trailer
    entry = pgp.signer.events("sign")[-1]
    assert entry["format"] == "openpgp-cleartext" and entry["size"] == rel.stat().st_size
    assert openpgp.Request.parse(entry["openpgp"]).sig_type == "text"
    # A changed byte in the signed text: both refuse
    tampered = inrelease.with_name("tampered-InRelease")
    tampered.write_text(text.replace("Suite: stable", "Suite: stablf"))
    assert gpgv(pgp.certs[profile], tampered).returncode != 0
    message, signature = split_cleartext(tampered)
    assert sqv(pgp.certs[profile], signature, message).returncode != 0


@pytest.mark.control("SGN-11")
def test_apt_trusts_only_the_exported_certificate(pgp: PGP, tmp_path: Path) -> None:
    """apt-get update, as an unprivileged client with its own Dir:: settings, against a
    repository whose InRelease the host signed: accepted with the profile's certificate as
    signed-by=, refused with another key's, refused once a byte of InRelease changed."""
    if shutil.which("apt-ftparchive") is None or shutil.which("apt-get") is None:
        pytest.skip("apt-ftparchive not installed (apt install apt-utils)")
    repo = make_repository(tmp_path / "repo")
    r = pgp.submit("pgp", repo / "dists/example/Release", "--format", "openpgp-cleartext")
    assert r.returncode == 0, r.stderr
    ok = apt(tmp_path / "ok", repo, pgp.certs["pgp"], "apt-get", "update")
    assert ok.returncode == 0 and "W:" not in ok.stderr, ok.stdout + ok.stderr
    # the package, through the chain InRelease -> Packages -> .deb (apt checks each hash)
    (tmp_path / "ok/get").mkdir()
    got = apt(tmp_path / "ok", repo, pgp.certs["pgp"], "apt-get", "download", "signer-hello",
              cwd=tmp_path / "ok/get")
    assert got.returncode == 0, got.stdout + got.stderr
    assert (tmp_path / "ok/get/signer-hello_1.0_all.deb").read_bytes() == \
        (repo / "pool/main/signer-hello_1.0_all.deb").read_bytes()
    wrong = apt(tmp_path / "wrong", repo, pgp.certs["pgprsa"], "apt-get", "update")
    assert wrong.returncode != 0 and "NO_PUBKEY" in wrong.stdout + wrong.stderr, wrong.stderr
    inrelease = repo / "dists/example/InRelease"
    inrelease.write_text(inrelease.read_text().replace("Suite: example", "Suite: exampld"))
    bad = apt(tmp_path / "bad", repo, pgp.certs["pgp"], "apt-get", "update")
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert "BADSIG" in bad.stdout + bad.stderr or "not signed" in bad.stdout + bad.stderr


def make_repository(repo: Path) -> Path:
    """One .deb built here with dpkg-deb, its Packages and Release from apt-ftparchive."""
    pkg = repo.parent / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/signer-hello").mkdir(parents=True)
    (pkg / "usr/share/signer-hello/hello.txt").write_text("hello from the signing host\n")
    (pkg / "DEBIAN/control").write_text(
        "Package: signer-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: Example "
        "<releases@example.org>\nDescription: test package signed through the host\n")
    pool = repo / "pool/main"
    pool.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg),
                    str(pool / "signer-hello_1.0_all.deb")], check=True, capture_output=True)
    binary = repo / "dists/example/main/binary-all"
    binary.mkdir(parents=True)
    packages = subprocess.run(["apt-ftparchive", "packages", "pool"], cwd=repo, check=True,
                              capture_output=True).stdout
    (binary / "Packages").write_bytes(packages)
    release = subprocess.run(
        ["apt-ftparchive", "-o", "APT::FTPArchive::Release::Suite=example",
         "-o", "APT::FTPArchive::Release::Codename=example",
         "-o", "APT::FTPArchive::Release::Architectures=all",
         "-o", "APT::FTPArchive::Release::Components=main", "release", "dists/example"],
        cwd=repo, check=True, capture_output=True).stdout
    (repo / "dists/example/Release").write_bytes(release)
    return repo


def apt(base: Path, repo: Path, cert: Path, *command: str, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """An apt command that reads and writes only under `base` (the machine's apt untouched)
    and trusts only `cert`, for this source alone (signed-by=)."""
    for d in ("etc/sources.list.d", "etc/preferences.d", "etc/apt.conf.d", "state/lists/partial",
              "cache/archives/partial", "log"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "etc/sources.list.d/example.sources").write_text(
        f"Types: deb\nURIs: file:{repo}\nSuites: example\nComponents: main\n"
        f"Signed-By: {cert}\n")
    (base / "status").write_text("")
    opts = [f"Dir::Etc={base / 'etc'}", "Dir::Etc::sourcelist=/dev/null",
            f"Dir::Etc::sourceparts={base / 'etc/sources.list.d'}",
            f"Dir::Etc::trusted={base / 'none.gpg'}",
            f"Dir::Etc::trustedparts={base / 'etc/trusted.gpg.d'}",
            f"Dir::State={base / 'state'}", f"Dir::State::status={base / 'status'}",
            f"Dir::Cache={base / 'cache'}", f"Dir::Log={base / 'log'}",
            "APT::Architecture=amd64", "APT::Sandbox::User=root",
            "Debug::NoLocking=1"]
    argv = list(command)
    for o in opts:
        argv += ["-o", o]
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)


@pytest.mark.control("SGN-11")
def test_only_rsa_pkcs1_and_ecdsa_keys_make_openpgp_profiles(lab: Lab) -> None:
    ps = profiles(lab)
    ps["pgppss"] = {**ps["pss"], "formats": ["openpgp"], "openpgp_created": CREATED}
    r = lab.signer("config", "check", config(lab, "openpgp-pss", ps))
    assert r.returncode == 78 and b"rsa3072-pss cannot sign openpgp" in r.stderr, r.stderr
    ps["pgppss"] = {**ps["dev"], "formats": ["openpgp-cleartext"]}
    r = lab.signer("config", "check", config(lab, "openpgp-nocreated", ps))
    assert r.returncode == 78 and b"openpgp_created: required" in r.stderr, r.stderr


@pytest.mark.control("SGN-04", "SGN-11")
def test_release_signature_needs_two_custodians_who_recompute_the_openpgp_digest(
        pgp: PGP, tmp_path: Path) -> None:
    art = tmp_path / "release.tar.gz"
    art.write_bytes(os.urandom(50_000))
    lab, s = pgp.signer.lab, pgp.signer
    waiting = subprocess.Popen(
        [sys.executable, "-m", "signer", "submit", "--host", "build1@signer", "--profile",
         "pgprel", "--format", "openpgp", "--armor", "--wait", "--poll", "0.2", "--ssh",
         pgp.ssh, str(art)], env=lab.env, stderr=subprocess.PIPE)
    try:
        item = None
        for _ in range(100):
            mine = [json.loads(x) for x in s.gw("requests", custodian="alice").stdout.splitlines()]
            mine = [i for i in mine if i["name"] == art.name and i["state"] == "pending"]
            if mine:
                item = mine[0]
                break
            time.sleep(0.3)
        assert item is not None
        rid, field = item["id"], item["openpgp"]
        # what the token will sign is shown, and it is what this copy of the file gives
        assert item["statement"].endswith(f"\nformat=openpgp\nopenpgp={field}\n")
        with art.open("rb") as f:
            assert openpgp.recompute(field, [f.read()]).field() == field
        other = tmp_path / "other.tar.gz"
        other.write_bytes(os.urandom(50_000))
        r = lab.signer("approve", "--host", "alice@signer", "--key", lab.custodian_keys["alice"],
                       "--artifact", other, "--yes", "--ssh", pgp.ssh, rid)
        assert r.returncode == 65, r.stderr
        assert not list(tmp_path.glob("*.asc"))
        for who in ("alice", "bob"):
            r = lab.signer("approve", "--host", f"{who}@signer", "--key",
                           lab.custodian_keys[who], "--artifact", art, "--yes", "--ssh",
                           pgp.ssh, rid)
            assert r.returncode == 0, r.stderr
            assert f"openpgp={field}".encode() in r.stdout
        assert waiting.wait(timeout=60) == 0
    finally:
        waiting.kill()
        _out, err = waiting.communicate()
    sig = tmp_path / "release.tar.gz.asc"
    v = gpgv(pgp.certs["pgprel"], sig, art)
    assert v.returncode == 0, v.stderr + err.decode()
    assert sqv(pgp.certs["pgprel"], sig, art).returncode == 0
    entry = s.events("sign")[-1]
    assert entry["request"] == rid and entry["openpgp"] == field
    assert [e["openpgp"] for e in s.events("queue") if e["request"] == rid] == [field]


@pytest.mark.control("SGN-11")
def test_a_certificate_exported_again_vouches_for_earlier_signatures(
        pgp: PGP, tmp_path: Path) -> None:
    """The self-signature is dated at the key's creation: sqv wants a binding valid when the
    signature was made, so exporting the certificate again (a new host, a lost file) must
    not orphan what was signed before. Same key, same fingerprint."""
    art = tmp_path / "old.bin"
    art.write_bytes(os.urandom(1000))
    assert pgp.submit("pgp", art, "--format", "openpgp").returncode == 0
    time.sleep(1.1)  # the export is later than the signature, by the clock
    again = tmp_path / "again.pgp"
    r = pgp.signer.lab.signer("keys", "openpgp", "--config", pgp.signer.config, "--profile",
                              "pgp", "--uid", "Example pgp again <pgp@example.org>",
                              "--out", again)
    assert r.returncode == 0, r.stderr
    q = sqv(again, tmp_path / "old.bin.sig", art)
    assert q.returncode == 0, q.stderr
    assert gpgv(again, tmp_path / "old.bin.sig", art).returncode == 0
    r = pgp.signer.lab.signer("keys", "openpgp", "--config", pgp.signer.config, "--profile",
                              "pgp", "--uid", "Example pgp <pgp@example.org>")
    assert r.stdout.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n")


@pytest.mark.control("SGN-11")
def test_openpgp_requests_are_refused_where_the_profile_does_not_allow_them(pgp: PGP) -> None:
    r = pgp.signer.gw("sign --profile dev --format openpgp", b"data")
    assert "openpgp" in one_line_error(r)


def test_submit_help_lists_openpgp(lab: Lab) -> None:
    r = lab.signer("submit", "--help")
    assert r.returncode == 0
    assert b"openpgp" in r.stdout and b"openpgp-cleartext" in r.stdout


# --- the pure parts: hashing whatever the chunks, the field --------------------------------

TEXT = st.binary(max_size=400).map(lambda b: b.replace(b"\x00", b" ")) | st.lists(
    st.sampled_from([b"a", b"-", b" ", b"\t", b"\r", b"\n", b"\r\n", b"x y"]),
    max_size=60).map(b"".join)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


TRAILER = openpgp.document_trailer(openpgp.SIG_TEXT, openpgp.PUBKEY_ECDSA, 1_800_000_000,
                                   bytes(range(20)))


@given(TEXT, st.lists(st.integers(min_value=0), max_size=8))
def test_cleartext_digest_is_the_framework_reading_whatever_the_chunks(
        text: bytes, cuts: list[int]) -> None:
    """The host's streamed hash equals the hash of the text as a verifier reads it back from
    the message `cleartext` writes: its lines, CRLF between them, trailing blanks removed."""
    streamed = openpgp.digest_file(_chunks(text, cuts), "text", TRAILER)
    shown = openpgp._lines(text)
    assert streamed == hashlib.sha256(b"\r\n".join(shown) + TRAILER.hashed_trailer).digest()
    message = openpgp.cleartext(text, b"\xc2\x01\x00")
    body = message.split(b"\n\n", 1)[1].split(b"-----BEGIN PGP SIGNATURE-----")[0]
    read_back = [line[2:] if line.startswith(b"- ") else line
                 for line in body.split(b"\n")[:-1]]
    assert read_back == shown


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_binary_digest_is_the_bytes_and_the_trailer(data: bytes, cuts: list[int]) -> None:
    trailer = openpgp.document_trailer(openpgp.SIG_BINARY, openpgp.PUBKEY_RSA, 1, bytes(20))
    assert openpgp.digest_file(_chunks(data, cuts), "binary", trailer) == \
        hashlib.sha256(data + trailer.hashed_trailer).digest()


def test_the_field_names_every_value_of_the_trailer_and_nothing_else_parses() -> None:
    req = openpgp.Request("text", "rsa3072-pkcs1", 1_800_000_000, bytes(range(20)),
                          bytes(32))
    field = req.field()
    assert field == ("v4 text rsa3072-pkcs1 created=2027-01-15T08:00:00Z "
                     "fpr=000102030405060708090A0B0C0D0E0F10111213 sha256:" + "00" * 32)
    assert openpgp.Request.parse(field) == req
    # a client cannot make the host sign a certification or key binding: no such type
    for bad in (field.replace("text", "cert"), field.replace("v4", "v6"),
                field.replace("rsa3072-pkcs1", "rsa3072-pss"), field + " x", field[:-2]):
        with pytest.raises(openpgp.OpenPGPError):
            openpgp.Request.parse(bad)
    assert req.trailer.prefix[:4] == bytes([4, openpgp.SIG_TEXT, openpgp.PUBKEY_RSA, 8])


@pytest.mark.parametrize("when", ["2026-01-01T00:00:00Z", "2026-01-01T01:00:00+01:00"])
def test_openpgp_created_is_a_date_time_with_its_offset_native_or_quoted(when: str) -> None:
    from signer import config as config_mod
    from tests.signer.test_config import BASE
    from toolkit.local_signer import toml

    tables = {k: dict(v) for k, v in BASE.items()}
    tables["profiles.dev"].update(formats=["openpgp"], openpgp_created=when)
    quoted = toml(tables)
    native = quoted.replace(f'"{when}"', when)
    for text in (quoted, native):
        cfg = config_mod.parse(text, Path("/etc/signer/signer.toml"))
        assert cfg.profiles["dev"].openpgp_created == 1767225600
    for bad in ('"2026-01-01T00:00:00"', "2026-01-01", '"yesterday"', "1767225600"):
        with pytest.raises(SignerError, match="openpgp_created: must be a TOML date-time"):
            config_mod.parse(quoted.replace(f'"{when}"', bad), Path("/etc/signer/signer.toml"))
