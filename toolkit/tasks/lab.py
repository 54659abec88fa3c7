"""`invoke lab.*`: the lab VM and its network.

Instance: ``--instance labN`` or ``$SIGNLAB_INSTANCE`` (default lab0). Several instances
can run side by side (each has its own names, port and subnet).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from lab import lifecycle, usb
from lab.config import LAB_HOSTS, Instance, LabConfigError

INSTANCE_HELP = {"instance": "lab instance lab0..lab9 (default: $SIGNLAB_INSTANCE or lab0)"}


def _inst(name: str | None) -> Instance:
    try:
        return lifecycle.instance(name)
    except LabConfigError as e:
        raise Exit(f"lab: {e}", code=2) from e


def _remainder() -> list[str]:
    """Arguments after `--` on the invoke command line (quoting preserved)."""
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return []


@task(help={**INSTANCE_HELP,
            "release": "Debian release of the VM: trixie (13, the default) or bookworm (12); "
                       "default $SIGNLAB_RELEASE or trixie"})
def up(c: Context, instance: str | None = None, release: str | None = None) -> None:
    """Build the release's base image if needed, start the lab network and boot the VM."""
    inst = _inst(instance)
    try:
        lifecycle.up(inst, release)
    except (lifecycle.LabError, OSError, RuntimeError, subprocess.CalledProcessError) as e:
        raise Exit(f"lab.up: {e}", code=1) from e


@task(help=INSTANCE_HELP)
def down(c: Context, instance: str | None = None) -> None:
    """Stop the VM and remove everything the lab created (also a crashed run's leftovers)."""
    inst = _inst(instance)
    removed = lifecycle.down(inst)
    print(f"lab {inst.name}: " + (("removed " + ", ".join(removed)) if removed
                                  else "nothing to remove"))


@task(help={**INSTANCE_HELP,
            "example": "the inventory to render (default inventory/production.example)"})
def site(c: Context, instance: str | None = None, example: str | None = None) -> None:
    """Dress the running lab VM as a customer's host: jump host, named admin with password
    sudo, and production.example rendered into <state>/site/inventory (vault beside it)."""
    from lab import site as site_mod

    inst = _inst(instance)
    if not lifecycle.is_up(inst):
        raise Exit(f"lab.site: lab {inst.name} is not up: run `invoke lab.up` first", code=3)
    facts = json.loads(inst.lab_json.read_text())
    if facts.get("site"):
        print(f"lab {inst.name}: site mode already set up: {facts['site']['inventory']}")
        return
    try:
        info = site_mod.up(inst, facts, Path(example) if example else site_mod.EXAMPLE)
    except (site_mod.SiteError, OSError, subprocess.CalledProcessError) as e:
        raise Exit(f"lab.site: {e}", code=1) from e
    site_mod.record(inst, info)
    print(f"lab {inst.name}: site mode ready\n  inventory: {info['inventory']}\n"
          f"  vault password file: {info['vault_password_file']}\n"
          f"  admin {info['admin']} (sudo asks for a password) through the jump host "
          f"{info['jump']['ipv4']}")


@task(help={**INSTANCE_HELP, "json_": "print machine-readable status",
            "expect_clean": "exit 0 only if the lab is down and nothing of it is left"})
def status(c: Context, instance: str | None = None, json_: bool = False,
           expect_clean: bool = False) -> None:
    """Is the lab up, how to reach it, and anything left behind by a crashed run."""
    inst = _inst(instance)
    st = lifecycle.status(inst)
    if expect_clean:
        left = list(st["leftovers"]) + (["qemu"] if st["up"] else [])  # type: ignore[call-overload]
        if inst.state_dir.exists():
            left.append(f"state {inst.state_dir}")
        if left:
            raise Exit(f"lab {inst.name}: left behind: {', '.join(left)}", code=1)
        print(f"lab {inst.name}: down, nothing left behind")
        return
    if json_:
        print(json.dumps(st, indent=2))
        return
    if st["up"]:
        print(f"lab {st['instance']}: up (qemu pid {st['pid']}, {st['accel']}, "
              f"ssh {'answers' if st['ssh_answers'] else 'NOT answering'})\n  {st['ssh']}")
    else:
        print(f"lab {st['instance']}: down")
        if st["leftovers"]:
            print("  leftovers of a crashed run (removed by lab.up or lab.down): "
                  + ", ".join(st["leftovers"]))  # type: ignore[arg-type]
    if not st["up"]:
        raise Exit(code=3)
    print("  usb plugged: " + (", ".join(usb.plugged(inst)) or "nothing"))


@task(help={**INSTANCE_HELP, "command": "command to run instead of a login shell"})
def ssh(c: Context, instance: str | None = None, command: str = "") -> None:
    """Open an admin SSH session on the VM (or run --command / the words after --)."""
    inst = _inst(instance)
    if not lifecycle.is_up(inst):
        raise Exit(f"lab {inst.name} is not up: run `invoke lab.up`", code=3)
    cmd = command or " ".join(_remainder())  # ssh semantics: words joined, run by the remote shell
    argv = ["ssh", "-F", str(inst.ssh_config), "signhost"] + ([cmd] if cmd else [])
    r = c.run(shlex.join(argv), pty=sys.stdin.isatty(), warn=True)
    if r is not None and r.exited:
        raise Exit(code=r.exited)


@task(help=INSTANCE_HELP)
def reset(c: Context, instance: str | None = None) -> None:
    """Throw the VM's disk away (copy-on-write overlay) and boot it fresh from the image."""
    inst = _inst(instance)
    if not lifecycle.is_up(inst):  # not ready (3), like lab.ssh and lab.usb, not a failure (1)
        raise Exit(f"lab.reset: lab {inst.name} is not up: run `invoke lab.up`", code=3)
    try:
        lifecycle.reset(inst)
    except lifecycle.LabError as e:
        raise Exit(f"lab.reset: {e}", code=1) from e


@task(positional=["host"], help={**INSTANCE_HELP, "host": "build, collector or intruder"})
def exec_(c: Context, host: str, instance: str | None = None) -> None:
    """Run a command as a lab host: `invoke lab.exec build -- ssh ...`."""
    inst = _inst(instance)
    if host not in LAB_HOSTS:
        raise Exit(f"lab.exec: unknown host {host!r}: choose {', '.join(LAB_HOSTS)}", code=2)
    argv = _remainder()
    if not argv:
        raise Exit("lab.exec: give the command after `--`, e.g. "
                   "`invoke lab.exec build -- ip addr`", code=2)
    if not lifecycle.is_up(inst):
        raise Exit(f"lab {inst.name} is not up: run `invoke lab.up`", code=3)
    proc = subprocess.run(["ip", "netns", "exec", inst.netns(host), *argv])
    if proc.returncode:
        raise Exit(code=proc.returncode)


@task(positional=["action", "device"],
      help={**INSTANCE_HELP, "action": "plug or unplug",
            "device": "storage (a USB stick) or token (the CCID reader with the lab's card)"})
def usb_(c: Context, action: str, device: str | None = None, instance: str | None = None) -> None:
    """Hot-plug a USB stick or the token (reader and card) into the VM through the QEMU monitor."""
    inst = _inst(instance)
    if not lifecycle.is_up(inst):
        raise Exit(f"lab {inst.name} is not up: run `invoke lab.up`", code=3)
    try:
        if action == "plug" and device:
            print(usb.plug(inst, device))
        elif action == "unplug" and device:
            print(usb.unplug(inst, device))
        else:
            raise Exit("lab.usb: use `plug|unplug storage|token`", code=2)
    except usb.USBError as e:
        raise Exit(f"lab.usb: {e}", code=1) from e


ns = Collection("lab")
for t in (up, down, status, ssh, reset, site):
    ns.add_task(t)
ns.add_task(exec_, name="exec")
ns.add_task(usb_, name="usb")
