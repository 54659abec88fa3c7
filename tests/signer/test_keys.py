"""Keys stay in the token: generation on the token, residency checks, the PIN's paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.signer.conftest import MakeSigner, Signer, one_line_error


@pytest.mark.control("TOK-01")
def test_keys_generate_makes_a_resident_key_and_never_replaces_one(shared: Signer,
                                                                   make_signer: MakeSigner) -> None:
    s: Signer = make_signer(start=False, audit_key="pkcs11:token=signer;object=audit-gen")
    r = s.lab.signer("keys", "generate", "--config", s.config, "--audit")
    assert r.returncode == 0, r.stderr
    assert b"generated: audit key" in r.stdout and b"not extractable" in r.stdout
    listing = s.lab.signer("keys", "list", "--config", s.config).stdout.decode()
    (line,) = [x for x in listing.splitlines() if x.startswith("private 'audit-gen'")]
    assert "LOCAL=True" in line and "NEVER_EXTRACTABLE=True" in line
    r = shared.lab.signer("keys", "generate", "--config", shared.config, "--profile", "dev")
    assert r.returncode == 73
    assert b"already exists" in r.stderr and b"refusing to replace" in r.stderr
    r = shared.lab.signer("keys", "generate", "--config", shared.config, "--profile", "dev",
                          "--if-missing")
    assert r.returncode == 0 and r.stdout.startswith(b"exists")


@pytest.mark.control("TOK-01")
def test_one_run_generates_the_missing_keys_of_several_profiles(make_signer: MakeSigner) -> None:
    """`--profile` repeated (deploy's one start-up for every profile): each missing key is
    generated, each existing one kept and said so, one line each."""
    tag = os.urandom(3).hex()
    s: Signer = make_signer(start=False, profile_overrides={
        "gen-a": {"key": f"pkcs11:token=signer;object=gen-a-{tag};type=private"},
        "gen-b": {"key": f"pkcs11:token=signer;object=gen-b-{tag};type=private",
                  "algorithm": "rsa3072-pkcs1"}})
    args: list[str | Path] = ["keys", "generate", "--config", s.config, "--profile", "gen-a",
                              "--profile", "dev", "--profile", "gen-b", "--if-missing"]
    first = s.lab.signer(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.decode().splitlines()
    assert [line.split(":")[0:2] for line in lines] == [
        ["generated", " profile gen-a"], ["exists", " profile dev"],
        ["generated", " profile gen-b"]], lines
    again = s.lab.signer(*args)
    assert again.returncode == 0, again.stderr
    assert [line.split(":")[0] for line in again.stdout.decode().splitlines()] == ["exists"] * 3


@pytest.mark.control("TOK-01")
def test_generated_keys_are_resident_and_an_imported_key_is_not(shared: Signer) -> None:
    r = shared.lab.signer("keys", "list", "--config", shared.config)
    assert r.returncode == 0
    dev = [line for line in r.stdout.decode().splitlines() if line.startswith("private 'dev'")]
    assert dev and "NEVER_EXTRACTABLE=True" in dev[0] and "EXTRACTABLE=False" in dev[0]
    r = shared.lab.signer("keys", "check", "--config", shared.config)
    assert r.returncode == 77
    lines = r.stdout.decode().splitlines()
    assert "FAIL profile imported" in "\n".join(lines)
    assert "LOCAL=False (want True)" in "\n".join(lines)
    assert all(line.startswith("ok ") for line in lines if "imported" not in line)


@pytest.mark.control("TOK-01")
def test_a_key_that_is_not_resident_is_refused_and_the_refusal_logged(signer: Signer) -> None:
    (failure,) = [e for e in signer.events("residency-failure")]
    assert failure["profile"] == "imported"
    assert "NEVER_EXTRACTABLE=False" in failure["reason"]
    r = signer.gw("sign --profile imported --format raw", b"data")
    assert r.returncode == 77
    assert "not resident" in one_line_error(r)
    assert signer.events("sign") == []
    assert signer.events("deny")[-1]["reason"] == "sign: key not resident"


@pytest.mark.control("TOK-03")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_pin_file_readable_by_others_is_refused(make_signer: MakeSigner, tmp_path: Path,
                                                  mode: int) -> None:
    pin = tmp_path / "pin"
    s2: Signer = make_signer(start=False, pin_source=f"file:{pin}")
    pin.write_bytes(s2.lab.pin_file.read_bytes())
    pin.chmod(mode)
    r = s2.lab.signer("serve", "--config", s2.config, timeout=20)
    assert r.returncode == 78
    err = one_line_error(r)
    assert f"mode is {mode:04o}" in err and "chmod 0400" in err
    assert not s2.socket.exists()


@pytest.mark.control("TOK-03")
def test_the_pin_is_not_in_argv_environment_logs_and_core_dumps_are_off(signer: Signer) -> None:
    pin = signer.lab.pin_file.read_text().strip()
    proc = signer.lab.daemons[signer.config]
    assert signer.gw("sign --profile dev --format raw", b"x").returncode == 0
    proc_dir = Path(f"/proc/{proc.pid}")
    assert pin.encode() not in (proc_dir / "cmdline").read_bytes()
    assert pin.encode() not in (proc_dir / "environ").read_bytes()
    limits = (proc_dir / "limits").read_text()
    assert [line.split()[-3:-1] for line in limits.splitlines()
            if line.startswith("Max core file size")] == [["0", "0"]]
    signer.stop()
    assert pin not in signer.audit_log.read_text()
    assert pin not in signer.log


@pytest.mark.control("TOK-03")
def test_prompt_pin_starts_locked_until_a_custodian_unlocks(make_signer: MakeSigner) -> None:
    s: Signer = make_signer(pin_source="prompt")
    pin = s.lab.pin_file.read_bytes()
    r = s.gw("sign --profile dev --format raw", b"x")
    assert r.returncode == 69
    assert "locked" in one_line_error(r)
    assert s.gw("unlock", b"x" + pin, client="build1").returncode == 77
    r = s.gw("unlock", b"000000\n", custodian="alice")
    assert r.returncode == 77
    assert "refused the PIN" in one_line_error(r)
    r = s.gw("unlock", pin, custodian="alice")
    assert r.returncode == 0, r.stderr
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0
    assert s.gw("unlock", pin, custodian="bob").stderr == b"signer: already unlocked\n"
    assert [e.get("custodian") for e in s.events("unlock")] == ["alice"]
    # Checkpoints wait for the audit key: the first one comes right after the unlock.
    assert s.events("checkpoint")
    s.stop()
    assert pin.strip().decode() not in s.audit_log.read_text() + s.log


@pytest.mark.control("TOK-01")
def test_daemon_with_the_token_missing_exits_with_one_line(shared: Signer, tmp_path: Path
                                                           ) -> None:
    empty = tmp_path / "softhsm2.conf"
    (tmp_path / "tokens").mkdir()
    empty.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = "
                     "file\n")
    r = shared.lab.signer("serve", "--config", shared.config,
                          env={"SOFTHSM2_CONF": str(empty)})
    assert r.returncode == 69
    assert "token 'signer' not found" in one_line_error(r)


def test_csr_and_certificate_import(shared: Signer, tmp_path: Path) -> None:
    csr = tmp_path / "release.csr"
    r = shared.lab.signer("keys", "csr", "--config", shared.config, "--profile", "release",
                          "--subject", "CN=Example Release Signing, O=Example", "--out", csr)
    assert r.returncode == 0, r.stderr
    v = subprocess.run(["openssl", "req", "-verify", "-in", str(csr), "-noout", "-subject"],
                       capture_output=True, text=True, check=False)
    assert v.returncode == 0 and "Example Release Signing" in v.stdout, v.stderr
    # A CA signs the CSR (openssl plays the CA here).
    ca_key, ca_cert, cert = tmp_path / "ca.key", tmp_path / "ca.pem", tmp_path / "rel.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key), "-out",
                    str(ca_cert), "-subj", "/CN=Test CA", "-days", "2"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey",
                    str(ca_key), "-CAcreateserial", "-out", str(cert), "-days", "2"],
                   check=True, capture_output=True)
    # The dev certificate does not belong to the release key: refused.
    r = shared.lab.signer("keys", "import-cert", "--config", shared.config, "--profile",
                          "release", shared.lab.certs / "dev.pem")
    assert r.returncode == 65 and b"is not a certificate for" in r.stderr
    installed = Path(shared.lab.certs / "release.pem")
    before = installed.read_bytes()
    try:
        r = shared.lab.signer("keys", "import-cert", "--config", shared.config, "--profile",
                              "release", cert)
        assert r.returncode == 0, r.stderr
        assert b"Test CA" in subprocess.run(["openssl", "x509", "-in", str(installed),
                                             "-noout", "-issuer"], capture_output=True,
                                            check=True).stdout
    finally:
        installed.write_bytes(before)


def test_selfsign_refuses_to_overwrite(shared: Signer) -> None:
    r = shared.lab.signer("keys", "selfsign", "--config", shared.config, "--profile", "dev")
    assert r.returncode == 73
    r = shared.lab.signer("keys", "selfsign", "--config", shared.config, "--profile", "dev",
                          "--if-missing")
    assert r.returncode == 0


@pytest.mark.control("TOK-03")
def test_keys_commands_refuse_a_pin_file_readable_by_others(shared: Signer, tmp_path: Path,
                                                            make_signer: MakeSigner) -> None:
    pin = tmp_path / "pin"
    pin.write_bytes(shared.lab.pin_file.read_bytes())
    os.chmod(pin, 0o644)
    s: Signer = make_signer(start=False, pin_source="prompt")
    r = s.lab.signer("keys", "list", "--config", s.config, "--pin-file", str(pin))
    assert r.returncode == 78 and b"must not be readable by group or others" in r.stderr


def test_the_token_is_chosen_by_label_and_serial(shared: Signer, monkeypatch: Any) -> None:
    """`token_serial` (RFC 7512 `serial`): only the token with that serial is opened, so a
    second token with the same label (a spare, a planted one) is never used by mistake."""
    from signer.errors import SignerError
    from signer.token import Token
    from toolkit.local_signer import SOFTHSM_MODULE, TOKEN_LABEL

    monkeypatch.setenv("SOFTHSM2_CONF", str(shared.lab.conf))
    serial = Token(SOFTHSM_MODULE, TOKEN_LABEL)._token.serial.decode()
    assert Token(SOFTHSM_MODULE, TOKEN_LABEL, serial).label == TOKEN_LABEL
    with pytest.raises(SignerError, match="with serial 'not-this-one' not found"):
        Token(SOFTHSM_MODULE, TOKEN_LABEL, "not-this-one")


@pytest.mark.control("TOK-03")
def test_keys_commands_read_the_pin_from_pin_file_when_the_config_prompts(
        shared: Signer, tmp_path: Path, make_signer: MakeSigner) -> None:
    """What deploy does with pin_source prompt: the PIN in a 0400 file named by --pin-file,
    never in the environment or argv; without it and without a terminal, a clear refusal."""
    pin = tmp_path / "pin"
    pin.write_bytes(shared.lab.pin_file.read_bytes())
    os.chmod(pin, 0o400)
    s: Signer = make_signer(start=False, pin_source="prompt")
    r = s.lab.signer("keys", "list", "--config", s.config, "--pin-file", str(pin))
    assert r.returncode == 0, r.stderr
    r = s.lab.signer("keys", "list", "--config", s.config)
    assert r.returncode == 78 and b"--pin-file" in r.stderr
