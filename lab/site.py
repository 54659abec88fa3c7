"""Site mode: the lab VM dressed as a customer's host, driven by inventory/production.example.

What a real site has and the plain lab does not, built here around a running lab instance:

```
controller --(veth slbN-jc, 10.78.N.0/30)--> jump ns: sshd (ProxyJump only, PermitOpen VM:22)
                                               |
                                               +--(veth slbN-j on the lab bridge, .5)--> VM:22
```

- a jump host: Debian's sshd in its own network namespace, reachable from the controller over
  a point-to-point veth, and on the lab bridge; it forwards to the VM's SSH port and nothing
  else (no shell, no TTY). The admin network of the rendered inventory is its address alone;
- the admin account is the example's (`ansible_user`), not the lab's `admin`, and its sudo asks
  for a password: made on the VM here, as the OS installation would on a real host, with a
  password generated at run time and kept only in the inventory's vault;
- the inventory is production.example rendered: hosts.yml keeps the example's groups with the
  VM as the online host, host_vars/<host>/lab.yml fills in addresses, keys (one made here for
  every client and custodian), the SoftHSM back end and how the lab observes the host
  (verify_*), and group_vars/all/vault.yml holds the vault secrets. Everything else (group
  layout, profiles, clients, custodians, sudo with a password, the ProxyJump) is the example's;
  the VM also carries the other hosts' profiles and clients and one low-budget profile, so that
  the lab tests prove approvals and the budget freeze on it (`_signing_parties`).

All of it lives in `<state dir>/site/` and goes away with `lab.down`; the jump sshd is ended by
its pid (`site.down`). Nothing here is reachable from outside this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from lab.config import Instance

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "inventory" / "production.example"
JUMP_OCTET = 5  # the jump host's address on the lab bridge
JUMP_USER = "root"  # of the controller's jump sshd (forwarding only: ForceCommand, no TTY)


class SiteError(RuntimeError):
    pass


def site_dir(inst: Instance) -> Path:
    return inst.path("site")


def jump_ns(inst: Instance) -> str:
    return inst.netns("jump")


def jump_lab_ipv4(inst: Instance) -> str:
    return f"10.77.{inst.index}.{JUMP_OCTET}"


def jump_link_ipv4(inst: Instance) -> tuple[str, str]:
    """(controller side, jump side) of the point-to-point link."""
    return f"10.78.{inst.index}.1", f"10.78.{inst.index}.2"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SiteError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                        "-f", str(path)], check=True)


def _pub(path: Path) -> str:
    return Path(str(path) + ".pub").read_text().strip()


# --- the jump host --------------------------------------------------------------------------


def jump_up(inst: Instance) -> None:
    d = site_dir(inst) / "jump"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    ns, ctl, peer = jump_ns(inst), *jump_link_ipv4(inst)
    _ip("netns", "add", ns)
    _ip("link", "add", f"{inst.prefix}-j", "type", "veth", "peer", "name", f"{inst.prefix}-jp")
    _ip("link", "set", f"{inst.prefix}-j", "master", inst.bridge, "up")
    _ip("link", "set", f"{inst.prefix}-jp", "netns", ns)
    _ip("-n", ns, "link", "set", f"{inst.prefix}-jp", "name", "eth0")
    _ip("-n", ns, "addr", "add", f"{jump_lab_ipv4(inst)}/24", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("link", "add", f"{inst.prefix}-jc", "type", "veth", "peer", "name", f"{inst.prefix}-jcp")
    _ip("link", "set", f"{inst.prefix}-jcp", "netns", ns)
    _ip("-n", ns, "link", "set", f"{inst.prefix}-jcp", "name", "eth1")
    _ip("-n", ns, "addr", "add", f"{peer}/30", "dev", "eth1")
    _ip("-n", ns, "link", "set", "eth1", "up")
    _ip("addr", "add", f"{ctl}/30", "dev", f"{inst.prefix}-jc")
    _ip("link", "set", f"{inst.prefix}-jc", "up")
    hostkey = d / "ssh_host_ed25519_key"
    _keygen(hostkey, f"signlab-{inst.name}-jump")
    _keygen(inst.keys_dir / "jump", f"signlab-{inst.name}-jump-user")
    (d / "authorized_keys").write_text(_pub(inst.keys_dir / "jump") + "\n")
    (d / "authorized_keys").chmod(0o600)
    vm = inst.ipv4("vm")
    (d / "sshd_config").write_text(
        f"# the lab's jump host ({inst.name}): forwarding to the signing host's SSH only\n"
        f"ListenAddress {peer}:22\n"
        f"HostKey {hostkey}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"AllowUsers {JUMP_USER}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"AllowTcpForwarding local\nPermitOpen {vm}:22\n"
        "PermitTTY no\nX11Forwarding no\nAllowAgentForwarding no\nPermitTunnel no\n"
        "ForceCommand /bin/false\n"
        # The state directory may sit below a world-writable /tmp (tests): the files are ours,
        # made with their modes above.
        "StrictModes no\n"
    )
    # sshd's privilege separation directory (the package's service would make it at start).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(d / "sshd_config")], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-f", str(d / "sshd_config"),
                    "-E", str(d / "sshd.log")], check=True)
    # Until the pid file names a running sshd of ours: it exists before its pid is written.
    for _ in range(100):
        if jump_pid(inst) is not None:
            break
        time.sleep(0.1)
    else:
        raise SiteError(f"the jump sshd did not start; see {d / 'sshd.log'}")


def jump_pid(inst: Instance) -> int | None:
    pidfile = site_dir(inst) / "jump" / "sshd.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # Ours only: the sshd started with this instance's config file.
    return pid if str(site_dir(inst) / "jump" / "sshd_config").encode() in cmdline else None


def down(inst: Instance) -> list[str]:
    """End the jump sshd (by its pid, only if it is ours). Links and namespace go with net.down."""
    pid = jump_pid(inst)
    if pid is None:
        return []
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    return [f"jump sshd (pid {pid})"]


# --- the site admin and the rendered inventory ----------------------------------------------


def _lab_admin(inst: Instance, command: str, stdin: str | None = None) -> None:
    """As the lab's own admin (the image's bootstrap account), before the site takes over."""
    proc = subprocess.run(["ssh", "-F", str(inst.ssh_config), "signhost", command],
                          input=stdin, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SiteError(f"on the VM: {command.split()[0:3]}: {proc.stderr.strip()[-300:]}")


def make_admin(inst: Instance, user: str, password: str) -> None:
    """The site's admin account as an OS installation makes it: key login, sudo with password."""
    key = _pub(inst.keys_dir / "site-admin")
    _lab_admin(inst, f"sudo -n sh -c 'id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/bash "
                     f"{user}; install -d -m 700 -o {user} -g {user} /home/{user}/.ssh; "
                     f"cat > /home/{user}/.ssh/authorized_keys; "
                     f"chown {user}: /home/{user}/.ssh/authorized_keys; "
                     f"chmod 600 /home/{user}/.ssh/authorized_keys'", stdin=key + "\n")
    # The password over stdin (chpasswd), never on a command line.
    _lab_admin(inst, "sudo -n chpasswd", stdin=f"{user}:{password}\n")
    _lab_admin(inst, f"echo '{user} ALL=(ALL:ALL) ALL' | sudo -n sh -c "
                     f"'cat > /etc/sudoers.d/90-site-{user} && "
                     f"chmod 440 /etc/sudoers.d/90-site-{user} && visudo -cq'")


def _vault_encrypt(password_file: Path, values: dict[str, str]) -> str:
    from ansible.parsing.vault import VaultLib, VaultSecret

    vault = VaultLib([("default", VaultSecret(password_file.read_bytes().strip()))])
    return str(vault.encrypt(yaml.safe_dump(values)).decode())


BUDGET_PROBE = 3  # signatures a window allows on the profile the lab tests run out of


def _signing_parties(ex: Any, host: str) -> tuple[list[Any], list[Any], list[Any]]:
    """The VM's profiles, clients and custodians, all taken from the example.

    The VM stands in for the online host, whose profiles sign automatically. The lab tests also
    prove what the example's other hosts do (the 2-of-N approval of a CA-certified key) and a
    budget freeze, so the VM carries the other hosts' profiles and clients too, and a copy of
    its first automatic profile with a budget small enough to run out in a test.
    """
    profiles = list(ex.get(host, "signer_profiles"))
    clients = list(ex.get(host, "signer_clients"))
    custodians = list(ex.get(host, "signer_custodians"))
    for other in ex.hosts:
        if other == host:
            continue
        have = {p["name"] for p in profiles}
        profiles += [p for p in ex.get(other, "signer_profiles", []) if p["name"] not in have]
        have = {c["name"] for c in clients}
        clients += [c for c in ex.get(other, "signer_clients", []) if c["name"] not in have]
        have = {c["name"] for c in custodians}
        custodians += [c for c in ex.get(other, "signer_custodians", []) if c["name"] not in have]
    auto = next((p for p in profiles if p["approvals"] == 0 and p.get("custodians")), None)
    if auto is None:
        raise SiteError("the example has no automatic profile with custodians to thaw it")
    profiles.append({**auto, "name": f"{auto['name']}-budget", "budget_count": BUDGET_PROBE,
                     "subject": f"CN=lab budget probe ({auto['name']})"})
    return profiles, clients, custodians


def _authenticode_profiles(inst: Instance, profiles: list[Any],
                           custodians: list[Any]) -> list[Any]:
    """The example's Windows profiles, as its comments describe them (win-dev on the online
    host, automatic; win-release on the release host, two custodians, a timestamp required):
    they are commented out there because their `chain` is the organisation's CA file, which an
    example cannot ship. Here the lab CA (lab/ca.py, made by lab.up) is that CA: its
    certificate is the chain, and the lab tests issue the profiles' certificates from the CSRs
    the deploy fetches. Clients: the first client of the example's automatic profile (a build
    server of the lab's build namespace); custodians: the example's first two."""
    from lab.ca import LabCA

    auto = next(p for p in profiles if p["approvals"] == 0 and p.get("custodians"))
    names = [c["name"] for c in custodians][:2]
    if len(names) < 2:
        raise SiteError("the example has fewer than two custodians for win-release")
    common = {"algorithm": "rsa3072-pkcs1", "formats": ["authenticode"], "max_size": 8192,
              "clients": list(auto["clients"][:1]), "cert": "ca",
              "chain": str(LabCA(inst.state_dir).cert)}
    return [
        {**common, "name": "win-dev", "approvals": 0, "custodians": names,
         "budget_count": 2000, "budget_window": 3600,
         "subject": "CN=Example Corp Windows test signing"},
        {**common, "name": "win-release", "approvals": 2, "custodians": names,
         "budget_count": 20, "budget_window": 86400, "require_timestamp": True,
         "subject": "CN=Example Corp Windows release signing,O=Example Corp"},
    ]


def _card(inst: Instance, facts: dict[str, Any], profiles: list[Any]) -> tuple[list[Any], Any]:
    """The example's commented EV-token profile (`win-ev`, on a token beside the host's own),
    made real with the lab's card (lab/card.py) in the token's reader: a profile `card` that
    signs CMS and raw with the card's key, the certificate the lab CA issued for it, and the
    card as token_cards. Client: the first client of the example's automatic profile."""
    from lab.ca import LabCA

    card = facts["card"]
    auto = next(p for p in profiles if p["approvals"] == 0 and p.get("custodians"))
    profile = {"name": "card", "token": "card", "key": card["key"], "algorithm": "rsa2048-pkcs1",
               "formats": ["cms", "raw"], "max_size": 67108864,
               "clients": list(auto["clients"][:1]), "approvals": 0,
               "custodians": list(auto["custodians"]), "budget_count": 1000,
               "budget_window": 3600, "cert": "file", "cert_file": card["cert"],
               "chain": str(LabCA(inst.state_dir).cert)}
    cards = [{"name": "card", "module": "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
              "label": card["label"], "pin_src": card["pin"]}]
    return [profile], cards


def _observation(inst: Instance, facts: dict[str, Any]) -> dict[str, Any]:
    """verify_* values: the points of view and the USB hot-plug of the lab, as inventory/lab
    gives them (group_vars/all/verify.yml), so that `invoke verify` runs the same probes."""
    vm = [inst.ipv4("vm"), inst.ipv6("vm")]
    return {
        "verify_egress_probe": "10.0.2.2",  # QEMU's gateway: the controller's loopback
        "verify_vantage_points": {
            "build": {"argv": ["ip", "netns", "exec", facts["hosts"]["build"]["netns"], "sh", "-c"],
                      "addresses": vm},
            "outside": {"argv": ["ip", "netns", "exec", facts["hosts"]["intruder"]["netns"], "sh",
                                 "-c"],
                        "addresses": vm},
        },
        "verify_usb_hotplug": {
            "argv": [str(ROOT / ".venv" / "bin" / "invoke"), "--search-root", str(ROOT),
                     "lab.usb", "--instance", inst.name],
            "devices": {name: f"{d['vendor']}:{d['product']}" for name, d in facts["usb"].items()},
        },
    }


def render(inst: Instance, facts: dict[str, Any], example: Path = EXAMPLE) -> dict[str, Any]:
    """Write the rendered inventory; returns what the lab tests need to know of it."""
    from hostaccess import hostvars

    d = site_dir(inst)
    out = d / "inventory"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(example, out)
    ex = hostvars.load(str(example))
    online = [h for h in ex.hosts if "online_signers" in ex.groups(h)]
    if not online:
        raise SiteError(f"{example}: no host in group online_signers")
    host = online[0]
    user = str(ex.get(host, "ansible_user"))
    # hosts.yml: the example's groups; the VM is the online host; the release host is not here.
    tree = yaml.safe_load((example / "hosts.yml").read_text())
    groups = tree["all"]["children"]["signing_hosts"]["children"]
    for group in groups.values():
        hosts = group.get("hosts") or {}
        group["hosts"] = {host: {"ansible_host": inst.ipv4("vm")}} if host in hosts else {}
    (out / "hosts.yml").write_text("---\n# rendered by lab/site.py from "
                                   f"{example.name}\n" + yaml.safe_dump(tree, sort_keys=False))
    keys = inst.keys_dir
    ssh_config = d / "ssh_config"
    peer = jump_link_ipv4(inst)[1]
    jump_pub = (d / "jump" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    vm_pub = (keys / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"{peer} {' '.join(jump_pub)}\n"
                                   f"{inst.ipv4('vm')} {' '.join(vm_pub)}\n")
    ssh_config.write_text(
        "# the site's SSH settings: the jump host, pinned host keys\n"
        f"Host signlab-jump\n  HostName {peer}\n  User {JUMP_USER}\n"
        f"  IdentityFile {keys / 'jump'}\n  IdentitiesOnly yes\n"
        f"Host *\n  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  ConnectTimeout 30\n  ServerAliveInterval 15\n  LogLevel ERROR\n"
    )
    admin_pub = _pub(keys / "site-admin")
    admins = ex.get(host, "base_admin_users")
    admins = [{**a, "public_keys": [admin_pub]} if a["name"] == user else a for a in admins]
    build = facts["hosts"]["build"]
    coll, coll_ip = facts["collector"], facts["hosts"]["collector"]["ipv4"]
    profiles, clients, custodians = _signing_parties(ex, host)
    profiles += _authenticode_profiles(inst, profiles, custodians)
    card_profiles, cards = _card(inst, facts, profiles) if "card" in facts else ([], [])
    profiles += card_profiles
    # Every client and custodian gets a key made here (the example's are placeholders); build
    # servers come from the lab's build namespace, custodians through the jump host.
    for entry in clients + custodians:
        _keygen(keys / f"site-{entry['name']}", f"signlab-{inst.name}-site-{entry['name']}")
    clients = [{**c, "ssh_key": _pub(keys / f"site-{c['name']}"),
                "from": [build["ipv4"], build["ipv6"]]} for c in clients]
    custodians = [{**c, "ssh_key": _pub(keys / f"site-{c['name']}"),
                   "from": [jump_lab_ipv4(inst)]} for c in custodians]
    fill = {
        # addresses and connection
        "ansible_ssh_common_args": f"-F {ssh_config} -o ProxyJump=signlab-jump",
        "ansible_ssh_private_key_file": str(keys / "site-admin"),
        "ansible_control_path_dir": str(inst.path("cp")),
        "firewall_admin_networks": [f"{jump_lab_ipv4(inst)}/32"],
        "firewall_build_networks": [f"{build['ipv4']}/32", f"{build['ipv6']}/128"],
        "firewall_dns_servers": ["10.0.2.3/32"],
        "firewall_ntp_servers": ["10.0.2.2/32"],
        "base_ntp_servers": ["10.0.2.2"],
        "firewall_mirror_networks": ["151.101.0.0/16", "2a04:4e42::/32"],
        "firewall_mirror_ports": [80, 443],  # Debian's mirror directly (no proxy in the lab)
        "base_apt_proxy": "",
        "firewall_dhcp_client": True,
        # the lab's collector (lab/collector.py) instead of the example's: RELP over TLS with
        # the lab CA; no audisp-remote receiver here (AUD-04's auditd part stays waived)
        "firewall_log_collectors": [{"network": f"{coll_ip}/32", "port": coll["port"],
                                     "proto": "tcp"}],
        "auditd_remote_server": "",
        "signer_audit_collector": coll_ip,
        "signer_audit_collector_port": coll["port"],
        "signer_audit_collector_name": coll["name"],
        "signer_audit_forward_ca": coll["ca"],
        "signer_audit_forward_cert": coll["client_cert"],
        "signer_audit_forward_key": coll["client_key"],
        # the lab tests stop the collector on purpose: reconnect within seconds of its return,
        # as inventory/lab does (the role's default, 10 s and growing, is a site's choice)
        "signer_audit_forward_retry_seconds": 2,
        "verify_audit_collector_copy": {"argv": ["cat", coll["vm_copy"]]},
        "base_apt_timers": False,
        # keys
        "preflight_operator_public_keys": [admin_pub],
        "base_admin_users": admins,
        "signer_profiles": profiles,
        "signer_clients": clients,
        "signer_custodians": custodians,
        "usb_allowed_devices": [{"id": "{}:{}".format(facts["usb"]["token"]["vendor"],
                                                      facts["usb"]["token"]["product"]),
                                 "interfaces": ["0b:*:*"],  # CCID, as the example's token
                                 "name": "lab token stand-in (QEMU usb-ccid)"}],
        # the token back end: SoftHSM2 instead of the example's hardware token
        "token_backend": "softhsm",
        "token_module": "/usr/lib/softhsm/libsofthsm2.so",
        "token_serial": "",  # SoftHSM2 picks a new serial at every initialisation
        "token_pin_dir": str(inst.path("token") / host),
        # the lab's card beside it (lab/card.py), for the example's EV-token profile
        "token_cards": cards,
        # the report's kind: lab waivers apply (no secure boot, LUKS or audisp-remote here)
        "verify_kind": "lab",
        # short roll-back windows and reloadable audit rules, as in the plain lab
        "ssh_rollback_seconds": 90,
        "firewall_rollback_seconds": 90,
        "auditd_immutable": False,
        # how the posture suite observes the host: as inventory/lab's verify.yml does
        **_observation(inst, facts),
    }
    hv = out / "host_vars" / host
    hv.mkdir(parents=True, exist_ok=True)
    (hv / "lab.yml").write_text("---\n# rendered by lab/site.py: addresses, keys, back end\n"
                                + yaml.safe_dump(fill, sort_keys=False, width=1000))
    return {"host": host, "admin": user, "inventory": str(out),
            "vault_password_file": str(d / "vault-pass"),
            "jump": {"ipv4": jump_lab_ipv4(inst), "netns": jump_ns(inst)},
            "ssh_config": str(ssh_config)}


def up(inst: Instance, facts: dict[str, Any], example: Path = EXAMPLE) -> dict[str, Any]:
    """Jump host, site admin, vault, rendered inventory; recorded in lab.json's `site`."""
    d = site_dir(inst)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    _keygen(inst.keys_dir / "site-admin", f"signlab-{inst.name}-site-admin")
    if jump_pid(inst) is None:
        jump_up(inst)
    vault_pass = d / "vault-pass"
    if not vault_pass.exists():
        vault_pass.write_text(secrets.token_urlsafe(24) + "\n")
        vault_pass.chmod(0o600)
    site = render(inst, facts, example)
    become = secrets.token_urlsafe(18)
    make_admin(inst, site["admin"], become)
    # Where the README tells an operator to put it: group_vars/all (tasks delegated to the
    # controller template the connection variables too, and see only group `all`'s vault).
    vault = Path(site["inventory"]) / "group_vars" / "all" / "vault.yml"
    vault.write_text(_vault_encrypt(vault_pass, {"vault_become_password": become}))
    vault.chmod(0o600)
    return site


def record(inst: Instance, site: dict[str, Any]) -> None:
    facts = json.loads(inst.lab_json.read_text())
    facts["site"] = site
    inst.lab_json.write_text(json.dumps(facts, indent=2) + "\n")
