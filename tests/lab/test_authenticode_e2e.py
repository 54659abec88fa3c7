"""Authenticode from the build server, end to end, as the Jenkins job of the seed runs it:
`signer submit --format authenticode app.exe` from the build host's network namespace over
SSH to the lab VM; the dev profile signs at once, the release profile after two custodians
approved the Authenticode digest they recomputed from their own copy; an MSI installer (built
with wixl at test time) the dev way. The timestamp comes from
a TSA stand-in on the controller, inside the build namespace (the signing host never talks to
it). The verdict is the outside verifiers': `osslsigncode verify` against the lab CA (which
issued the profiles' certificates from the deployed CSRs) and signify.

Profiles, clients and custodians come from the inventory under test (inventory/lab, or the site
inventory, which renders the example's Windows profiles): the authenticode profiles are
found by their formats and approvals, not by name. Needs `invoke deploy` on the lab; the
certificates are issued here once per lab (a real CA's job, done at run time).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from asn1crypto import cms, pem

from lab.ca import LabCA
from lab.state import LabState
from lab.target import Party, Target
from signer import osslsigncode
from tests.signer.test_authenticode import SIGNIFY, flip, flip_in_payload, installer
from toolkit.local_signer import write_pe

if TYPE_CHECKING:
    from tests.lab.conftest import AdminSsh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# This checkout's client (`python -m signer` from ROOT), not whatever `signer` is on PATH.
SIGNER = [sys.executable, "-m", "signer"]
EX_USAGE, EX_DATA = 64, 65

# The TSA stand-in, run inside the build namespace (loopback there): tests/signer/pki.py's
# TSA with a CA of its own; prints its URL and its CA file, then serves until killed.
TSA_SERVER = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.signer.pki import TSA, LabCA
root = Path(sys.argv[2])
tsa = TSA(LabCA(root / "ca", "signlab TSA CA"), root / "tsa")
print(tsa.url, root / "ca" / "ca.pem", flush=True)
threading.Event().wait()
"""


@dataclass(frozen=True)
class Setup:
    dev: str  # an authenticode profile without approvals
    release: str  # one that needs approvals and a timestamp
    subjects: dict[str, str]  # profile -> the CN of its certificate's subject
    approvers: list[Party]  # custodians of the release profile, as many as it needs
    client: Party  # a build server that is a client of both, its key held by the lab
    gateway: str  # the account that client logs in through
    values: dict[str, Any]


def _cn(subject: str) -> str:
    return next(part.split("=", 1)[1] for part in subject.split(",") if part.startswith("CN="))


@pytest.fixture(scope="module")
def setup(target: Target) -> Setup:
    """The parts from the inventory under test: inventory/lab, or the site inventory, which
    renders the example's Windows profiles (lab/site.py)."""
    profiles = [p for p in target.profiles if "authenticode" in p["formats"]]
    dev = [p for p in profiles if not p.get("approvals")]
    rel = [p for p in profiles if p.get("approvals", 0) >= 2 and p.get("require_timestamp")]
    if not dev or not rel:
        pytest.skip(f"{target.inventory}: no authenticode profile without approvals and one "
                    "with 2 approvals and require_timestamp")
    clients = [c for c in target.clients if target.allowed(dev[0], c)
               and target.allowed(rel[0], c)]
    if not clients:
        pytest.skip(f"{target.inventory}: no client of both authenticode profiles whose key "
                    "the lab holds")
    approvers = [c for c in target.custodians if c.name in rel[0]["custodians"]]
    assert len(approvers) >= rel[0]["approvals"], "the lab holds too few custodians' keys"
    return Setup(dev=dev[0]["name"], release=rel[0]["name"],
                 subjects={p["name"]: _cn(p["subject"]) for p in (dev[0], rel[0])},
                 approvers=approvers[: rel[0]["approvals"]],
                 client=clients[0], gateway=target.account(clients[0]),
                 values=target.values)


@pytest.fixture(scope="module")
def ca(lab: LabState) -> LabCA:
    ca = LabCA(lab.state_dir)
    if not ca.cert.exists():
        pytest.fail(f"{ca.cert} is missing: `invoke lab.up` makes the lab CA")
    return ca


@pytest.fixture(scope="module")
def certs(setup: Setup, ca_certs: dict[str, Path]) -> dict[str, Path]:
    """Each authenticode profile's certificate, issued by the lab CA from the CSR the deploy
    fetched (code-signing EKU), installed with `invoke token.import-cert`: the host checks it
    against the profile's token key, and the change is taken into the AIDE baseline (BASE-07).
    Once per lab, in the round that installs every CA profile's (conftest's ca_certs)."""
    return {name: ca_certs[name] for name in (setup.dev, setup.release)}


@dataclass(frozen=True)
class Tsa:
    url: str
    ca: Path


@pytest.fixture(scope="module")
def tsa(lab: LabState, setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tsa]:
    root = tmp_path_factory.mktemp("tsa")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.host(str(setup.client.netns_host)).netns, sys.executable, "-c",
         TSA_SERVER,
         str(ROOT), str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().split()
        assert len(line) == 2, proc.stderr.read() if proc.poll() is not None else line
        yield Tsa(url=line[0], ca=Path(line[1]))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def trust(ca: LabCA, tsa: Tsa, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a verifier trusts: the lab CA (code signing) and the TSA's CA."""
    bundle = tmp_path_factory.mktemp("trust") / "trust.pem"
    bundle.write_text(ca.cert.read_text() + tsa.ca.read_text())
    return bundle


def _ssh_cmd(lab: LabState, key: Path, *extra: str) -> str:
    """The `--ssh` of `signer submit`/`approve`: the lab's known host key, this key only."""
    return shlex.join([
        "ssh", "-o", f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}", "-o",
        "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o",
        "ConnectTimeout=15", "-o", "LogLevel=ERROR", "-i", str(key), *extra])


@pytest.fixture(scope="module")
def submit(lab: LabState, setup: Setup, ca: LabCA, certs: dict[str, Path]) -> Callable[..., Any]:
    """`signer submit` on the build server: its namespace, its key, the VM's lab address."""

    def run(artifact: Path, profile: str, *args: str, background: bool = False) -> Any:
        argv = ["ip", "netns", "exec", lab.host(str(setup.client.netns_host)).netns, *SIGNER,
                "submit", "--host", f"{setup.gateway}@{lab.vm_ipv4}", "--ssh",
                _ssh_cmd(lab, setup.client.key), "--profile", profile, "--format",
                "authenticode", "--cafile", str(ca.cert), *args, str(artifact)]
        if background:
            return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        return subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=180)

    return run


def _verify(path: Path, trust: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["osslsigncode", "verify", "-CAfile", str(trust), "-TSA-CAfile",
                           str(trust), "-in", str(path)],
                          capture_output=True, text=True, timeout=60)


def _signify(path: Path, trust: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SIGNIFY, str(path), str(trust)],
                          capture_output=True, text=True, timeout=60)


def _audit(admin_ssh: AdminSsh, setup: Setup) -> list[dict[str, Any]]:
    log = admin_ssh(f"cat {shlex.quote(setup.values['signer_audit_log'])}", sudo=True)
    assert log.returncode == 0, log.stderr
    return [json.loads(line) for line in log.stdout.splitlines() if line.strip()]


def _label(path: Path, tmp_path: Path) -> str:
    return osslsigncode.extract(path, tmp_path / f"{path.name}.req").label


def _der(cert: Path) -> bytes:
    return bytes(pem.unarmor(cert.read_bytes())[2])


def _certificates(signed: Path, tmp_path: Path) -> list[bytes]:
    """The certificates in the file's signature (DER)."""
    der = tmp_path / f"{signed.name}.p7"
    subprocess.run(["osslsigncode", "extract-signature", "-in", str(signed), "-out", str(der)],
                   capture_output=True, check=True)
    asn1 = cms.ContentInfo.load(der.read_bytes())
    return [c.chosen.dump() for c in asn1["content"]["certificates"]]


def _assert_accepted(path: Path, trust: Path, subject: str) -> None:
    """osslsigncode accepts the signature and its timestamp; `subject`: the signer's CN."""
    v = _verify(path, trust)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Signature verification: ok" in v.stdout
    assert "Timestamp Server Signature verification: ok" in v.stdout
    assert subject in v.stdout and "lab CA" in v.stdout, v.stdout


@pytest.mark.control("SGN-09", "SGN-10")
def test_build_server_signs_a_pe_that_osslsigncode_and_signify_accept_with_a_timestamp(
        submit: Callable[..., Any], setup: Setup, ca: LabCA, certs: dict[str, Path], tsa: Tsa,
        trust: Path, admin_ssh: AdminSsh, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "app.exe", 200_000)
    label = _label(exe, tmp_path)
    r = submit(exe, setup.dev, "--timestamp", tsa.url)
    assert r.returncode == 0, r.stderr.decode()
    _assert_accepted(exe, trust, setup.subjects[setup.dev])
    s = _signify(exe, trust)
    assert s.returncode == 0, s.stdout + s.stderr
    # The deployed chain travels with the signature: the leaf and the lab CA's certificate
    # (a SET OF in DER order, not the chain's order).
    assert sorted(_certificates(exe, tmp_path)) == sorted([_der(certs[setup.dev]),
                                                           _der(ca.cert)])
    # The host logged what it saw: the Authenticode digest and the name, never the binary.
    entry = [e for e in _audit(admin_ssh, setup) if e["event"] == "sign"][-1]
    assert entry["profile"] == setup.dev and entry["name"] == "app.exe"
    assert entry["format"] == "authenticode" and entry["authenticode"] == label
    assert entry["size"] < 1024 < exe.stat().st_size
    # One flipped byte in the code section: both verifiers refuse the file.
    bad = flip(exe, 0x400 + 1000)
    assert _verify(bad, trust).returncode != 0
    s = _signify(bad, trust)
    assert s.returncode == 1 and "INVALID_DIGEST" in s.stdout, s.stdout + s.stderr


@pytest.mark.control("SGN-09", "SGN-10")
def test_build_server_signs_a_powershell_script(submit: Callable[..., Any], setup: Setup, tsa: Tsa,
                                                trust: Path, tmp_path: Path) -> None:
    script = tmp_path / "deploy.ps1"
    script.write_bytes(b'Write-Output "signed through the lab"\r\nexit 0\r\n')
    r = submit(script, setup.dev, "--timestamp", tsa.url)
    assert r.returncode == 0, r.stderr.decode()
    assert b"# SIG # Begin signature block" in script.read_bytes()
    _assert_accepted(script, trust, setup.subjects[setup.dev])
    assert _verify(flip(script, 3), trust).returncode != 0


@pytest.mark.control("SGN-09", "SGN-10")
def test_build_server_signs_an_msi_that_osslsigncode_accepts_with_a_timestamp(
        submit: Callable[..., Any], setup: Setup, tsa: Tsa, trust: Path, admin_ssh: AdminSsh,
        tmp_path: Path) -> None:
    """An installer made on the build server with wixl: only its Authenticode request (the
    digest of its streams) goes to the host; the signed, timestamped MSI passes osslsigncode
    against the lab CA, and one flipped byte in the file it installs does not."""
    if shutil.which("wixl") is None:
        pytest.skip("wixl not installed on the controller (apt install wixl)")
    msi, app = installer(tmp_path / "setup.msi", 200_000)
    label = _label(msi, tmp_path)
    r = submit(msi, setup.dev, "--timestamp", tsa.url)
    assert r.returncode == 0, r.stderr.decode()
    assert f"setup.msi: Authenticode sip {label}" in r.stderr.decode()
    _assert_accepted(msi, trust, setup.subjects[setup.dev])
    entry = [e for e in _audit(admin_ssh, setup) if e["event"] == "sign"][-1]
    assert entry["profile"] == setup.dev and entry["name"] == "setup.msi"
    assert entry["format"] == "authenticode" and entry["authenticode"] == label
    assert entry["size"] < 1024 < msi.stat().st_size
    v = _verify(flip_in_payload(msi, app), trust)
    assert v.returncode != 0 and "Signature verification: ok" not in v.stdout, v.stdout


@pytest.mark.control("SGN-10")
def test_release_without_a_timestamp_is_refused_before_anything_is_signed(
        submit: Callable[..., Any], setup: Setup, admin_ssh: AdminSsh, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "notime.exe", 20_000)
    before = exe.read_bytes()
    r = submit(exe, setup.release)
    assert r.returncode == EX_USAGE, r.stderr.decode()
    assert f"profile '{setup.release}' requires an RFC 3161 timestamp" in r.stderr.decode()
    assert exe.read_bytes() == before
    entries = _audit(admin_ssh, setup)
    assert not [e for e in entries if e.get("name") == "notime.exe"
                and e["event"] in ("queue", "sign")]
    deny = [e for e in entries if e["event"] == "deny"][-1]
    assert deny["profile"] == setup.release and deny["reason"] == "sign: timestamp required"


def _approve(target: Target, who: Party, rid: str, artifact: Path
             ) -> subprocess.CompletedProcess[bytes]:
    """`signer approve` as custodian `who`, the way admins reach the host (the inventory's
    connection: port, ProxyJump, known hosts) with the custodian's account and key."""
    argv = target.custodian_argv(who)
    return subprocess.run(
        [*SIGNER, "approve", "--host", f"{who.name}@{argv[-1]}", "--ssh", shlex.join(argv[:-1]),
         "--key", str(who.key), "--artifact", str(artifact), "--yes", rid],
        cwd=ROOT, capture_output=True, timeout=120)


@pytest.mark.control("SGN-04", "SGN-09", "SGN-10")
def test_release_is_signed_after_two_custodians_recompute_the_authenticode_digest(
        submit: Callable[..., Any], setup: Setup, target: Target, tsa: Tsa, trust: Path,
        admin_ssh: AdminSsh, tmp_path: Path) -> None:
    exe = write_pe(tmp_path / "setup.exe", 100_000)
    label = _label(exe, tmp_path)
    waiting = submit(exe, setup.release, "--timestamp", tsa.url, "--wait", "--poll", "3",
                     background=True)
    seen = b""
    try:
        # `signer submit --wait` relays the host's `queued <id>` before it starts polling.
        assert waiting.stderr is not None
        while (m := re.search(rb"queued ([0-9a-f]{32})", seen)) is None:
            line = waiting.stderr.readline()
            assert line, f"submit ended without queueing: {seen.decode()}"
            seen += line
        rid = m.group(1).decode()
        # A custodian whose copy differs does not approve: the digest is recomputed.
        other = write_pe(tmp_path / "other.exe", 100_000)
        refused = _approve(target, setup.approvers[0], rid, other)
        assert refused.returncode == EX_DATA, refused.stderr.decode()
        assert b"its Authenticode digest is" in refused.stderr
        for who in setup.approvers:
            ok = _approve(target, who, rid, exe)
            assert ok.returncode == 0, ok.stderr.decode()
            assert f"authenticode={label}".encode() in ok.stdout
            assert b'name="setup.exe"' in ok.stdout
        assert waiting.wait(timeout=120) == 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
        waiting.communicate()
    _assert_accepted(exe, trust, setup.subjects[setup.release])
    assert _signify(exe, trust).returncode == 0
    entries = [e for e in _audit(admin_ssh, setup) if e.get("request") == rid]
    assert [e["authenticode"] for e in entries if e["event"] == "queue"] == [label]
    assert {e.get("custodian") for e in entries if e["event"] == "approve"} == \
        {who.name for who in setup.approvers}
    assert [e["authenticode"] for e in entries if e["event"] == "sign"] == [label]
