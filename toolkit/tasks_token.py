"""`invoke token.csr` and `invoke token.import-cert`: the release certificate's round trip.

The key never leaves the token: `token.csr` has the host make a PKCS#10 request signed by the
token key and brings it to the controller for the CA; `token.import-cert` takes the CA's answer
back, and the signer installs it only if it matches the token key. Both run the signer's own
`keys` commands as the daemon's user over the admin SSH connection of the target (the lab VM by
default, or any host reachable as `--host` with `--ssh-config`).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from lab import state

SIGNER = "/opt/signer/venv/bin/signer"
CONFIG = "/etc/signer/signer.toml"
SOFTHSM2_CONF = "/etc/signer/softhsm2.conf"
DAEMON_USER = "signer"
SERVICE = "signerd"
PEM_CSR = b"-----BEGIN CERTIFICATE REQUEST-----"
PEM_CERT = b"-----BEGIN CERTIFICATE-----"

_HELP = {
    "profile": "signing profile whose key the certificate is for (default: release)",
    "host": "SSH host (default: the lab VM's alias)",
    "ssh_config": "ssh_config file (default: the running lab's)",
}


def _target(host: str | None, ssh_config: str | None) -> tuple[list[str], Path | None]:
    """ssh argv prefix for the target, and the lab's token directory when it is the lab."""
    if host is None:
        lab = state.load()
        if lab is None:
            raise Exit(f"token: no running lab ({state.instance_name()}) and no --host", code=3)
        host, ssh_config = lab.ssh_alias, ssh_config or str(lab.ssh_config)
        local = lab.state_dir / "token" / lab.ssh_alias
    else:
        local = None
    return ["ssh", *(["-F", ssh_config] if ssh_config else []), host], local


def _as_daemon(*argv: str) -> str:
    env = f"SOFTHSM2_CONF={SOFTHSM2_CONF}"
    return "sudo -n -u " + DAEMON_USER + " env " + env + " " + shlex.join([SIGNER, *argv])


def _run(ssh: list[str], remote: str, data: bytes | None = None) -> bytes:
    proc = subprocess.run([*ssh, remote], input=data, capture_output=True, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        raise Exit(f"token: on the host: {last} (exit {proc.returncode})",
                   code=proc.returncode or 1)
    return proc.stdout


@task(help=_HELP | {"out": "CSR file (default: <lab state>/token/<host>/PROFILE-request.csr)",
                    "subject": "subject of the request, e.g. 'CN=Example release signing'"})
def csr(c: Context, profile: str = "release", out: str | None = None, subject: str | None = None,
        host: str | None = None, ssh_config: str | None = None) -> None:
    """Fetch a CSR for PROFILE's token key to the controller (for the CA)."""
    ssh, local = _target(host, ssh_config)
    argv = ["keys", "csr", "--config", CONFIG, "--profile", profile]
    if subject:
        argv += ["--subject", subject]
    pem = _run(ssh, _as_daemon(*argv))
    if not pem.startswith(PEM_CSR):
        raise Exit("token: the host did not answer with a PEM certificate request", code=1)
    # Not <profile>.csr: that is the deploy's own copy (a fresh CSR has a fresh signature).
    name = f"{profile}-request.csr"
    dest = Path(out) if out else (local / name if local else Path(name))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(pem)
    print(f"token: CSR for profile {profile!r} written to {dest}")


@task(positional=["cert"], help=_HELP | {"cert": "PEM certificate issued by the CA for the CSR"})
def import_cert(c: Context, cert: str, profile: str = "release", host: str | None = None,
                ssh_config: str | None = None) -> None:
    """Install the CA's certificate for PROFILE (checked against the token key), restart signerd."""
    pem = Path(cert).read_bytes()
    if not pem.lstrip().startswith(PEM_CERT):
        raise Exit(f"token: {cert} is not a PEM certificate", code=2)
    ssh, _ = _target(host, ssh_config)
    tmp = f"/run/signer-import-{profile}.pem"
    # The daemon's user must read it; /run is tmpfs and root-owned, the file is removed after.
    install = _as_daemon("keys", "import-cert", "--config", CONFIG, "--profile", profile, tmp)
    script = (f"sudo -n install -o {DAEMON_USER} -g {DAEMON_USER} -m 0400 /dev/stdin {tmp} && "
              f"{{ {install};"
              f" rc=$?; sudo -n rm -f {tmp}; [ $rc -eq 0 ] || exit $rc; }} && "
              f"sudo -n systemctl restart {SERVICE}")
    out = _run(ssh, script, pem)
    print(out.decode(errors="replace").strip() or f"token: certificate installed for {profile!r}")


ns = Collection("token")
ns.add_task(csr)
ns.add_task(import_cert, name="import-cert")
