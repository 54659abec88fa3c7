"""The signer end to end, as its real users see it: a build server in the lab network, key
custodians on the admin side, a reviewer with plain `openssl` on the controller, and an
intruder on the lab segment.

Needs a lab on which `invoke deploy` has run (the dev certificate and the release CSR are
fetched to `<state>/token/signhost/` by the deploy). Everything goes through `ssh`: the
build host from its network namespace to the VM's lab address, custodians through the
forwarded admin port, the audit log through the admin account.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from invoke import Context

from lab import usb
from lab.config import Instance
from lab.state import LabState
from toolkit.tasks import token as tasks_token

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SIGNER = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "signer"
EX_USAGE, EX_UNAVAILABLE, EX_QUEUED, EX_NOPERM = 64, 69, 75, 77


def _ssh_opts(lab: LabState, key: str) -> list[str]:
    return [
        "-o",
        f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "LogLevel=ERROR",
        "-i",
        str(lab.key(key)),
    ]


@pytest.fixture(scope="module")
def token_dir(lab: LabState) -> Path:
    d = lab.state_dir / "token" / "signhost"
    if not (d / "dev.pem").exists():
        pytest.fail(f"{d / 'dev.pem'} is missing: run `invoke deploy` on this lab first")
    return d


@pytest.fixture(scope="module")
def build(lab: LabState, token_dir: Path) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """Run a command on the signer as the build server (from its namespace, its key)."""

    def run(
        command: list[str] | str,
        data: bytes = b"",
        *,
        key: str = "build",
        host: str = "build",
        user: str = "sign-build",
        extra: list[str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        words = command if isinstance(command, list) else [command]
        argv = ["ssh", *_ssh_opts(lab, key), *(extra or []), f"{user}@{lab.vm_ipv4}", *words]
        return lab.netns_run(host, argv, input=data, timeout=90)

    return run


@pytest.fixture(scope="module")
def custodian(lab: LabState) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """Run a gateway command as a custodian (admin side, through the forwarded port)."""
    port = str(lab.raw["ssh"]["port"])

    def run(name: str, command: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        argv = ["ssh", *_ssh_opts(lab, name), "-p", port, f"{name}@127.0.0.1", command]
        return subprocess.run(argv, input=data, capture_output=True, timeout=90)

    return run


def _openssl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=60)


def _pubkey_of_cert(cert: Path, out: Path) -> Path:
    r = _openssl("x509", "-in", str(cert), "-pubkey", "-noout")
    assert r.returncode == 0, r.stderr.decode()
    out.write_bytes(r.stdout)
    return out


def _artifact(tmp_path: Path, size: int = 4096) -> Path:
    p = tmp_path / "artifact.bin"
    p.write_bytes(secrets.token_bytes(size))
    return p


# -- signing from the build server, verified with plain openssl ---------------------------------


@pytest.mark.control("SGN-09", "SGN-02")
def test_build_server_gets_a_cms_signature_that_openssl_verifies(build, token_dir, tmp_path):
    art = _artifact(tmp_path)
    r = build("sign --profile dev --format cms --name artifact.bin", art.read_bytes())
    assert r.returncode == 0, r.stderr.decode()
    sig = tmp_path / "artifact.p7s"
    sig.write_bytes(r.stdout)
    cert = str(token_dir / "dev.pem")
    ok = _openssl(
        "cms",
        "-verify",
        "-binary",
        "-inform",
        "DER",
        "-in",
        str(sig),
        "-content",
        str(art),
        "-CAfile",
        cert,
        "-purpose",
        "any",
        "-out",
        os.devnull,
    )
    assert ok.returncode == 0, ok.stderr.decode()
    # The same signature over a different artifact must not verify.
    other = tmp_path / "other.bin"
    other.write_bytes(art.read_bytes()[:-1] + bytes([art.read_bytes()[-1] ^ 1]))
    bad = _openssl(
        "cms",
        "-verify",
        "-binary",
        "-inform",
        "DER",
        "-in",
        str(sig),
        "-content",
        str(other),
        "-CAfile",
        cert,
        "-purpose",
        "any",
        "-out",
        os.devnull,
    )
    assert bad.returncode != 0


@pytest.mark.control("SGN-09")
def test_build_server_gets_a_raw_signature_that_openssl_dgst_verifies(build, token_dir, tmp_path):
    art = _artifact(tmp_path)
    r = build("sign --profile dev --format raw", art.read_bytes())
    assert r.returncode == 0, r.stderr.decode()
    sig = tmp_path / "artifact.sig"
    sig.write_bytes(r.stdout)
    pub = _pubkey_of_cert(token_dir / "dev.pem", tmp_path / "dev.pub")
    ok = _openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(art))
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
    art.write_bytes(art.read_bytes() + b"\0")
    bad = _openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(art))
    assert bad.returncode != 0


# -- the door is narrow ---------------------------------------------------------------------------


@pytest.mark.control("SGN-01")
@pytest.mark.parametrize("command", ["/bin/sh -c id", "id", "bash -i", "sign --profile dev; id"])
def test_build_account_runs_no_shell_command(build, command):
    r = build(command, b"x")
    assert r.returncode != 0
    assert b"uid=" not in r.stdout + r.stderr


@pytest.mark.control("SGN-01")
def test_build_account_gets_no_interactive_shell(build):
    r = build([], b"id\nexit\n", extra=["-tt"])
    assert r.returncode != 0
    assert b"uid=" not in r.stdout


@pytest.mark.control("SGN-01")
@pytest.mark.parametrize(
    "forward",
    [
        ["-W", "127.0.0.1:22"],  # direct-tcpip, as -L and -D use
        ["-N", "-o", "ExitOnForwardFailure=yes", "-R", "2222:127.0.0.1:22"],
    ],
)
def test_build_account_cannot_forward_ports(build, forward):
    r = build([], b"", extra=forward)
    assert r.returncode != 0
    assert b"SSH-2.0" not in r.stdout  # nothing of the VM's sshd came back through a tunnel


@pytest.mark.control("SGN-01")
def test_build_account_cannot_copy_files_in_or_out(lab, tmp_path):
    src = tmp_path / "payload"
    src.write_bytes(b"payload")
    opts = _ssh_opts(lab, "build")
    target = f"sign-build@{lab.vm_ipv4}"
    for argv in (
        ["scp", *opts, str(src), f"{target}:/tmp/payload"],  # sftp protocol
        ["scp", "-O", *opts, str(src), f"{target}:/tmp/payload"],  # legacy scp
        ["scp", "-O", *opts, f"{target}:/etc/passwd", str(tmp_path / "passwd")],
    ):
        r = lab.netns_run("build", argv, timeout=60)
        assert r.returncode != 0, argv
    sftp = lab.netns_run("build", ["sftp", "-b", "-", *opts, target], input=b"ls /\n", timeout=60)
    assert sftp.returncode != 0
    assert not (tmp_path / "passwd").exists()


@pytest.mark.control("SGN-02")
def test_profile_not_allowed_for_the_client_is_refused(build):
    r = build("sign --profile partner --format raw", b"artifact")
    assert r.returncode == EX_NOPERM, r.stderr.decode()
    assert r.stdout == b""
    unknown = build("sign --profile no-such-profile", b"artifact")
    assert unknown.returncode == EX_USAGE
    assert unknown.stdout == b""


@pytest.mark.control("SGN-01", "NET-01")
@pytest.mark.parametrize("key", ["intruder", "build"])
def test_intruder_gets_nothing_even_with_the_build_key(build, key):
    r = build("sign --profile dev --format raw", b"artifact", key=key, host="intruder")
    assert r.returncode == 255  # ssh itself failed: no connection, or no key accepted
    assert r.stdout == b""


# -- release: certificate from a CA through a CSR, then M-of-N approval of the exact digest ---


@pytest.fixture(scope="module")
def release_cert(lab: LabState, token_dir: Path, admin_ssh, tmp_path_factory) -> Path:
    """The release certificate, issued by a lab CA for the CSR that `invoke token.csr`
    fetched, and installed with `invoke token.import-cert` (once per lab)."""
    cert = token_dir / "release.pem"
    if (
        cert.exists()
        and admin_ssh("test -s /etc/signer/certs/release.pem", sudo=True).returncode == 0
    ):
        return cert
    work = tmp_path_factory.mktemp("ca")
    csr = work / "release.csr"
    tasks_token.csr(Context(), profile="release", out=str(csr))
    ca_key, ca_cert = token_dir / "lab-ca.key", token_dir / "lab-ca.pem"
    if not ca_cert.exists():
        made = _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca_cert),
            "-days",
            "30",
            "-subj",
            "/CN=signlab lab CA",
        )
        assert made.returncode == 0, made.stderr.decode()
        ca_key.chmod(0o600)
    ext = work / "ext.cnf"
    ext.write_text(
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n"
        "basicConstraints=critical,CA:FALSE\n"
    )
    issued = _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    assert issued.returncode == 0, issued.stderr.decode()
    tasks_token.import_cert(Context(), str(cert), profile="release")
    for _ in range(60):  # signerd restarts with the new certificate
        if admin_ssh("test -S /run/signer/signer.sock", sudo=True).returncode == 0:
            break
        time.sleep(2)
    return cert


@pytest.mark.control("SGN-09", "TOK-01")
def test_release_certificate_from_the_ca_matches_the_token_key(release_cert, token_dir):
    ca = token_dir / "lab-ca.pem"
    ok = _openssl("verify", "-CAfile", str(ca), str(release_cert))
    assert ok.returncode == 0, ok.stdout.decode()
    from_cert = _openssl("x509", "-in", str(release_cert), "-pubkey", "-noout").stdout
    from_csr = _openssl("req", "-in", str(token_dir / "release.csr"), "-pubkey", "-noout").stdout
    assert from_cert and from_cert == from_csr


def _approve(custodian, lab: LabState, name: str, rid: str, tmp_path: Path):
    reqs = custodian(name, "requests")
    assert reqs.returncode == 0, reqs.stderr.decode()
    pending = [json.loads(line) for line in reqs.stdout.decode().splitlines() if line.strip()]
    mine = [p for p in pending if p["id"] == rid]
    assert mine, f"request {rid} not listed for {name}: {reqs.stdout.decode()}"
    statement = tmp_path / f"statement-{name}"
    statement.write_text(mine[0]["statement"])
    sig = subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-Y",
            "sign",
            "-n",
            "signer-approval",
            "-f",
            str(lab.key(name)),
            str(statement),
        ],
        capture_output=True,
        timeout=30,
    )
    assert sig.returncode == 0, sig.stderr.decode()
    return custodian(name, f"approve {rid}", Path(str(statement) + ".sig").read_bytes())


def _audit_verify(copy: Path, token_dir: Path) -> subprocess.CompletedProcess[str]:
    """`signer audit verify` on the controller, against the audit key's certificate."""
    return subprocess.run(
        [str(SIGNER), "audit", "verify", str(copy), "--cert", str(token_dir / "audit.pem"),
         "--live"],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.control("SGN-04", "SGN-05")
def test_release_needs_two_custodians_and_every_step_is_audited(
    build, custodian, lab, token_dir, admin_ssh, release_cert, tmp_path
):
    art = _artifact(tmp_path)
    q = build("sign --profile release --format raw --name release.bin", art.read_bytes())
    assert q.returncode == EX_QUEUED, q.stderr.decode()
    m = re.search(rb"queued ([0-9a-f]{32})", q.stderr)
    assert m, q.stderr.decode()
    rid = m.group(1).decode()

    assert build(f"fetch {rid}").returncode == EX_QUEUED
    a1 = _approve(custodian, lab, "alice", rid, tmp_path)
    assert a1.returncode == 0, a1.stderr.decode()
    # One custodian, even approving twice, is not enough.
    _approve(custodian, lab, "alice", rid, tmp_path)
    st = build(f"status {rid}")
    assert st.returncode == 0
    assert json.loads(st.stdout)["state"] == "pending"
    assert build(f"fetch {rid}").returncode == EX_QUEUED

    a2 = _approve(custodian, lab, "bob", rid, tmp_path)
    assert a2.returncode == 0, a2.stderr.decode()
    got = build(f"fetch {rid}")
    assert got.returncode == 0, got.stderr.decode()
    sig = tmp_path / "release.sig"
    sig.write_bytes(got.stdout)
    req = _openssl("req", "-in", str(token_dir / "release.csr"), "-pubkey", "-noout")
    pub = tmp_path / "release.pub"
    pub.write_bytes(req.stdout)
    ok = _openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(art))
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()

    # The audit log, copied to the controller, verifies; it holds every step of this request.
    log = admin_ssh("cat /var/lib/signer/audit.jsonl", sudo=True)
    assert log.returncode == 0, log.stderr
    copy = tmp_path / "audit.jsonl"
    copy.write_text(log.stdout)
    verify = _audit_verify(copy, token_dir)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    entries = [json.loads(line) for line in log.stdout.splitlines()]
    events = [e["event"] for e in entries if e.get("request") == rid]
    assert events.count("queue") == 1
    assert {
        e.get("custodian") for e in entries if e.get("request") == rid and e["event"] == "approve"
    } == {"alice", "bob"}
    assert "sign" in events


@pytest.mark.control("SGN-05")
def test_editing_one_byte_of_the_audit_log_is_detected_at_its_sequence_number(
    admin_ssh, token_dir, tmp_path
):
    log = admin_ssh("cat /var/lib/signer/audit.jsonl", sudo=True)
    assert log.returncode == 0, log.stderr
    lines = log.stdout.splitlines(keepends=True)
    assert len(lines) >= 3, "the audit log is too short to tamper with"
    victim = len(lines) // 2
    entry = json.loads(lines[victim])
    # Change one digit of the timestamp: same length, still valid JSON.
    t = entry["time"]
    i = max(k for k, ch in enumerate(t) if ch.isdigit())
    forged = t[:i] + str((int(t[i]) + 1) % 10) + t[i + 1 :]
    lines[victim] = lines[victim].replace(f'"{t}"', f'"{forged}"', 1)
    assert lines[victim] != log.stdout.splitlines(keepends=True)[victim]
    copy = tmp_path / "audit.jsonl"
    copy.write_text("".join(lines))
    r = _audit_verify(copy, token_dir)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"first bad seq {entry['seq']}" in r.stdout + r.stderr


# -- budget ---------------------------------------------------------------------------------------


@pytest.mark.control("SGN-03")
def test_exceeding_the_budget_freezes_the_profile_until_a_custodian_thaws_it(build, custodian):
    # Start from a fresh window (thawing restarts it), so that the test can run again.
    custodian("alice", "thaw nightly")
    for n in range(3):  # the lab's nightly budget: 3 an hour
        r = build("sign --profile nightly --format raw", f"nightly {n}".encode())
        assert r.returncode == 0, f"signature {n + 1}: {r.stderr.decode()}"
    over = build("sign --profile nightly --format raw", b"one too many")
    assert over.returncode == EX_NOPERM
    assert over.stdout == b""
    still = build("sign --profile nightly --format raw", b"still frozen")
    assert still.returncode == EX_NOPERM
    assert build("sign --profile dev --format raw", b"other profile").returncode == 0
    thaw = custodian("alice", "thaw nightly")
    assert thaw.returncode == 0, thaw.stderr.decode()
    assert build("sign --profile nightly --format raw", b"after thaw").returncode == 0


@pytest.mark.control("SGN-01")
def test_a_custodian_cannot_sign_and_a_client_cannot_approve(build, custodian):
    c = custodian("alice", "sign --profile dev --format raw", b"artifact")
    assert c.returncode != 0
    assert c.stdout == b""
    b = build("thaw nightly")
    assert b.returncode != 0


# -- pin_source prompt: after a reboot the daemon is locked until a custodian unlocks it --------


def _deploy(lab: LabState, pin_source: str) -> None:
    from toolkit.runner.ansible_run import ROOT, ansible_env, build_command

    cmd = build_command("deploy.yml", extra_vars={"token_pin_source": pin_source})
    log = lab.state_dir / f"deploy-pin-{pin_source}.log"
    # stdin from /dev/null: ansible refuses the non-blocking stdin that pytest may leave.
    env = ansible_env(ANSIBLE_FORCE_COLOR="0")
    with log.open("w") as fh:
        rc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=1500,
        ).returncode
    assert rc == 0, f"deploy with pin_source={pin_source} failed; see {log}"


def _reboot(lab: LabState, admin_ssh) -> None:
    boot_id = admin_ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    assert boot_id
    subprocess.run(
        ["ssh", "-F", str(lab.ssh_config), "-O", "exit", lab.ssh_alias],
        capture_output=True,
        timeout=10,
    )
    try:
        admin_ssh("systemctl reboot", sudo=True, timeout=30)
    except subprocess.TimeoutExpired:
        pass  # the connection may hang while the VM goes down; the new boot id decides
    time.sleep(10)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            r = admin_ssh(
                "test -S /run/signer/signer.sock && cat /proc/sys/kernel/random/boot_id",
                sudo=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            continue  # still booting
        if r.returncode == 0 and r.stdout.strip() not in ("", boot_id):
            return  # a new boot, and the daemon listens (locked)
        time.sleep(5)
    pytest.fail("the VM did not come back with signerd within 600 s of the reboot")


@pytest.mark.control("TOK-03")
@pytest.mark.skipif(
    os.environ.get("SIGNLAB_E2E_REBOOT") != "1",
    reason="two deploys and a reboot (~25 min under TCG): set SIGNLAB_E2E_REBOOT=1",
)
def test_after_a_reboot_with_pin_prompt_signing_waits_for_a_custodian_unlock(
    build, custodian, lab, admin_ssh
):
    pin = (lab.state_dir / "token" / "signhost" / "user-pin").read_bytes()
    _deploy(lab, "prompt")
    try:
        assert admin_ssh("test ! -e /etc/signer/pin", sudo=True).returncode == 0
        _reboot(lab, admin_ssh)
        locked = build("sign --profile dev --format raw", b"while locked")
        assert locked.returncode == EX_UNAVAILABLE, locked.stderr.decode()
        assert locked.stdout == b""
        assert custodian("alice", "unlock", b"not-the-pin\n").returncode != 0
        assert build("sign --profile dev --format raw", b"x").returncode == EX_UNAVAILABLE
        unlocked = custodian("alice", "unlock", pin)
        assert unlocked.returncode == 0, unlocked.stderr.decode()
        ok = build("sign --profile dev --format raw", b"after unlock")
        assert ok.returncode == 0, ok.stderr.decode()
    finally:
        _deploy(lab, "file")


# -- the token's reader: pcscd answers the token owner only ------------------------------------


@pytest.fixture
def token_reader(lab: LabState, admin_ssh) -> Iterator[None]:
    """The token stand-in (QEMU's CCID reader) plugged in, on a lab whose pcscd is on."""
    if admin_ssh("systemctl is-active --quiet pcscd.socket").returncode != 0:
        pytest.skip("pcscd is off on this lab (token_pcscd false): deploy with token_pcscd=true")
    inst = Instance(lab.raw["instance"], lab.state_dir)
    already = "token" in usb.plugged(inst)
    if not already:
        usb.plug(inst, "token")
    try:
        yield
    finally:
        if not already:
            usb.unplug(inst, "token")


@pytest.mark.control("TOK-02")
def test_only_the_token_owner_sees_the_token_reader_through_pcscd(admin_ssh, token_reader):
    def readers(account: str) -> subprocess.CompletedProcess[str]:
        return admin_ssh(f"sudo -n -u {account} opensc-tool --list-readers")

    deadline = time.monotonic() + 120  # USBGuard allows it, then pcscd's hotplug picks it up
    owner = readers("signer")
    while "CCID" not in owner.stdout and time.monotonic() < deadline:
        time.sleep(3)
        owner = readers("signer")
    assert owner.returncode == 0, owner.stdout + owner.stderr
    assert "CCID" in owner.stdout, owner.stdout + owner.stderr
    for account in ("sign-build", "alice", "nobody"):
        other = readers(account)
        assert "CCID" not in other.stdout, f"{account}: {other.stdout}"
        assert other.returncode != 0 or "no smart card readers" in other.stdout.lower(), (
            f"{account}: {other.stdout}{other.stderr}"
        )
