"""token.csr and token.import-cert end to end on this machine: the real invoke command line, real
Ansible (connection local, become), the real signer CLI on a real SoftHSM2 token.

The host's paths come from the inventory (signer_venv, signer_config, ...), which is what lets
the same tasks run against any host.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from toolkit import exitcodes, local_signer

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(inventory, signer config, controller dir) for a 'host' that is this machine."""
    why = local_signer.available()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("token-host")
    lab = local_signer.Lab(root / "lab")
    lab.init_token()
    profiles = {name: {
        "key": f"pkcs11:token={local_signer.TOKEN_LABEL};object={name};type=private",
        "algorithm": "ecdsa-p256", "formats": ["raw"], "max_size": 1024, "clients": [],
        "budget_count": 10, "budget_window": 60, "cert": str(lab.certs / f"{name}.pem")}
        for name in ("release", "dev")}
    cfg = lab.config("host", profiles, [], [])
    for argv in (["keys", "generate", "--profile", "release"],
                 ["keys", "generate", "--profile", "dev"], ["keys", "generate", "--audit"]):
        r = subprocess.run([sys.executable, "-m", "signer", *argv, "--config", str(cfg)],
                           env=lab.env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    ctl = root / "controller"
    inv = root / "inv"
    inv.mkdir()
    hostvars = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": True,
        "token_pin_dir": str(root / "pins"),
        "signer_daemon_user": "root",
        "signer_venv": sys.prefix,
        "signer_config": str(cfg),
        "signer_softhsm_conf": str(lab.conf),
        "signer_controller_dir": str(ctl),
        "signer_service": "signer-test-no-such-unit",
        "base_aide": False,  # this machine keeps no AIDE baseline (the lab test covers that part)
    }
    (inv / "hosts.yml").write_text(yaml.safe_dump(
        {"all": {"children": {"signing_hosts": {"hosts": {"here": hostvars}}}}}))
    yield inv, lab.certs / "release.pem", ctl


def _invoke(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([INVOKE, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def _openssl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *argv], capture_output=True, text=True, check=True)


def test_csr_then_import_cert(host: tuple[Path, Path, Path], tmp_path: Path) -> None:
    inv, installed, ctl = host
    proc = _invoke("token.csr", "-i", str(inv), "--subject", "CN=test release")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    csr = ctl / "release-request.csr"
    assert f"written to {csr}" in proc.stdout
    # A real request, signed by the token key, with the subject asked for.
    _openssl("req", "-in", str(csr), "-verify", "-noout")
    assert "CN = test release" in _openssl("req", "-in", str(csr), "-noout", "-subject").stdout

    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem"),
             "-subj", "/CN=test CA", "-days", "1")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(tmp_path / "ca.pem"),
             "-CAkey", str(tmp_path / "ca.key"), "-out", str(tmp_path / "release.pem"),
             "-days", "1")
    proc = _invoke("token.import-cert", str(tmp_path / "release.pem"), "-i", str(inv))
    # The certificate is installed for the key; restarting the daemon is the last step, and
    # there is no such service here: that failure is reported, on one line, as a failure.
    assert installed.read_bytes() == (tmp_path / "release.pem").read_bytes()
    assert not Path("/run/signer-import-release.pem").exists()
    assert proc.returncode == exitcodes.FAILED, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("token.import-cert: on here: ") and last.endswith(")")


def test_import_cert_refuses_a_certificate_for_another_key(
    host: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    inv, installed, _ = host
    before = installed.read_bytes() if installed.exists() else None
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(tmp_path / "other.key"), "-out", str(tmp_path / "other.pem"),
             "-subj", "/CN=other", "-days", "1")
    proc = _invoke("token.import-cert", str(tmp_path / "other.pem"), "-i", str(inv))
    assert proc.returncode == exitcodes.FAILED
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("token.import-cert: on here: ")
    assert (installed.read_bytes() if installed.exists() else None) == before


def _issue(ca: Path, csr: Path, out: Path) -> Path:
    """A certificate for CSR from a throw-away CA in CA (made on first use)."""
    if not (ca / "ca.pem").exists():
        ca.mkdir(exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(ca / "ca.key"), "-out", str(ca / "ca.pem"),
                 "-subj", "/CN=test CA", "-days", "1")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca.pem"), "-CAkey",
             str(ca / "ca.key"), "-out", str(out), "-days", "1")
    return out


def test_import_cert_installs_several_profiles_in_one_round(
    host: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    inv, installed, ctl = host
    issued = {}
    for name in ("release", "dev"):
        proc = _invoke("token.csr", "-i", str(inv), "--profile", name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        issued[name] = _issue(tmp_path / "ca", ctl / f"{name}-request.csr",
                              tmp_path / f"{name}.pem")
    proc = _invoke("token.import-cert", str(issued["release"]), "--also",
                   f"dev={issued['dev']}", "-i", str(inv))
    # Both installed, each for its own key, before the one restart (no such unit here).
    assert installed.read_bytes() == issued["release"].read_bytes()
    assert (installed.parent / "dev.pem").read_bytes() == issued["dev"].read_bytes()
    assert not list(Path("/run").glob("signer-import-*.pem"))
    # The restart, the last step, fails here (no such unit, or no systemd at all).
    assert proc.returncode == exitcodes.FAILED, proc.stdout + proc.stderr
    assert "is not a certificate for" not in proc.stderr, proc.stderr


def test_import_cert_stops_at_the_first_certificate_for_another_key(
    host: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """--also with dev's certificate given as release's: dev's installed, release's refused
    and its file unchanged; the round stops there, on the signer's refusal."""
    inv, installed, ctl = host
    proc = _invoke("token.csr", "-i", str(inv), "--profile", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dev = _issue(tmp_path / "ca", ctl / "dev-request.csr", tmp_path / "dev.pem")
    before = installed.read_bytes() if installed.exists() else None
    proc = _invoke("token.import-cert", str(dev), "--also", f"release={dev}", "--profile",
                   "dev", "-i", str(inv))
    assert proc.returncode == exitcodes.FAILED, proc.stdout + proc.stderr
    assert (installed.read_bytes() if installed.exists() else None) == before
    assert (installed.parent / "dev.pem").read_bytes() == dev.read_bytes()
    assert "is not a certificate for" in proc.stderr, proc.stderr


@pytest.mark.parametrize("also", ["dev", "=x.pem", "dev="])
def test_import_cert_also_wants_profile_equals_cert(tmp_path: Path, also: str) -> None:
    cert = tmp_path / "release.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    proc = _invoke("token.import-cert", str(cert), "--also", also)
    assert proc.returncode == exitcodes.BAD_INPUT, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"token.import-cert: --also {also!r}: expected PROFILE=CERT"
