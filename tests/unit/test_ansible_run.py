"""Reading Ansible's recap: the pipeline gates idempotence on these numbers."""

from __future__ import annotations

import json

from toolkit.runner.ansible_run import PlayOptions, build_command, parse_recap

RECAP = """
TASK [ssh : Render sshd_config] ***
ok: [signhost]

PLAY RECAP *********************************************************************
signhost                   : ok=41   changed=3    unreachable=0    failed=0    skipped=2    rescued=0    ignored=0
other                      : ok=1    changed=0    unreachable=1    failed=0    skipped=0    rescued=0    ignored=0
"""


def test_recap_counts_are_read_per_host() -> None:
    recap = parse_recap(RECAP)
    assert [(r.host, r.ok, r.changed, r.unreachable) for r in recap] == [
        ("signhost", 41, 3, 0), ("other", 1, 0, 1)]


def test_only_the_last_recap_counts() -> None:
    two = RECAP + RECAP.replace("changed=3", "changed=0")
    assert [r.changed for r in parse_recap(two)] == [0, 0]


def test_no_recap_means_no_hosts() -> None:
    assert parse_recap("ERROR! the playbook could not be found") == ()


def test_command_carries_the_operator_options() -> None:
    cmd = build_command("harden.yml", PlayOptions(inventory="inv", limit="h1", check=True,
                                                  diff=True, tags="ssh", skip_tags="usb",
                                                  verbose=2))
    assert cmd[1].endswith("playbooks/harden.yml")
    for part in (["-i", "inv"], ["--limit", "h1"], ["--tags", "ssh"], ["--skip-tags", "usb"]):
        i = cmd.index(part[0])
        assert cmd[i:i + 2] == part
    assert "--check" in cmd and "--diff" in cmd and "-vv" in cmd


def test_a_list_extra_var_reaches_ansible_as_a_list() -> None:
    # `k=v` would hand the role the string "['/etc/signer']"; JSON keeps the list a list.
    cmd = build_command("deploy.yml", PlayOptions(
        extra_vars={"base_aide_accept_changes": ["/etc/signer", "/x y"], "plain": "v"}))
    i = cmd.index("-e")
    assert json.loads(cmd[i + 1]) == {"base_aide_accept_changes": ["/etc/signer", "/x y"]}
    assert cmd[i + 2:i + 4] == ["-e", "plain=v"]
