"""The token role's initialisation, run for real on this machine (Ansible, SoftHSM2, OpenSC):
the PINs reach pkcs11-tool without appearing on any command line Ansible builds.

Ansible puts a task's `environment:` on the command line it runs (`/bin/sh -c 'VAR=... python3'`),
which sudo logs and auditd records on a host; with -vvvv it is printed too. The SO and user PINs
used to travel that way."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    token_backend: softhsm
    token_hardware_init: false
    token_pin_dir: {d}/pins
    token_pin_length: 32
    token_softhsm_conf: {d}/softhsm2.conf
    token_module: {module}
    token_label: signer
    token_owner: root
    token_pin_source: prompt
    token_pin_file: {d}/pin
  tasks:
    - ansible.builtin.include_role:
        name: token
        tasks_from: init
"""


@pytest.mark.skipif(not MODULE.exists() or not shutil.which("pkcs11-tool"),
                    reason="needs SoftHSM2 and OpenSC (scripts/bootstrap installs both)")
def test_token_init_passes_no_pin_on_a_command_line(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "softhsm2.conf").write_text(
        f"directories.tokendir = {tmp_path}/store/\nobjectstore.backend = file\n")
    (tmp_path / "play.yml").write_text(PLAY.format(d=tmp_path, module=MODULE))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROOT / "roles"))
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", "localhost,", "-vvvv",
         str(tmp_path / "play.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    so, user = ((tmp_path / "pins" / n).read_text().strip() for n in ("so-pin", "user-pin"))
    output = run.stdout + run.stderr
    assert so not in output and user not in output, "a PIN is on a command line Ansible ran"
    # ... and the token really was initialised with them: the user PIN logs in.
    login = subprocess.run(
        ["pkcs11-tool", "--module", str(MODULE), "--token-label", "signer", "--login",
         "--pin", user, "--list-objects"],
        env=dict(os.environ, SOFTHSM2_CONF=str(tmp_path / "softhsm2.conf")),
        capture_output=True, text=True, timeout=60)
    assert login.returncode == 0, login.stderr
