"""What running as a systemd service asks of the daemon's process, apart from serving: journal
lines that a caller's string cannot forge, readiness (sd_notify), and the process set up before
any secret is read (no core dumps, few malloc arenas)."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import socket

from signer import pin

log = logging.getLogger("signerd")

_M_ARENA_MAX = -8


class EscapingFormatter(logging.Formatter):
    """Journal lines escaped as the audit log escapes its entries: a caller-provided string
    (a name, a reason that quotes one) cannot start a new line or hide text in the journal.
    A traceback keeps its lines, each one escaped."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escape(record.getMessage())
        text = self.formatMessage(record)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + "\n".join(_escape(x) for x in record.exc_text.splitlines())
        return text


def _escape(text: str) -> str:
    """JSON string escaping without the quotes: controls and non-ASCII as \\uXXXX."""
    return json.dumps(text, ensure_ascii=True)[1:-1]


def notify_ready() -> None:
    """sd_notify(READY=1) when run by systemd with Type=notify (no-op otherwise)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(b"READY=1")
        except OSError as exc:
            log.warning("sd_notify: %s", exc)


def prepare_process() -> None:
    """Before the daemon starts: no core dumps (the PIN and the session live in this
    process's memory), and few malloc arenas."""
    for missed in pin.harden_process():
        log.warning("core dump protection: %s", missed)
    if resource.getrlimit(resource.RLIMIT_CORE)[1] != 0:
        log.warning("core dumps are possible (set LimitCORE=0 in the unit)")
    _few_malloc_arenas()


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena (up to 8 per CPU); with a pool of
    workers that is tens of MiB of resident memory for nothing. Two arenas are plenty: the hot
    path spends its time in syscalls and the token, not in malloc."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass
