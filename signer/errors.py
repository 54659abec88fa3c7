"""Exit codes and the one error type that crosses module boundaries.

Codes follow sysexits(3) so that scripts can tell "try again later" (69, 75) from "you are not
allowed" (77) from "your input is wrong" (64, 65). The table is repeated in signer/README.md.
"""

from __future__ import annotations


class Exit:
    """The codes as plain ints (not an IntEnum: `enum` costs the gateway, which starts once per
    SSH request, milliseconds; nothing needs the names at run time)."""

    OK = 0
    INVALID = 1  # verify: signature or audit log invalid
    USAGE = 64
    DATA = 65
    UNAVAILABLE = 69
    SOFTWARE = 70
    EXISTS = 73
    IOERR = 74
    QUEUED = 75
    NOPERM = 77
    CONFIG = 78


class SignerError(Exception):
    """An error that becomes one line for the user and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
