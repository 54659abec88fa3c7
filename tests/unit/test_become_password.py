"""The sudo password reaches Ansible, and nothing on the way can read it from argv or environ.

Real Ansible, real play (connection local): a become plugin of the test's own asks for the
password at a prompt, as sudo would, and the command it wraps records what Ansible answered,
plus the argv and environment of every process between it and the controller.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import pytest

from hostaccess import connection
from toolkit.runner import ansible_run

PASSWORD = "pw-Zq8-only-through-a-pipe"

PLUGIN = '''
from __future__ import annotations
import shlex
from ansible.plugins.become import BecomeBase

DOCUMENTATION = """
    name: pwcheck
    short_description: asks for a password like sudo does, records the answer
    description: test only
    author: test
    options:
        become_pass:
            description: the password
            required: False
            vars:
              - name: ansible_become_password
              - name: ansible_become_pass
"""


class BecomeModule(BecomeBase):
    name = "pwcheck"
    prompt = "PWCHECK-Password:"

    def build_become_command(self, cmd, shell):
        super().build_become_command(cmd, shell)
        if not cmd:
            return cmd
        record = (
            "printf %s PWCHECK-Password: >&2; printf %s PWCHECK-Password:; read -r pw; "
            "printf %s \\"$pw\\" > {got}; "
            "p=$$; while [ \\"$p\\" -gt 1 ]; do "
            "tr '\\\\0' ' ' < /proc/$p/cmdline; echo; tr '\\\\0' '\\\\n' < /proc/$p/environ; "
            "p=$(awk '/^PPid/ {{print $2}}' /proc/$p/status); done > {procs}; "
        )
        return "sh -c " + shlex.quote(record + self._build_success_command(cmd, shell))
'''


def _setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, list[str]]:
    got, procs = tmp_path / "got", tmp_path / "procs"
    plugins = tmp_path / "become"
    plugins.mkdir()
    (plugins / "pwcheck.py").write_text(PLUGIN.format(got=got, procs=procs))
    monkeypatch.setenv("ANSIBLE_BECOME_PLUGINS", str(plugins))
    # This proves the toolkit -> Ansible leg (the pipe). A become plugin of the test's own runs
    # only under Ansible's own executor: Mitogen (ansible.cfg's strategy) speaks sudo, su and
    # doas itself and skips a become to the user it already is.
    monkeypatch.setenv("ANSIBLE_STRATEGY", "linear")
    inv = tmp_path / "hosts.yml"
    inv.write_text(
        "all:\n  children:\n    signing_hosts:\n      hosts:\n        localhost:\n"
        "          ansible_connection: local\n"
        f"          ansible_python_interpreter: {sys.executable}\n"
        "          ansible_become: true\n"
        "          ansible_become_method: pwcheck\n"
    )
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: A task that needs become\n      ansible.builtin.command: 'true'\n"
    )
    cmd = ansible_run.build_command(str(play), ansible_run.PlayOptions(inventory=str(inv)))
    return got, procs, cmd


def test_become_password_reaches_ansible_through_a_pipe_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, procs, cmd = _setup(tmp_path, monkeypatch)
    result = ansible_run.run_playbook(cmd, tmp_path / "run.log", become_pass=PASSWORD)
    assert result.returncode == 0, (tmp_path / "run.log").read_text()[-2000:]
    assert got.read_text() == PASSWORD  # Ansible answered the prompt with it
    seen = procs.read_text()
    assert "ansible-playbook" in seen and "--become-password-file -" in seen
    assert PASSWORD not in seen  # no argv, no environment of any process on the way
    assert PASSWORD not in (tmp_path / "run.log").read_text()


def test_without_the_password_the_prompt_gets_an_empty_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the password above came from the pipe, not from something else."""
    got, _, cmd = _setup(tmp_path, monkeypatch)
    ansible_run.run_playbook(cmd, tmp_path / "run.log")
    assert got.read_text() == ""


def test_become_password_is_asked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(connection, "_BECOME_PASSWORD", [])

    def typed(prompt: str) -> str:
        asked.append(prompt)
        return "s3cret"

    monkeypatch.setattr(getpass, "getpass", typed)
    assert connection.become_password(False) is None
    assert connection.become_password(True) == "s3cret"
    assert connection.become_password(True) == "s3cret"
    assert len(asked) == 1


def _vault(tmp_path: Path, secret: str) -> tuple[Path, str]:
    """A vault password file and `secret` encrypted with it (ansible-vault itself)."""
    import subprocess

    vpf = tmp_path / "vault-pass"
    vpf.write_text("vault-pw-for-the-test\n")
    vpf.chmod(0o600)
    proc = subprocess.run(
        [ansible_run.venv_exe("ansible-vault"), "encrypt_string", "--vault-password-file",
         str(vpf), "--name", "ansible_become_password", "--", secret],
        capture_output=True, text=True, check=True)
    return vpf, proc.stdout


def test_a_vaulted_become_password_reaches_ansible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, procs, _ = _setup(tmp_path, monkeypatch)
    vpf, vaulted = _vault(tmp_path, PASSWORD)
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "localhost.yml").write_text(vaulted)
    cmd = ansible_run.build_command(str(tmp_path / "play.yml"), ansible_run.PlayOptions(
        inventory=str(tmp_path / "hosts.yml"), vault_password_file=str(vpf)))
    result = ansible_run.run_playbook(cmd, tmp_path / "run.log")
    assert result.returncode == 0, (tmp_path / "run.log").read_text()[-2000:]
    assert got.read_text() == PASSWORD
    assert PASSWORD not in procs.read_text()


def test_host_become_password_reads_the_vault_or_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hostaccess import hostvars

    vpf, vaulted = _vault(tmp_path, PASSWORD)
    (tmp_path / "hosts.yml").write_text("all:\n  hosts:\n    h1: {}\n    h2: {}\n")
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "h1.yml").write_text(vaulted)
    inv = hostvars.load(str(tmp_path / "hosts.yml"), vault_password_file=str(vpf))
    monkeypatch.setattr(connection, "_BECOME_PASSWORD", [])
    assert connection.host_become_password(inv, "h1", ask=False) == PASSWORD
    assert connection.host_become_password(inv, "h2", ask=False) is None
    monkeypatch.setattr(getpass, "getpass", lambda p: "typed")
    # Ansible's precedence: the inventory's password wins over the typed one.
    assert connection.host_become_password(inv, "h1", ask=True) == PASSWORD
    assert connection.host_become_password(inv, "h2", ask=True) == "typed"


def test_the_inventorys_become_password_wins_over_the_typed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Ansible does; host_become_password follows it so verify's channel agrees."""
    got, _, cmd = _setup(tmp_path, monkeypatch)
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "localhost.yml").write_text(
        "ansible_become_password: from-inventory\n")
    ansible_run.run_playbook(cmd, tmp_path / "run.log", become_pass="typed")
    assert got.read_text() == "from-inventory"


def test_deploys_ad_hoc_daemon_check_gets_the_password_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`deploy --expect-unchanged` reads the daemon's invocation id with an ad-hoc `ansible`
    call as root: the typed password reaches that one through the same pipe."""
    from invoke.exceptions import Exit

    from toolkit.runner import playbook

    got, procs, _ = _setup(tmp_path, monkeypatch)
    try:
        playbook.daemon_invocations(str(tmp_path / "hosts.yml"), None,
                                    become_pass=PASSWORD)
    except Exit:
        pass  # no signer daemon on this machine: only the way the password went matters here
    assert got.read_text() == PASSWORD
    seen = procs.read_text()
    assert "bin/ansible signing_hosts" in seen and "--become-password-file -" in seen
    assert PASSWORD not in seen
