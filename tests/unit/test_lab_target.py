"""lab/target.py: the lab tests find every part they play in the inventory under test, for
inventory/lab and for the site inventory lab.site renders, without a VM. A part missing here
would make a lab test skip; this test fails instead, before a VM is booted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import lifecycle, site, target
from lab.config import Instance
from lab.state import LabState


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Instance:
    i = Instance("lab8", tmp_path / "lab8")
    lifecycle.write_runtime_files(i)
    i.lab_json.write_text(json.dumps(i.facts(accel="tcg", pid=0)))
    monkeypatch.setenv("SIGNLAB_STATE", str(i.state_dir))
    return i


def _lab(inst: Instance) -> LabState:
    return LabState(json.loads(inst.lab_json.read_text()))


def _site(inst: Instance) -> tuple[str, str]:
    (site.site_dir(inst) / "jump").mkdir(parents=True)
    lifecycle._keygen(site.site_dir(inst) / "jump" / "ssh_host_ed25519_key", "jump")
    for name in ("site-admin", "jump"):
        lifecycle._keygen(inst.keys_dir / name, name)
    info = site.render(inst, json.loads(inst.lab_json.read_text()))
    vault = Path(info["vault_password_file"])
    vault.write_text("lab8-test\n")
    (Path(info["inventory"]) / "group_vars" / "all" / "vault.yml").write_text(
        site._vault_encrypt(vault, {"vault_become_password": "not-used-here"}))
    return info["inventory"], str(vault)


def _parts(t: target.Target) -> dict[str, object]:
    """Who plays what in tests/lab, chosen the way the tests choose."""
    auto = [(c.name, p["name"]) for p in t.profiles for c in t.clients
            if p["approvals"] == 0 and p.get("cert") == "selfsigned" and t.allowed(p, c)]
    refused = [(c.name, p["name"]) for c in t.clients for p in t.profiles if not t.allowed(p, c)]
    release = [p["name"] for p in t.profiles if p["approvals"] >= 2 and p.get("cert") == "ca"
               and any(t.allowed(p, c) for c in t.clients)
               and len([c for c in t.custodians if c.name in p["custodians"]]) >= p["approvals"]]
    budget = [p["name"] for p in t.profiles if p["approvals"] == 0 and p["budget_count"] <= 10
              and any(c.name in (p.get("custodians") or []) for c in t.custodians)]
    return {"auto": auto, "refused": refused, "release": release, "budget": budget}


def test_the_lab_inventory_gives_the_lab_tests_every_part(inst: Instance) -> None:
    t = target.resolve(_lab(inst))
    assert t.inventory == str(target.DEFAULT_INVENTORY)
    assert t.admin == "admin" and t.admin_argv()[-1] == "signhost"
    parts = _parts(t)
    assert all(parts.values()), parts
    assert all(c.netns_host == "build" for c in t.clients)
    assert t.token_dir == inst.state_dir / "token" / t.host


def test_the_site_inventory_gives_the_lab_tests_every_part(inst: Instance) -> None:
    inventory, vault = _site(inst)
    t = target.resolve(_lab(inst), inventory, vault)
    # Its own names, not the lab's: the tests take them from the inventory.
    assert t.admin != "admin" and t.host != "signhost"
    assert "ProxyJump=signlab-jump" in t.admin_argv()
    parts = _parts(t)
    assert all(parts.values()), parts
    # Every client and custodian is played with its own lab key, the clients from the lab's
    # build namespace; custodians come the admins' way (the jump host), as themselves.
    assert {c.key.name for c in t.clients} == {f"site-{c.name}" for c in t.clients}
    assert all(c.netns_host == "build" for c in t.clients)
    who = t.custodians[0]
    argv = t.custodian_argv(who)
    assert f"User={who.name}" in argv and str(who.key) in argv and "ProxyJump=signlab-jump" in argv
    assert t.admin_networks4 == [f"{site.jump_lab_ipv4(inst)}/32"]


def test_an_inventory_with_more_than_one_host_is_refused(inst: Instance) -> None:
    with pytest.raises(target.TargetError, match="one host"):
        target.resolve(_lab(inst), str(site.EXAMPLE))
