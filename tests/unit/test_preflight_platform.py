"""Preflight's platform check (roles/preflight/tasks/platform.yml), run for real by Ansible
against this machine (connection local): its facts are read, the release the roles choose from
is kept, and a release outside the supported list stops the run with what was found named.

This controller is Debian 12 or 13 on amd64; "unsupported" is made by narrowing
preflight_supported_releases to a release it is not, so the refusal path runs on real facts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: The platform check
      ansible.builtin.include_role:
        name: preflight
        tasks_from: platform
    - name: Keep what the roles choose from
      ansible.builtin.copy:
        content: "{{ preflight_platform | to_json }}"
        dest: "{{ platform_out }}"
        mode: "0600"
"""


def _os_release() -> dict[str, str]:
    out = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        k, _, v = line.partition("=")
        out[k] = v.strip('"')
    return out


def _run(tmp_path: Path, supported: list[str]) -> subprocess.CompletedProcess[str]:
    book = tmp_path / "platform.yml"
    book.write_text(PLAYBOOK)
    extra = json.dumps({"preflight_supported_releases": supported,
                        "platform_out": str(tmp_path / "platform.json")})
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROOT / "roles"))
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", "-e", extra, str(book)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def release() -> str:
    info = _os_release()
    if info.get("ID") != "debian":
        pytest.skip("the controller is not Debian: its facts would not say which release is real")
    return info["VERSION_ID"].split(".")[0]


def test_a_supported_release_passes_and_its_facts_are_kept(tmp_path: Path, release: str) -> None:
    r = _run(tmp_path, ["12", "13"])
    assert r.returncode == 0, r.stdout[-3000:]
    facts = json.loads((tmp_path / "platform.json").read_text())
    assert facts["distribution"] == "Debian" and facts["release"] == release
    assert facts["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert facts["architecture"] == "x86_64"


def test_another_release_is_refused_before_any_change_with_what_was_found(
        tmp_path: Path, release: str) -> None:
    other = "13" if release == "12" else "12"
    r = _run(tmp_path, [other])
    assert r.returncode != 0
    assert "refusing to apply" in r.stdout
    assert f"runs Debian {release} (" in r.stdout and "x86_64" in r.stdout
    assert f"supports Debian {other} on amd64" in r.stdout
    assert not (tmp_path / "platform.json").exists()  # the run stopped at the check
