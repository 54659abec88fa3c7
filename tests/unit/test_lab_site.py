"""lab/site.py: the jump host (a real sshd in a real namespace) and production.example rendered
into the inventory the site-mode lab is driven with (no VM needed for either)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hostaccess import hostvars
from lab import lifecycle, net, site
from lab.config import Instance

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inst(tmp_path: Path) -> Instance:
    i = Instance("lab8", tmp_path / "lab8")
    lifecycle.write_runtime_files(i)
    return i


def facts(inst: Instance) -> dict[str, Any]:
    """What lab.up records in lab.json (lab/config.py), for an instance that is not running."""
    loaded: dict[str, Any] = json.loads(json.dumps(inst.facts(accel="tcg", pid=0)))
    return loaded


def test_the_example_is_rendered_with_only_addresses_keys_and_the_back_end(
    inst: Instance,
) -> None:
    (site.site_dir(inst) / "jump").mkdir(parents=True)
    lifecycle._keygen(site.site_dir(inst) / "jump" / "ssh_host_ed25519_key", "jump")
    for name in ("site-admin", "jump"):
        lifecycle._keygen(inst.keys_dir / name, name)
    lab = facts(inst)
    info = site.render(inst, lab)
    inv = hostvars.load(info["inventory"])
    example = hostvars.load(str(site.EXAMPLE))
    # The example's layout: the VM is its online host, in the online group, alone.
    assert inv.hosts == [info["host"]]
    assert set(inv.groups(info["host"])) == set(example.groups(info["host"]))
    host = info["host"]
    # The example's admin (not the lab's `admin`), sudo with a password, the ProxyJump kept.
    assert inv.get(host, "ansible_user") == example.get(host, "ansible_user") != "admin"
    assert inv.get(host, "base_sudo_nopasswd") is False
    assert "-o ProxyJump=signlab-jump" in inv.get(host, "ansible_ssh_common_args")
    # The example's profiles, clients and custodians by name, the other hosts' included, plus
    # one copy of an automatic profile with a small budget; only their keys are the lab's.
    names = {h: [p["name"] for p in example.get(h, "signer_profiles")] for h in example.hosts}
    rendered = inv.get(host, "signer_profiles")
    by_name = {p["name"]: p for p in rendered}
    for h, profs in names.items():
        for name in profs:
            want = next(p for p in example.get(h, "signer_profiles") if p["name"] == name)
            assert by_name.pop(name) == want
    # The example's Windows profiles (commented out there: their chain is the organisation's
    # CA file), with the lab CA as that CA.
    win_dev, win_release = by_name.pop("win-dev"), by_name.pop("win-release")
    for win in (win_dev, win_release):
        assert win["formats"] == ["authenticode"] and win["cert"] == "ca"
        assert win["chain"] == str(inst.state_dir / "ca" / "ca.pem")
    assert win_dev["approvals"] == 0
    assert win_release["approvals"] == 2 and win_release["require_timestamp"] is True
    assert set(win_dev["clients"]) & set(win_release["clients"])
    # The example's commented EV-token profile, made real with the lab's card beside the
    # SoftHSM2 token: its key by URI, the lab CA's certificate for it, the card's PIN file.
    card = by_name.pop("card")
    assert card["token"] == "card" and card["cert"] == "file"
    assert card["key"] == lab["card"]["key"] and card["cert_file"] == lab["card"]["cert"]
    assert [c["name"] for c in inv.get(host, "token_cards")] == ["card"]
    assert inv.get(host, "token_cards")[0]["pin_src"] == lab["card"]["pin"]
    [probe] = by_name.values()
    assert probe["approvals"] == 0 and probe["budget_count"] == site.BUDGET_PROBE
    assert probe["custodians"], "nobody could thaw the budget probe"
    wanted = {c["name"] for h in example.hosts for c in example.get(h, "signer_clients")}
    assert {c["name"] for c in inv.get(host, "signer_clients")} == wanted
    parties = inv.get(host, "signer_clients") + inv.get(host, "signer_custodians")
    assert {c["name"] for c in inv.get(host, "signer_custodians")} == {
        c["name"] for c in example.get(host, "signer_custodians")}
    for party in parties:  # a key whose private half the lab tests hold
        assert party["ssh_key"] == (inst.keys_dir / f"site-{party['name']}.pub").read_text().strip()
    # inventory.check's cross-rules hold (unique keys, every profile's parties defined).
    from toolkit.runner import inventory_check
    result = inventory_check.check(info["inventory"])
    assert result.ok, "\n".join(result.lines())
    # The lab's points of view and USB hot-plug, as inventory/lab has them.
    points = inv.get(host, "verify_vantage_points")
    assert set(points) == {"build", "outside"}
    assert points["build"]["argv"][:4] == ["ip", "netns", "exec", inst.netns("build")]
    assert inv.get(host, "verify_usb_hotplug")["devices"]["storage"] == "46f4:0001"
    assert inv.get(host, "token_backend") == "softhsm"
    assert inv.get(host, "firewall_admin_networks") == [f"{site.jump_lab_ipv4(inst)}/32"]
    # The example forwards its audit log to its collector; here to the lab's, with the lab CA.
    assert example.get(host, "signer_audit_collector")
    assert inv.get(host, "signer_audit_collector") == inst.ipv4("collector")
    collector = lab["collector"]
    assert isinstance(collector, dict)
    assert inv.get(host, "signer_audit_forward_key") == collector["client_key"]
    assert inv.get(host, "firewall_log_collectors") == [
        {"network": f"{inst.ipv4('collector')}/32", "port": 2514, "proto": "tcp"}]
    assert inv.get(host, "verify_audit_collector_copy") == {
        "argv": ["cat", str(inst.collector_copy(inst.ipv4("vm")))]}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("/usr/sbin/sshd"),
                    reason="needs root (namespaces) and Debian's openssh-server (scripts/bootstrap)")
def test_the_jump_host_forwards_to_the_signing_host_only_and_goes_away(inst: Instance) -> None:
    net.up(inst)
    try:
        site.jump_up(inst)
        pid = site.jump_pid(inst)
        assert pid is not None
        peer = site.jump_link_ipv4(inst)[1]
        base = ["ssh", "-i", str(inst.keys_dir / "jump"), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10"]
        # No shell on the jump host.
        shell = subprocess.run([*base, f"root@{peer}", "id"], capture_output=True, text=True,
                               timeout=60)
        assert "uid=" not in shell.stdout
        # Forwarding anywhere but the VM's SSH port is refused by the jump sshd.
        other = subprocess.run([*base, "-W", "10.77.8.20:22", f"root@{peer}"],
                               capture_output=True, text=True, timeout=60, input="")
        assert other.returncode != 0
        assert "administratively prohibited" in other.stderr or "open failed" in other.stderr
    finally:
        removed = site.down(inst)
        net.down(inst)
    assert removed and site.jump_pid(inst) is None
    assert not net.namespaces(inst.prefix) and not net.links(inst.prefix)
