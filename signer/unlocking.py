"""What custodians unlock, and how the signer says what is missing: the daemon's own token, or a
card ([tokens.NAME] with `pin_source = "prompt"`, signer/cards.py). One `Lock` each, one
unlock handler for all (signer/commands.py, `unlock`), one way to say the step a custodian must
take (`Lock.missing`), so the daemon's token and a card never drift apart in their rules or
their words.

The shares themselves live in the token process of the token they are for (signer/shares.py,
`Round`; signer/tokenproc.py). A `Lock` keeps only who has sent one and when, from the token
process's answers, to tell the next custodian (and a client refused for want of it) whose
shares are still missing; it is never asked whether the token is unlocked (the token process
is). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from signer.errors import Exit
from signer.tokenproc import ROUND_RESET, TokenProcess


@dataclass
class Lock:
    token: str  # "" for the daemon's own token, else the [tokens.*] name
    k: int  # custodians' shares needed (0: one custodian sends the whole PIN)
    window: int  # seconds a share counts while the others come
    _in: dict[str, float] = field(default_factory=dict)  # custodian -> when it counted

    @property
    def what(self) -> str:
        return f"token {self.token!r}" if self.token else "the signer"

    def command(self) -> str:
        """The custodians' command, as they type it after `ssh ACCOUNT@HOST`."""
        return "unlock" + (f" --token {self.token}" if self.token else "") + \
            (" --share" if self.k else "")

    def missing(self, now: float) -> str:
        """Why it is locked, in the words of the step that is missing."""
        if not self.k:
            return f"{self.what} is locked: a custodian must run `{self.command()}` (the " \
                "PIN on stdin)"
        have = self.custodians(now)
        more = self.k - len(have)
        who = f"{more} more custodians must each" if more != 1 else "1 more custodian must"
        sent = f"; in so far: {', '.join(have)}" if have else ""
        return (f"{self.what} is locked: {who} send their share with `{self.command()}` "
                f"({len(have)} of {self.k} within {self.window} s{sent})")

    def custodians(self, now: float) -> list[str]:
        self._in = {c: t for c, t in self._in.items() if now - t < self.window}
        return sorted(self._in)

    def counted(self, custodian: str, now: float, have: list[str]) -> None:
        """The token process counted `custodian`'s share; `have`: all it counts now."""
        self._in = {c: t for c, t in self._in.items() if c in have}
        self._in.setdefault(custodian, now)

    def refused(self, code: int, message: str) -> None:
        """The token process refused a share: a lone bad share leaves the round as it was;
        a combination that failed, or a login (good or bad), emptied it."""
        if code != Exit.DATA or ROUND_RESET in message:
            self.reset()

    def reset(self) -> None:
        self._in.clear()


@dataclass(frozen=True)
class Target:
    """One unlock's target: the token process to log in, its lock, what to do once it is
    logged in (`done`, with the audit entry's fields), and what a failure means (`failed`:
    a card that went away is closed, to be opened again)."""
    proc: TokenProcess
    lock: Lock
    done: Callable[..., None]
    failed: Callable[[int, str], None] = lambda _code, _message: None
    fields: dict[str, Any] = field(default_factory=dict)  # in every audit entry (token=)
