"""An apt repository signed through the signing host, end to end: a .deb built here with
dpkg-deb, its Release made with apt-ftparchive, `signer submit --format openpgp-cleartext`
from the build host's network namespace over SSH to the lab VM (the deployed role, the real
forced command, the sandboxed daemon), and apt on the VM as the client: with its own Dir::
settings (the VM's apt sources and keyrings untouched) and `signed-by=` naming only the
certificate the deploy exported (`signer keys openpgp`, fetched to the controller), it runs
`apt-get update` and installs the package; a tampered InRelease is refused. gpgv and sqv on
the controller judge the same files (and a detached, armoured signature of the .deb).

The profile and the client come from the inventory under test (inventory/lab, or the site
inventory, which renders the example's archive profile): an openpgp-cleartext profile without
approvals, found by its formats, not its name. Needs `invoke deploy` on the lab.
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lab.state import LabState
from lab.target import Party, Target
from signer.formats import openpgp
from tests.signer.test_openpgp import gpgv, make_repository, split_cleartext, sqv

if TYPE_CHECKING:
    from tests.lab.conftest import AdminSsh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SIGNER = [sys.executable, "-m", "signer"]
REMOTE = "/var/tmp/signlab-openpgp-e2e"  # the apt client's own directory on the VM

# apt on the VM, reading and writing only under REMOTE except dpkg's own database (install):
# sources, keyrings, lists, cache and logs of its own; the source trusts one certificate.
APT_OPTIONS = [
    f"Dir::Etc={REMOTE}/etc", "Dir::Etc::sourcelist=/dev/null",
    f"Dir::Etc::sourceparts={REMOTE}/etc/sources.list.d",
    f"Dir::Etc::trusted={REMOTE}/etc/none.gpg",
    f"Dir::Etc::trustedparts={REMOTE}/etc/trusted.gpg.d",
    f"Dir::State={REMOTE}/state", f"Dir::Cache={REMOTE}/cache", f"Dir::Log={REMOTE}/log",
    "DPkg::Lock::Timeout=300",  # unattended-upgrades may hold dpkg's lock for a while
]


@dataclass(frozen=True)
class Setup:
    profile: str
    client: Party
    gateway: str
    cert: Path  # the certificate the deploy exported
    values: dict[str, Any]


@pytest.fixture(scope="module")
def setup(target: Target) -> Setup:
    profiles = [p for p in target.profiles
                if "openpgp-cleartext" in (p.get("formats") or []) and not p.get("approvals")]
    if not profiles:
        pytest.skip(f"{target.inventory}: no openpgp-cleartext profile without approvals")
    p = profiles[0]
    clients = [c for c in target.clients if target.allowed(p, c)]
    if not clients:
        pytest.skip(f"{target.inventory}: no client of {p['name']} whose key the lab holds")
    cert = target.token_dir / f"{p['name']}.pgp"
    assert cert.exists(), f"{cert} is missing: run `invoke deploy` on this lab first"
    return Setup(profile=p["name"], client=clients[0], gateway=target.account(clients[0]),
                 cert=cert, values=target.values)


def _ssh_cmd(lab: LabState, key: Path) -> str:
    return shlex.join([
        "ssh", "-o", f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}", "-o",
        "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o",
        "ConnectTimeout=15", "-o", "LogLevel=ERROR", "-i", str(key)])


@pytest.fixture(scope="module")
def submit(lab: LabState, setup: Setup) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """`signer submit` on the build server: its namespace, its key, the VM's lab address."""

    def run(artifact: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["ip", "netns", "exec", lab.host(str(setup.client.netns_host)).netns, *SIGNER,
                "submit", "--host", f"{setup.gateway}@{lab.vm_ipv4}", "--ssh",
                _ssh_cmd(lab, setup.client.key), "--profile", setup.profile, *args,
                str(artifact)]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=300)

    return run


def _ship(admin_ssh: AdminSsh, files: dict[str, Path]) -> None:
    """Copy small files to REMOTE on the VM (a base64 tarball in the command: no scp needed
    through the admin's forced path, and the sudo password stays on stdin)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, path in files.items():
            tar.add(path, arcname=name)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    r = admin_ssh(f"rm -rf {REMOTE} && mkdir -p {REMOTE} && cd {REMOTE} && "
                  f"echo {b64} | base64 -d | tar -xz --no-same-owner && chmod -R a+rX {REMOTE}",
                  sudo=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _apt(admin_ssh: AdminSsh, *command: str, timeout: float = 600
         ) -> subprocess.CompletedProcess[str]:
    """apt with APT_CONFIG naming our apt.conf, which moves Dir::Etc before apt reads its
    parts: none of the host's apt.conf.d (its hooks, its proxies) applies to this client."""
    opts = " ".join(f"-o {shlex.quote(o)}" for o in APT_OPTIONS)
    return admin_ssh(f"APT_CONFIG={REMOTE}/apt.conf {shlex.join(command)} {opts}", sudo=True,
                     timeout=timeout)


@pytest.mark.control("SGN-11")
def test_apt_on_the_host_installs_a_package_from_a_repository_signed_through_the_signer(
        submit: Callable[..., subprocess.CompletedProcess[bytes]], setup: Setup,
        admin_ssh: AdminSsh, tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    release = repo / "dists/example/Release"
    r = submit(release, "--format", "openpgp-cleartext")
    assert r.returncode == 0, r.stderr.decode()
    inrelease = repo / "dists/example/InRelease"
    # the outside judges on the controller, with the exported certificate
    v = gpgv(setup.cert, inrelease)
    assert v.returncode == 0, v.stderr
    message, signature = split_cleartext(inrelease)
    assert sqv(setup.cert, signature, message).returncode == 0
    message.unlink()
    signature.unlink()
    deb = repo / "pool/main/signer-hello_1.0_all.deb"
    r = submit(deb, "--format", "openpgp", "--armor", "--out", str(tmp_path / "hello.deb.asc"))
    assert r.returncode == 0, r.stderr.decode()
    assert gpgv(setup.cert, tmp_path / "hello.deb.asc", deb).returncode == 0
    assert sqv(setup.cert, tmp_path / "hello.deb.asc", deb).returncode == 0

    sources = tmp_path / "example.sources"
    sources.write_text(f"Types: deb\nURIs: file:{REMOTE}/repo\nSuites: example\n"
                       f"Components: main\nSigned-By: {REMOTE}/archive.pgp\n")
    apt_conf = tmp_path / "apt.conf"
    apt_conf.write_text(f'Dir::Etc "{REMOTE}/etc/";\n')
    _ship(admin_ssh, {"repo": repo, "archive.pgp": setup.cert, "apt.conf": apt_conf,
                      "etc/sources.list.d/example.sources": sources})
    r0 = admin_ssh(f"mkdir -p {REMOTE}/etc/trusted.gpg.d {REMOTE}/etc/apt.conf.d "
                   f"{REMOTE}/etc/preferences.d {REMOTE}/state/lists/partial "
                   f"{REMOTE}/cache/archives/partial {REMOTE}/log", sudo=True)
    assert r0.returncode == 0, r0.stderr
    try:
        up = _apt(admin_ssh, "apt-get", "update")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "W:" not in up.stderr and "E:" not in up.stderr, up.stderr
        inst = _apt(admin_ssh, "apt-get", "install", "-y", "--no-install-recommends",
                    "signer-hello")
        assert inst.returncode == 0, inst.stdout + inst.stderr
        hello = admin_ssh("cat /usr/share/signer-hello/hello.txt")
        assert hello.stdout == "hello from the signing host\n", hello.stderr
        # One changed byte in the signed text: apt refuses the repository
        bad = admin_ssh(f"sed -i 's/^Suite: example$/Suite: exampld/' "
                        f"{REMOTE}/repo/dists/example/InRelease && rm -rf "
                        f"{REMOTE}/state/lists && mkdir -p {REMOTE}/state/lists/partial",
                        sudo=True)
        assert bad.returncode == 0, bad.stderr
        up = _apt(admin_ssh, "apt-get", "update")
        assert up.returncode != 0, up.stdout + up.stderr
        out = up.stdout + up.stderr
        assert "not signed" in out or "BADSIG" in out or "Bad signature" in out, out
    finally:
        admin_ssh(f"dpkg -P signer-hello; rm -rf {REMOTE}", sudo=True, timeout=300)

    log = admin_ssh(f"cat {shlex.quote(setup.values['signer_audit_log'])}", sudo=True)
    assert log.returncode == 0, log.stderr
    signs = [e for e in map(json.loads, filter(None, log.stdout.splitlines()))
             if e["event"] == "sign" and e.get("profile") == setup.profile]
    formats = {e["format"]: e for e in signs[-2:]}
    assert set(formats) == {"openpgp", "openpgp-cleartext"}
    entry = formats["openpgp-cleartext"]
    assert entry["size"] == release.stat().st_size
    assert openpgp.Request.parse(entry["openpgp"]).sig_type == "text"
