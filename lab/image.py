"""The lab's base image: Debian 12 from Debian packages, built once, cached by recipe.

debootstrap fills a directory, a few files make it a bootable guest, and `mkfs.ext4 -d`
turns the directory into a filesystem image without loop devices or mounts. The kernel
and initrd are kept beside the image and booted directly by QEMU (no boot loader: the lab
does not test the boot chain; secure boot is waived in the lab, see threat-model/).

The cache key hashes everything that shapes the image (this file, the package list, the
suite and the mirror): change any of them and the next `lab.up` builds a new image.
Per-lab facts (the admin key, the lab address) are not baked in; the guest reads them at
boot from QEMU's fw_cfg, so one image serves every instance and every fresh key.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.state import CACHE_ROOT

HERE = Path(__file__).resolve().parent
PACKAGES_FILE = HERE / "image-packages.txt"
SUITE = "bookworm"
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


def packages() -> list[str]:
    lines = PACKAGES_FILE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def mirror() -> str:
    return os.environ.get("SIGNLAB_MIRROR", DEFAULT_MIRROR)


def recipe_key() -> str:
    h = hashlib.sha256()
    for part in (Path(__file__).read_bytes(), PACKAGES_FILE.read_bytes(), SUITE.encode(),
                 mirror().encode(), IMAGE_SIZE.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def image_dir(key: str | None = None) -> Path:
    return CACHE_ROOT / "images" / f"debian12-{key or recipe_key()}"


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


def _configure_rootfs(root: Path) -> None:
    (root / "etc/hostname").write_text("signhost\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 signhost\n"
                                    "::1 localhost ip6-localhost ip6-loopback\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 errors=remount-ro 0 1\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror()} {SUITE} main\n"
        f"deb {mirror()} {SUITE}-updates main\n"
        f"deb {mirror().rsplit('/', 1)[0]}/debian-security {SUITE}-security main\n"
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


def build(force: bool = False) -> Path:
    """Build the base image unless the cache already has it; returns the image directory."""
    d = image_dir()
    with _lock(CACHE_ROOT / "images" / ".build.lock"):
        if is_built(d) and not force:
            return d
        free = shutil.disk_usage(CACHE_ROOT).free
        if free < 8 * 2**30:
            raise ImageError(
                f"not enough disk in {CACHE_ROOT}: {free / 2**30:.1f} GiB free, 8 GiB needed")
        shutil.rmtree(d, ignore_errors=True)
        work = d.with_name(d.name + ".work")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        root = work / "rootfs"
        log = work / "build.log"
        started = time.monotonic()
        print(f"==> building the lab base image {d.name} (log: {log})", flush=True)
        try:
            print("  - debootstrap Debian 12 with the signing host's packages (several minutes)",
                  flush=True)
            _run(["debootstrap", "--variant=minbase", "--merged-usr",
                  "--include=" + ",".join(packages()), SUITE, str(root), mirror()],
                 log, "debootstrap")
            print("  - configuring the guest", flush=True)
            _configure_rootfs(root)
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
            (work / "COMPLETE").write_text(f"{time.monotonic() - started:.0f}\n")
            work.rename(d)
        except BaseException:
            print(f"  ! image build failed; partial work removed (log kept: {log})",
                  file=sys.stderr)
            shutil.rmtree(root, ignore_errors=True)
            for p in work.glob("*"):
                if p != log:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            raise
        print(f"==> base image ready in {time.monotonic() - started:.0f}s: {d}", flush=True)
        prune_old(keep=d)
        return d


def prune_old(keep: Path) -> None:
    """Images of older recipes are dead weight (GBs each): keep only the current one."""
    for old in (CACHE_ROOT / "images").glob("debian12-*"):
        if old != keep and old.is_dir() and not old.name.endswith(".work"):
            shutil.rmtree(old, ignore_errors=True)
