"""The lab's base images: Debian 13 (the default) or 12, from Debian packages, built once per
release, cached by recipe.

debootstrap fills a directory, a few files make it a bootable guest, and `mkfs.ext4 -d`
turns the directory into a filesystem image without loop devices or mounts. The kernel
and initrd are kept beside the image and booted directly by QEMU (no boot loader: the lab
does not test the boot chain; secure boot is waived in the lab, see threat-model/).

The cache key hashes everything that shapes an image (the recipe: the guest files and scripts
below, the package list, the suite, the mirror and the size), not this module's other code:
change the recipe and the next `lab.up` builds a new image; each release has its own. An image
that a running instance's overlay stands on is never pruned.
Per-lab facts (the admin key, the lab address) are not baked in; the guest reads them at
boot from QEMU's fw_cfg, so one image serves every instance and every fresh key.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.state import CACHE_ROOT, STATE_ROOT

HERE = Path(__file__).resolve().parent
PACKAGES_FILE = HERE / "image-packages.txt"
# The releases a lab can run: suite -> Debian version. The first is the default (the current
# stable); the toolkit supports exactly these (roles/preflight checks the same on any host).
RELEASES = {"trixie": "13", "bookworm": "12"}
DEFAULT_RELEASE = "trixie"
IMAGE_SIZE = "6G"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Written into the image: the guest half of the lab (fw_cfg -> keys and lab address).
GUEST_INIT = r"""#!/bin/sh
# signlab-guest-init: lab-only. Applies the per-instance facts QEMU hands over in fw_cfg.
set -eu
modprobe qemu_fw_cfg 2>/dev/null || true
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/signlab
# The lab's host key is made on the controller (so its known_hosts is exact from the first
# connection: no trust on first use); the other key types are made here if missing.
if [ -r "$fw/host_key/raw" ] && [ ! -e /etc/ssh/ssh_host_ed25519_key ]; then
  install -m 0600 "$fw/host_key/raw" /etc/ssh/ssh_host_ed25519_key
  ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key > /etc/ssh/ssh_host_ed25519_key.pub
fi
ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A
if [ -r "$fw/authorized_keys/raw" ]; then
  install -d -m 0700 -o admin -g admin /home/admin/.ssh
  install -m 0600 -o admin -g admin "$fw/authorized_keys/raw" /home/admin/.ssh/authorized_keys
fi
if [ -r "$fw/lab-network/raw" ]; then
  install -m 0644 "$fw/lab-network/raw" /etc/systemd/network/20-lab.network
fi
"""

GUEST_INIT_UNIT = """[Unit]
Description=Lab: apply per-instance facts from QEMU fw_cfg (admin key, lab address)
DefaultDependencies=no
After=local-fs.target
Before=systemd-networkd.service ssh.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/signlab-guest-init
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

ADMIN_NETWORK = """[Match]
Path=pci-0000:00:03.0

[Network]
DHCP=ipv4
IPv6AcceptRA=no
"""


class ImageError(RuntimeError):
    pass


def release(name: str | None = None) -> str:
    """The release asked for (argument, else $SIGNLAB_RELEASE, else the default), checked."""
    name = name or os.environ.get("SIGNLAB_RELEASE") or DEFAULT_RELEASE
    if name not in RELEASES:
        raise ImageError(f"unknown lab release {name!r}: choose one of "
                         + ", ".join(f"{s} (Debian {v})" for s, v in RELEASES.items()))
    return name


def packages(suite: str | None = None) -> list[str]:
    """The image's packages. A line `name  # only: trixie` is for the releases it names."""
    suite = release(suite)
    out = []
    for line in PACKAGES_FILE.read_text().splitlines():
        name, _, comment = line.partition("#")
        name = name.strip()
        only = comment.strip().removeprefix("only:") if comment.strip().startswith("only:") else ""
        if name and (not only or suite in only.replace(",", " ").split()):
            out.append(name)
    return out


def mirror() -> str:
    return os.environ.get("SIGNLAB_MIRROR", DEFAULT_MIRROR)


# Bump when the way an image is made changes outside the texts hashed below.
RECIPE_VERSION = "2"


def recipe_key(suite: str | None = None) -> str:
    suite = release(suite)
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, GUEST_INIT, GUEST_INIT_UNIT, ADMIN_NETWORK, CHROOT_SCRIPT,
                 inspect.getsource(_configure_rootfs), inspect.getsource(_debootstrap_argv),
                 "\n".join(packages(suite)), suite, mirror(), IMAGE_SIZE):
        h.update(hashlib.sha256(part.encode()).digest())
    return h.hexdigest()[:16]


def image_dir(suite: str | None = None, key: str | None = None) -> Path:
    suite = release(suite)
    return CACHE_ROOT / "images" / f"debian{RELEASES[suite]}-{key or recipe_key(suite)}"


def artefacts(d: Path) -> dict[str, Path]:
    return {"disk": d / "base.qcow2", "kernel": d / "vmlinuz", "initrd": d / "initrd.img"}


def is_built(d: Path) -> bool:
    return (d / "COMPLETE").exists() and all(p.exists() for p in artefacts(d).values())


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str) -> None:
    """Run a build step, its output to the build log, a heartbeat on the terminal."""
    started = time.monotonic()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            try:
                rc = proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                print(f"    ... {what}: {time.monotonic() - started:.0f}s", flush=True)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ImageError(f"{what} failed (exit {rc}); log: {log}\n" + "\n".join(tail))


def _configure_rootfs(root: Path, suite: str) -> None:
    (root / "etc/hostname").write_text("signhost\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 signhost\n"
                                    "::1 localhost ip6-localhost ip6-loopback\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 errors=remount-ro 0 1\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror()} {suite} main\n"
        f"deb {mirror()} {suite}-updates main\n"
        f"deb {mirror().rsplit('/', 1)[0]}/debian-security {suite}-security main\n"
    )
    net = root / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "10-admin.network").write_text(ADMIN_NETWORK)
    init = root / "usr/local/sbin/signlab-guest-init"
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    (root / "etc/systemd/system/signlab-guest-init.service").write_text(GUEST_INIT_UNIT)
    sudoers = root / "etc/sudoers.d/90-lab-admin"
    sudoers.write_text("admin ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    # Host keys are made per VM at first boot (guest init), never shared through the image.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")


CHROOT_SCRIPT = """set -e
useradd -m -u 1000 -s /bin/bash -c 'Lab admin' admin
passwd -l root >/dev/null
systemctl enable systemd-networkd.service signlab-guest-init.service >/dev/null
systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
# apt's own timers would fetch from the mirror at boot and eat a slow guest's CPU in the
# middle of a test run; provision decides whether they run (inventory), not the image.
systemctl mask apt-daily.timer apt-daily-upgrade.timer >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /tmp/* /var/tmp/*
"""


def _debootstrap_argv(suite: str, root: Path) -> list[str]:
    return ["debootstrap", "--variant=minbase", "--merged-usr",
            "--include=" + ",".join(packages(suite)), suite, str(root), mirror()]


def build(suite: str | None = None, force: bool = False) -> Path:
    """Build the release's base image unless the cache has it; returns the image directory.

    A failed build keeps its log (and debootstrap's own, which says which package broke) in
    `<image>.failed/`, named on the terminal; the half-made root filesystem goes.
    """
    suite = release(suite)
    d = image_dir(suite)
    with _lock(d.with_name(d.name + ".lock")):
        if is_built(d) and not force:
            return d
        free = shutil.disk_usage(CACHE_ROOT).free
        if free < 8 * 2**30:
            raise ImageError(
                f"not enough disk in {CACHE_ROOT}: {free / 2**30:.1f} GiB free, 8 GiB needed")
        shutil.rmtree(d, ignore_errors=True)
        work = d.with_name(d.name + ".work")
        failed = d.with_name(d.name + ".failed")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        root = work / "rootfs"
        log = work / "build.log"
        started = time.monotonic()
        version = RELEASES[suite]
        print(f"==> building the lab base image {d.name}: Debian {version} ({suite}) "
              f"(log: {log})", flush=True)
        try:
            print(f"  - debootstrap Debian {version} with the signing host's packages "
                  "(several minutes)", flush=True)
            _run(_debootstrap_argv(suite, root), log, "debootstrap")
            print("  - configuring the guest", flush=True)
            _configure_rootfs(root, suite)
            _run(["chroot", str(root), "/bin/sh", "-c", CHROOT_SCRIPT], log, "chroot setup")
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            initrds = sorted((root / "boot").glob("initrd.img-*"))
            if not kernels or not initrds:
                raise ImageError(f"no kernel/initrd in {root}/boot; log: {log}")
            shutil.copy2(kernels[-1], work / "vmlinuz")
            shutil.copy2(initrds[-1], work / "initrd.img")
            print("  - making the disk image", flush=True)
            raw = work / "base.raw"
            _run(["mkfs.ext4", "-q", "-F", "-L", "signhost-root", "-d", str(root), str(raw),
                  IMAGE_SIZE], log, "mkfs.ext4")
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                  str(work / "base.qcow2")], log, "qemu-img convert")
            raw.unlink()
            shutil.rmtree(root)
            (work / "COMPLETE").write_text(json.dumps(
                {"suite": suite, "version": version, "seconds": round(time.monotonic() - started),
                 "packages": packages(suite)}) + "\n")
            work.rename(d)
        except BaseException:
            _keep_failed_build(work, root, failed)
            raise
        print(f"==> base image ready in {time.monotonic() - started:.0f}s: {d}", flush=True)
        prune_old(keep=d)
        return d


def _keep_failed_build(work: Path, root: Path, failed: Path) -> None:
    """Keep the logs of a failed build (ours and debootstrap's), drop everything else."""
    shutil.rmtree(failed, ignore_errors=True)
    failed.mkdir(parents=True)
    kept = []
    for src in (work / "build.log", root / "debootstrap" / "debootstrap.log"):
        if src.exists():
            shutil.copy2(src, failed / src.name)
            kept.append(str(failed / src.name))
    shutil.rmtree(work, ignore_errors=True)
    print("  ! image build failed; the partial image is removed, its logs are kept: "
          + (", ".join(kept) or "none were written"), file=sys.stderr)


def in_use() -> set[Path]:
    """Image directories that a lab instance's overlay stands on (recorded at lab.up)."""
    used = set()
    for rec in STATE_ROOT.glob("*/base-image.json"):
        try:
            used.add(Path(json.loads(rec.read_text())["image"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return used


def prune_old(keep: Path) -> None:
    """Images of older recipes are dead weight (GBs each): keep the current one of each
    release and every image an instance stands on (its overlay would lose its backing file)."""
    images = CACHE_ROOT / "images"
    current = {image_dir(s) for s in RELEASES} | {keep}
    busy = in_use()
    for old in images.glob("debian*-*"):
        if (old in current or old in busy or not old.is_dir()
                or old.name.endswith((".work", ".failed", ".lock"))):
            continue
        shutil.rmtree(old, ignore_errors=True)
