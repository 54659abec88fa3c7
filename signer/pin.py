"""PIN sources. The PIN travels from a file or a custodian's stdin to C_Login and nowhere else:
never argv, never the environment, never a log line; core dumps are off in the daemon
(`harden_process`), so it does not reach a disk that way either."""

from __future__ import annotations

import ctypes
import os
import resource
import stat
from pathlib import Path

from signer.errors import Exit, SignerError

MAX_PIN = 256
_PR_SET_DUMPABLE = 4


def read_file(path: Path) -> str:
    """Read a PIN file owned by the current user (root may read anyone's) and closed to group
    and others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SignerError(Exit.CONFIG, f"{path}: cannot open PIN file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SignerError(Exit.CONFIG, f"{path}: PIN file is not a regular file")
        if st.st_uid != os.geteuid() and os.geteuid() != 0:
            raise SignerError(Exit.CONFIG, f"{path}: PIN file must be owned by uid "
                              f"{os.geteuid()} (the daemon's user), not uid {st.st_uid}")
        if st.st_mode & 0o077:
            raise SignerError(Exit.CONFIG, f"{path}: PIN file mode is "
                              f"{stat.S_IMODE(st.st_mode):04o}: it must not be readable by "
                              "group or others (chmod 0400)")
        raw = os.read(fd, MAX_PIN + 2)
    finally:
        os.close(fd)
    return check(raw, str(path))


def check(raw: bytes, where: str) -> str:
    pin = raw[:-1] if raw.endswith(b"\n") else raw
    if not pin or len(pin) > MAX_PIN or b"\n" in pin:
        raise SignerError(Exit.DATA, f"{where}: the PIN must be one line of 1 to {MAX_PIN} bytes")
    try:
        return pin.decode("utf-8")
    except UnicodeDecodeError:
        raise SignerError(Exit.DATA, f"{where}: the PIN is not UTF-8") from None


def harden_process() -> list[str]:
    """No core dumps and no ptrace attach by other processes of the same user. Best effort: a
    syscall filter may refuse setrlimit (systemd's ~@resources), in which case the unit's
    LimitCORE=0 has to do it. Returns what could not be done."""
    missed = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        missed.append(f"setrlimit(RLIMIT_CORE, 0): {exc}")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            missed.append(f"prctl(PR_SET_DUMPABLE, 0): errno {ctypes.get_errno()}")
    except (OSError, AttributeError) as exc:
        missed.append(f"prctl(PR_SET_DUMPABLE, 0): {exc}")
    return missed
