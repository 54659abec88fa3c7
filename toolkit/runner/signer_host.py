"""The release certificate's round trip on one signing host (`invoke token.csr`,
`invoke token.import-cert`: toolkit/tasks/token.py).

The key never leaves the token: `token.csr` has the host make a PKCS#10 request signed by the
token key and brings it to the controller for the CA; `token.import-cert` takes the CA's answer
back, and the signer installs it only if it matches the token key. Both run the signer's own
`keys` commands as the daemon's user, through Ansible (ad-hoc, become), so they reach the host
exactly as the plays do (user, key, jump host, sudo password) and take their paths from the
host's inventory values, not from constants.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit

from hostaccess import hostvars
from hostaccess.connection import become_password
from toolkit import exitcodes
from toolkit.runner.ansible_run import (
    ROOT,
    ansible_env,
    secret_args,
    secret_fd,
    venv_exe,
)
from toolkit.runner.inventory_check import checked
from toolkit.runner.playbook import require_lab_if_default

PEM_CSR = b"-----BEGIN CERTIFICATE REQUEST-----"
PEM_CERT = b"-----BEGIN CERTIFICATE-----"

class SignerHost:
    """The one host, its signer paths (from the inventory), and how to run a command on it."""

    def __init__(self, name: str, inventory: str | None, limit: str | None,
                 ask_become_pass: bool, vault_password_file: str | None) -> None:
        self.name = name
        require_lab_if_default(inventory)
        result = checked(name, inventory, limit, vault_password_file)
        if len(result.hosts) != 1:
            raise Exit(f"{name}: --limit must select one host; the inventory selects "
                       f"{', '.join(result.hosts)}", code=exitcodes.BAD_INPUT)
        self.host = result.hosts[0]
        self.inventory = result.inventory
        self.vault_password_file = vault_password_file
        inv = hostvars.load(self.inventory, self.host, vault_password_file=vault_password_file)
        try:
            self.vars = {n: inv.get(self.host, n) for n in (
                "signer_daemon_user", "signer_venv", "signer_config", "signer_softhsm_conf",
                "signer_service", "signer_controller_dir", "signer_cert_dir", "base_aide")}
        except hostvars.InventoryError as exc:
            raise Exit(f"{name}: {exc}", code=exitcodes.BAD_INPUT) from None
        self.become_pass = become_password(ask_become_pass)

    def as_daemon(self, *argv: str) -> list[str]:
        env = [f"SOFTHSM2_CONF={c}"] if (c := str(self.vars["signer_softhsm_conf"]).strip()) else []
        signer = f"{self.vars['signer_venv']}/bin/signer"
        return ["runuser", "-u", str(self.vars["signer_daemon_user"]), "--", "env", *env, signer,
                *argv, "--config", str(self.vars["signer_config"])]

    def run(self, argv: list[str], stdin: str | None = None) -> str:
        """argv as root on the host (Ansible's command module); its stdout, or a one-line exit."""
        args: dict[str, Any] = {"argv": argv}
        if stdin is not None:
            args["stdin"] = stdin
        # The result as JSON from Ansible's own `tree` callback (the one in ansible-core).
        with tempfile.TemporaryDirectory(prefix="token-") as tree, \
                secret_fd(self.become_pass) as fd:
            cmd = [venv_exe("ansible"), self.host, "-i", self.inventory, "-b", "--tree", tree,
                   "-m", "ansible.builtin.command", "-a", json.dumps(args)]
            proc = subprocess.run(
                cmd + secret_args(fd, self.vault_password_file), cwd=ROOT, env=ansible_env(),
                capture_output=True, text=True, timeout=600,
                stdin=subprocess.DEVNULL if fd is None else fd)
            out = Path(tree) / self.host
            text = out.read_text() if out.exists() else ""
        try:
            res = json.loads(text)
        except ValueError:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise Exit(f"{self.name}: ansible: {last} (exit {proc.returncode})",
                       code=exitcodes.FAILED) from None
        if res.get("unreachable"):
            raise Exit(f"{self.name}: {self.host}: unreachable: "
                       f"{' '.join(str(res.get('msg', '')).split())[:300]}",
                       code=exitcodes.UNREACHABLE)
        if res.get("failed") or res.get("rc", 0) != 0:
            why = (str(res.get("stderr") or res.get("msg") or "(no output)").strip()
                   .splitlines() or ["(no output)"])[-1]
            raise Exit(f"{self.name}: on {self.host}: {why} (exit {res.get('rc', '?')})",
                       code=exitcodes.FAILED)
        return str(res.get("stdout", ""))


def fetch_csr(t: SignerHost, profile: str, subject: str | None, out: str | None) -> Path:
    """A CSR for PROFILE's token key, made on the host, written on the controller; its path."""
    argv = ["keys", "csr", "--profile", profile, *(["--subject", subject] if subject else [])]
    pem = (t.run(t.as_daemon(*argv)).strip() + "\n").encode()
    if not pem.startswith(PEM_CSR):
        raise Exit(f"{t.name}: the host did not answer with a PEM certificate request",
                   code=exitcodes.FAILED)
    # Not <profile>.csr: that is the deploy's own copy (a fresh CSR has a fresh signature).
    name = f"{profile}-request.csr"
    where = str(t.vars["signer_controller_dir"] or "").strip()
    dest = Path(out) if out else (Path(where) / name if where else Path(name))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(pem)
    except OSError as exc:
        raise Exit(f"{t.name}: cannot write {dest}: {exc.strerror}",
                   code=exitcodes.BAD_INPUT) from None
    return dest


def import_cert(t: SignerHost, certs: dict[str, bytes]) -> str:
    """Install each PEM of CERTS (profile -> certificate; the signer checks each against its
    profile's token key), in order, then restart the daemon once; what the host said.

    One round for several profiles: one Ansible run, one AIDE comparison and update of the
    certificate directory, one restart (each restart drops the signatures in flight). The
    first certificate that does not match its key stops the round with the daemon not
    restarted; the ones before it are installed, and taken into the AIDE baseline, since the
    toolkit made that change (BASE-07)."""
    user = str(t.vars["signer_daemon_user"])
    steps, tmps = [], []
    for profile, pem in certs.items():
        tmp = f"/run/signer-import-{profile}.pem"
        tmps.append(tmp)
        install = shlex.join(t.as_daemon("keys", "import-cert", "--profile", profile, tmp))
        # The daemon's user must read it; /run is tmpfs and root-owned, the file is removed
        # after. A certificate is public: it may travel in the command.
        text = shlex.quote(pem.decode("ascii", errors="replace"))
        steps.append(f"printf '%s' {text} | install -o {shlex.quote(user)} -g {shlex.quote(user)}"
                     f" -m 0400 /dev/stdin {tmp} && {install}")
    script = f"{{ {' && '.join(steps)}; }}; rc=$?; rm -f {' '.join(tmps)};"
    if t.vars["base_aide"]:
        script = _aide_guarded(script, str(t.vars["signer_cert_dir"]))
    script += (f" [ $rc -eq 0 ] || exit $rc;"
               f" systemctl restart {shlex.quote(str(t.vars['signer_service']))}")
    return t.run(["sh", "-c", script])


def _aide_guarded(script: str, cert_dir: str) -> str:
    """SCRIPT, which changes CERT_DIR and leaves its status in $rc, as an authorised change
    through the toolkit (BASE-07): the certificate directory is first compared with the AIDE
    baseline (a difference there was made by someone else: refused, nothing installed), then
    what SCRIPT installed, even when it stopped half way, is taken into it, so the next
    `invoke deploy` does not stop on it (roles/base/tasks/aide_deployed_compare.yml)."""
    helper = "/usr/local/sbin/signhost-aide-baseline"
    limit = shlex.quote(f"^({re.escape(cert_dir)})(/|$)")
    return (f"rc=0; before=$({helper} compare {limit}) || rc=$?;"
            f" if [ $rc -eq 1 ]; then echo \"BASE-07: refused, nothing installed: these paths"
            f" differ from the AIDE baseline and were not changed through the toolkit:"
            f" $(echo $before); accept them first with"
            f" invoke deploy --accept-aide-changes\" >&2; exit 1; fi;"
            f" [ $rc -eq 0 ] || exit $rc;"
            f" {script} {helper} take {limit} || exit $?;")
