"""toolkit.assurance.lab_coupling: the static check that keeps the lab out of roles, playbooks and the
posture suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit import pipeline
from toolkit.assurance import lab_coupling

SCOPE = ("roles", "playbooks", "tests/posture", "hostaccess/expectations.py")


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


CLEAN = {
    "roles/token/defaults/main.yml": "token_pin_dir: \"{{ lookup('env', 'HOME') }}/x\"\n",
    "playbooks/deploy.yml": "- hosts: signing_hosts\n  roles: [token]\n",
    "tests/posture/test_x.py": '"""Skipped in the lab: waived. See tests/lab/test_usb.py and inventory/lab."""\n'
                               "def test_x(expected):\n    assert expected['token_backend']\n",
    "hostaccess/expectations.py": "NAMES = ('verify_kind',)  # the lab. Then production\n",
}


def test_the_repository_has_no_lab_coupling() -> None:
    assert lab_coupling.findings() == []


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    assert lab_coupling.findings(_tree(tmp_path, CLEAN), SCOPE) == []


@pytest.mark.parametrize(
    ("rel", "line", "what"),
    [
        ("roles/token/defaults/main.yml", 'token_pin_dir: "{{ signlab_state_dir }}/token"', "lab's name"),
        ("roles/usb/templates/rules.j2", "allow id {{ lab.usb.token.vendor }}", "lab variable"),
        ("playbooks/deploy.yml", "    x: \"{{ lab['vm'] }}\"", "lab variable"),
        ("tests/posture/conftest.py", "from lab import state", "import of the lab package"),
        ("tests/posture/conftest.py", "import lab.state", "import of the lab package"),
        ("tests/posture/test_ssh.py", "    return lab.ssh_alias", "lab variable"),
        ("tests/posture/test_ssh.py", '    env = os.environ["SIGNLAB_INSTANCE"]', "lab's name"),
        ("tests/posture/test_usb.py", '    assert name == "lab0"', "lab instance name"),
        ("hostaccess/expectations.py", "STATE = '/var/lib/signlab'", "lab's name"),
    ],
)
def test_a_planted_coupling_is_named_with_file_and_line(tmp_path: Path, rel: str, line: str,
                                                        what: str) -> None:
    files = dict(CLEAN)
    files[rel] = files.get(rel, "") + "# fine\n" + line + "\n"
    found = lab_coupling.findings(_tree(tmp_path, files), SCOPE)
    number = files[rel].splitlines().index(line) + 1
    assert len(found) == 1, found
    assert found[0].startswith(f"{rel}:{number}: ") and what in found[0], found


def test_the_lab_itself_is_out_of_scope(tmp_path: Path) -> None:
    files = dict(CLEAN, **{"inventory/lab/group_vars/all/lab.yml": "signlab_state_dir: x\n",
                           "tests/lab/test_usb.py": "from lab import usb\n",
                           "lab/state.py": "x = lab.raw\n"})
    assert lab_coupling.findings(_tree(tmp_path, files), SCOPE) == []


def test_main_exits_1_and_prints_each_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path, dict(CLEAN, **{"playbooks/x.yml": "a: '{{ signlab_state_dir }}'\n"}))
    monkeypatch.setattr(lab_coupling, "ROOT", root)
    assert lab_coupling.main([]) == 1
    out = capsys.readouterr()
    assert out.out.startswith("playbooks/x.yml:1: ")
    assert "1 finding(s)" in out.err


def test_the_static_stage_runs_the_check() -> None:
    stages = {s.name: s for s in pipeline.static_stages()}
    stage = stages["no lab coupling"]
    assert stage.argv[1:] == ["-m", "toolkit.assurance.lab_coupling"]


def test_the_token_pin_dir_defaults_to_the_operators_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A production-style inventory that sets no token_pin_dir gets one under the invoking
    user's state directory (it used to need the lab's signlab_state_dir)."""
    from hostaccess import hostvars

    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "hosts.yml").write_text("all:\n  hosts:\n    sign01: {}\n")
    loaded = hostvars.load(str(inv))
    assert loaded.get("sign01", "token_pin_dir") == (
        f"{tmp_path}/home/.local/state/signhost/token/sign01")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    again = hostvars.load(str(inv))
    assert again.get("sign01", "token_pin_dir") == f"{tmp_path}/state/signhost/token/sign01"
