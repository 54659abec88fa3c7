"""A USB device made inside the lab guest, for the spoofing test (tests/lab/test_usb.py).

QEMU's emulated USB devices cannot take another device's ids, so the device comes from the
guest's own kernel: `dummy_hcd` (a virtual host controller wired to a virtual device
controller), `libcomposite` and a configfs gadget. The guest's USB core enumerates it on the
dummy bus like any plugged device, and USBGuard decides on it, with the vendor:product and
serial the test chooses. Two kinds:

- `hid`: a boot keyboard (interface 03:01:01, usb_f_hid): a BadUSB that claims to be the reader.
- `ccid`: one interface of the reader's own class (0b:00:00). The kernel has no CCID gadget
  function, so it is a FunctionFS function (usb_f_fs) whose descriptors this script writes:
  an interface of class 0b with no endpoints (nothing on the guest drives it; USBGuard only
  reads the class). A process that holds FunctionFS's ep0 open keeps the function alive.

The dummy bus's root hub comes after USBGuard started, so USBGuard blocks it like any new
device (unless the policy allows hubs) and nothing behind it would be enumerated: `up` allows it
for this boot only (`usbguard allow-device`, no rule written). The device behind it is then
judged by the host's policy alone.

This file runs ON the guest, as root (`python3 - up|look|down ...`; the test sends it over the
admin's SSH connection, and does in one round trip what costs seconds per sudo on an emulated
guest): `up` makes the device and prints a JSON line that names it (bus port, sysfs path);
`look` prints what the host shows of it; `down` undoes everything `up` made, from a state file
written before the first change, so a half-made gadget is removed too: it unbinds the device
controller, removes the configfs tree and the FunctionFS mount, and unloads the modules it
loaded (the gadget's, and the HID drivers a keyboard that got through would have pulled in) that
were not loaded before `up`; it prints what it could not undo and exits 1. `up` exits 3 when the
host refuses the gadget modules (kernel.modules_disabled, a blacklist): the host's choice.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

CONFIGFS = Path("/sys/kernel/config")
GADGET = CONFIGFS / "usb_gadget" / "signlab-spoof"
STATE = Path("/run/signlab-usb-gadget.json")
FFS_MOUNT = Path("/run/signlab-usb-gadget-ffs")
DUMMY_HCD = Path("/sys/devices/platform/dummy_hcd.0")
# What `up` loads (with their dependencies), and what a keyboard that got through would load.
OURS = {"dummy_hcd", "libcomposite", "udc_core", "usb_f_hid", "usb_f_fs", "usbhid",
        "hid_generic", "hid"}

# A boot keyboard's report descriptor (HID 1.11, appendix B.1): 8-byte input reports.
KEYBOARD_REPORT = bytes.fromhex(
    "05010906a101050719e029e7150025017501950881029501750881039505750105081901290591029501"
    "7503910395067508150025650507190029658100c0")

# FunctionFS (include/uapi/linux/usb/functionfs.h): v2 descriptors, full and high speed.
FFS_DESCRIPTORS_MAGIC_V2 = 3
FFS_STRINGS_MAGIC = 2
FFS_HAS_FS_DESC, FFS_HAS_HS_DESC = 1, 2
# The reader's interface: class 0b (smart card), subclass 0, protocol 0, no endpoints.
CCID_INTERFACE = struct.pack("<9B", 9, 4, 0, 0, 0, 0x0B, 0, 0, 0)


class Refused(Exception):
    """The host will not make the gadget (exit 3: the test skips with the reason)."""


def _loaded() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}


def _write(path: Path, value: str | bytes) -> None:
    path.write_bytes(value if isinstance(value, bytes) else value.encode())


def _ffs_descriptors() -> bytes:
    body = struct.pack("<II", 1, 1) + CCID_INTERFACE + CCID_INTERFACE
    head = struct.pack("<III", FFS_DESCRIPTORS_MAGIC_V2, 12 + len(body),
                       FFS_HAS_FS_DESC | FFS_HAS_HS_DESC)
    return head + body


def _ffs_hold(mount: Path) -> int:
    """Write the function's descriptors to ep0 and leave a detached child holding it open
    (FunctionFS drops the function when ep0 closes); returns the child's pid."""
    fd = os.open(mount / "ep0", os.O_RDWR)
    os.write(fd, _ffs_descriptors())
    os.write(fd, struct.pack("<IIII", FFS_STRINGS_MAGIC, 16, 0, 0))
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        while True:
            signal.pause()
    os.close(fd)
    return pid


def up(kind: str, vendor: str, product: str, serial: str) -> dict[str, object]:
    if GADGET.exists() or STATE.exists():
        raise SystemExit(f"a gadget is already there ({GADGET}, {STATE}): run `down` first")
    state: dict[str, object] = {"before": sorted(_loaded()), "kind": kind}
    _write(STATE, json.dumps(state))  # first: `down` undoes a half-made gadget too
    function = {"hid": "usb_f_hid", "ccid": "usb_f_fs"}[kind]
    r = subprocess.run(["modprobe", "-a", "dummy_hcd", "libcomposite", function],
                       capture_output=True, text=True)
    if r.returncode != 0:
        # The host's own policy (kernel.modules_disabled, an `install ... /bin/false`): its
        # choice, reported as such, never worked around.
        raise Refused(f"this host does not load the gadget modules: {r.stderr.strip()}")
    root = _root_hub()
    hub = _allow_root_hub(root)
    GADGET.mkdir()
    _write(GADGET / "idVendor", f"0x{vendor}")
    _write(GADGET / "idProduct", f"0x{product}")
    _write(GADGET / "bcdUSB", "0x0200")
    strings = GADGET / "strings" / "0x409"
    strings.mkdir()
    if serial:
        _write(strings / "serialnumber", serial)
    _write(strings / "manufacturer", "signlab")
    _write(strings / "product", f"spoofed {vendor}:{product} ({kind})")
    config = GADGET / "configs" / "c.1"
    config.mkdir()
    if kind == "hid":
        func = GADGET / "functions" / "hid.spoof"
        func.mkdir()
        _write(func / "protocol", "1")  # keyboard
        _write(func / "subclass", "1")  # boot interface
        _write(func / "report_length", "8")
        _write(func / "report_desc", KEYBOARD_REPORT)
    else:
        func = GADGET / "functions" / "ffs.spoof"
        func.mkdir()
        FFS_MOUNT.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "functionfs", "spoof", str(FFS_MOUNT)], check=True)
        state["holder"] = _ffs_hold(FFS_MOUNT)
        _write(STATE, json.dumps(state))
    (config / func.name).symlink_to(func)
    [udc] = [p.name for p in Path("/sys/class/udc").iterdir() if p.name.startswith("dummy_udc")]
    _write(GADGET / "UDC", udc)
    port = f"{root.name[3:]}-1"
    return {"udc": udc, "port": port, "sysfs": str(root / port), "controller": str(root),
            "hub": hub}


def _root_hub() -> Path:
    """The dummy bus's root hub in sysfs (usbN), once the kernel has registered it."""
    for _ in range(100):
        hubs = [p for p in DUMMY_HCD.glob("usb*") if (p / "authorized").exists()]
        if hubs:
            return hubs[0]
        time.sleep(0.1)
    raise SystemExit(f"no root hub under {DUMMY_HCD}")


def _usbguard_entry(port: str) -> str:
    out = subprocess.run(["usbguard", "list-devices"], capture_output=True, text=True,
                         check=True).stdout
    return next((ln for ln in out.splitlines() if f' via-port "{port}" ' in ln), "")


def _allow_root_hub(root: Path) -> str:
    """The dummy bus's root hub comes after USBGuard started: InsertedDevicePolicy applies and
    blocks it like any new device (unless the policy allows hubs), and nothing behind it would
    ever be enumerated. It is allowed for this boot only (`allow-device` without -p writes no
    rule); the device behind it is then judged by the host's policy alone."""
    for _ in range(150):
        entry = _usbguard_entry(root.name)
        if entry:
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"USBGuard never listed the dummy root hub {root.name}")
    if ": allow id " in entry:
        return "allowed by the policy"
    subprocess.run(["usbguard", "allow-device", entry.split(":", 1)[0]], check=True)
    return "allowed for this test (usbguard allow-device, no rule)"


def look(port: str, controller: str, since: str) -> dict[str, object]:
    """What the host shows of the devices, in one round trip (each sudo over SSH costs seconds
    on an emulated guest): USBGuard's entries, each device's `authorized`, the interfaces of the
    device on `port`, the input and hidraw devices under `controller`, and the kernel's
    messages about the dummy bus since `since` (seconds since the epoch)."""
    devices = Path("/sys/bus/usb/devices")
    authorized = {p.name: (p / "authorized").read_text().strip()
                  for p in devices.iterdir() if (p / "authorized").exists()}
    bound = [str(p.resolve()) for cls in ("input", "hidraw")
             for p in Path("/sys/class", cls).glob("*")
             if str(p.resolve()).startswith(controller + "/")]
    kernel = subprocess.run(["journalctl", "-q", "-k", "-o", "cat", "--since", f"@{since}"],
                            capture_output=True, text=True).stdout
    usbguard = subprocess.run(["usbguard", "list-devices"], capture_output=True, text=True,
                              check=True).stdout
    return {"usbguard": usbguard.splitlines(), "authorized": authorized,
            "interfaces": sorted(p.name for p in devices.glob(f"{port}:*")),
            "bound": bound, "kernel": [ln for ln in kernel.splitlines() if "dummy_hcd" in ln]}


def down() -> list[str]:
    """Undo `up`; what could not be undone (empty: all clean)."""
    state = json.loads(STATE.read_text()) if STATE.exists() else {"before": None}
    if GADGET.exists():
        udc = GADGET / "UDC"
        if udc.read_text().strip():
            _write(udc, "\n")
        for link in (GADGET / "configs").glob("*/*.*"):
            if link.is_symlink():
                link.unlink()
    holder = state.get("holder")
    if isinstance(holder, int):
        try:
            os.kill(holder, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if FFS_MOUNT.exists():
        for _ in range(50):  # the holder's ep0 closes as it exits
            if subprocess.run(["umount", str(FFS_MOUNT)], capture_output=True).returncode == 0 \
                    or not os.path.ismount(FFS_MOUNT):
                break
            time.sleep(0.1)
        FFS_MOUNT.rmdir()
    if GADGET.exists():
        for d in [*GADGET.glob("configs/*/strings/*"), *GADGET.glob("configs/*"),
                  *GADGET.glob("functions/*"), *GADGET.glob("strings/*"), GADGET]:
            d.rmdir()
    left: list[str] = []
    before = state.get("before")
    if before is not None:
        # The gadget's modules and the drivers a bound device would pull in, those of them
        # loaded since `up` began (others load modules meanwhile: not ours to unload). rmmod
        # in rounds, as dependencies free up.
        new = (_loaded() - set(before)) & OURS
        while new:
            for m in sorted(new):
                subprocess.run(["rmmod", m], capture_output=True)
            still = (_loaded() - set(before)) & OURS
            if still == new:
                break
            new = still
        left += [f"module {m} still loaded" for m in sorted(new)]
    for p in (GADGET, FFS_MOUNT):
        if p.exists():
            left.append(f"{p} still there")
    STATE.unlink(missing_ok=True)
    return left


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"] and len(argv) == 5:
        try:
            print(json.dumps(up(*argv[1:])))
        except Refused as exc:
            print(exc)
            return 3
        return 0
    if argv[:1] == ["look"] and len(argv) == 4:
        print(json.dumps(look(*argv[1:])))
        return 0
    if argv == ["down"]:
        left = down()
        print("\n".join(left))
        return 1 if left else 0
    print("usage: usb_gadget.py up hid|ccid VENDOR PRODUCT SERIAL | look PORT CONTROLLER SINCE"
          " | down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
