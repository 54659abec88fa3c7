"""USB hot-plug through the QEMU monitor (HMP over the instance's Unix socket).

Two devices, both QEMU's own emulations on the VM's xHCI controller:

- ``storage``: a USB mass-storage stick (46f4:0001) backed by a small image file that
  holds one file, so a guest that mounted it would find something to copy;
- ``token``: QEMU's CCID smart-card reader (08e6:4433) with the lab's card in it
  (lab/card.py: a CAC card whose keys live in an NSS database on the controller), the
  signing token: USBGuard's allow-list is proven with a real, distinct vendor:product id and a
  real CCID interface, and the signer's hardware profile signs through it. Unplugging takes
  reader and card away together, as pulling a USB token does.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lab import card
from lab.config import USB_DEVICES, Instance


class USBError(RuntimeError):
    pass


def hmp(monitor: Path, command: str, timeout: float = 10) -> str:
    """Send one HMP command and return its output (without the prompt)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(monitor))
        except OSError as e:
            raise USBError(f"QEMU monitor {monitor} not reachable ({e}); is the lab up?") from e

        def read_prompt() -> str:
            buf = b""
            deadline = time.monotonic() + timeout
            while not buf.rstrip().endswith(b"(qemu)"):
                if time.monotonic() > deadline:
                    raise USBError(f"no answer from the QEMU monitor to {command!r}")
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.decode(errors="replace")

        read_prompt()  # banner
        s.sendall(command.encode() + b"\n")
        out = read_prompt()
    # The monitor echoes the command (with terminal escapes); keep the lines after it.
    lines = [ln for ln in out.replace("\r", "").split("\n")[1:] if ln.strip() != "(qemu)"]
    return "\n".join(ln for ln in lines if ln.strip()).strip()


def make_stick_image(path: Path) -> None:
    if path.exists():
        return
    with tempfile.TemporaryDirectory() as d:
        Path(d, "release-notes.txt").write_text("lab USB stick: must never be readable on the "
                                                "signing host\n")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "LABSTICK", "-d", d, str(path), "8M"],
                       check=True, capture_output=True)


def qdev_id(device: str) -> str:
    return f"lab-{device}"


def plugged(inst: Instance) -> list[str]:
    out = hmp(inst.monitor, "info usb")
    return [d for d in USB_DEVICES if f"ID: {qdev_id(d)}" in out]


def plug(inst: Instance, device: str) -> str:
    if device not in USB_DEVICES:
        raise USBError(f"unknown USB device {device!r}: choose {', '.join(USB_DEVICES)}")
    if device in plugged(inst):
        return f"{device} is already plugged in"
    spec = USB_DEVICES[device]
    if device == "storage":
        make_stick_image(inst.stick_image)
        out = hmp(inst.monitor, f"drive_add 0 if=none,id={qdev_id(device)}-drive,"
                                f"file={inst.stick_image},format=raw")
        if "OK" not in out:
            raise USBError(f"drive_add failed: {out}")
        out = hmp(inst.monitor, f"device_add usb-storage,bus=xhci.0,id={qdev_id(device)},"
                                f"drive={qdev_id(device)}-drive,removable=on")
    else:
        db_args = ""
        if device == "token":
            try:
                card.ensure(inst.state_dir)
            except (card.CardError, OSError) as e:
                raise USBError(f"the lab card cannot be made: {e}") from e
            db_args = card.qdev_args(inst.state_dir)
        out = hmp(inst.monitor, f"device_add {spec['qdev']},bus={spec['bus']},"
                                f"id={qdev_id(device)}")
        if not out and db_args:
            # the card goes into the reader's own CCID bus (`<reader id>.0`)
            out = hmp(inst.monitor, f"device_add ccid-card-emulated,bus={qdev_id(device)}.0,"
                                    f"id={qdev_id(device)}-card,{db_args}")
            if out:
                hmp(inst.monitor, f"device_del {qdev_id(device)}")
    if out:
        raise USBError(f"device_add {device} failed: {out}")
    return f"plugged {device} ({spec['vendor']}:{spec['product']})"


def unplug(inst: Instance, device: str) -> str:
    if device not in USB_DEVICES:
        raise USBError(f"unknown USB device {device!r}: choose {', '.join(USB_DEVICES)}")
    if device not in plugged(inst):
        return f"{device} is not plugged in"
    out = hmp(inst.monitor, f"device_del {qdev_id(device)}")
    if out:
        raise USBError(f"device_del {device} failed: {out}")
    deadline = time.monotonic() + 20
    while device in plugged(inst):
        if time.monotonic() > deadline:
            raise USBError(f"{device} still present 20s after device_del")
        time.sleep(0.5)
    return f"unplugged {device}"
