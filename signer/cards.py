"""The hardware tokens beside the daemon's own ([tokens.*]): cards and USB tokens whose keys were
provisioned elsewhere, each in a token process of its own (signer/tokenproc.py).

Why apart from the daemon's token: the daemon's token holds the audit key, and the daemon stops
when its token process ends (no checkpoint could vouch for the log). A card can be pulled out
of its reader at any moment; that must take its profiles away, not the daemon, and plugging it
back must bring them back without a restart. So:

- a card that is missing at start, or fails while signing (reader pulled: OpenSC answers
  CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, a dead session), is *unavailable*: its token
  process is closed, its key handles are dropped, the journal says why once, and every request
  for its profiles fails UNAVAILABLE before anything is reserved or signed;
- the request that finds the card's session dead opens it again at once, and signs with the new
  session if the card is there (pulled and back, or reset); while it is away, the next request
  for one of its profiles, at most every RETRY seconds, tries to open it again:
  a new token process, login with the card's PIN, the residency of each of its keys and the
  match of each profile's certificate checked again (a card swapped for another with the same
  label does not sign with a key it was not checked for), the journal says it is back.

What a failed signature leaves: nothing signed, nothing logged as signed; the request's budget
slot is released by the caller (signer/commands.py) as for any failed signature.

A card with `pin_source = "prompt"` (the release PIN that custodians hold, whole or as k-of-n
shares) is opened without a login: its token process runs, its profiles answer UNAVAILABLE
with the custodians' missing step (`unlock --token NAME [--share]`, signer/unlocking.py), and
the unlock handler (signer/commands.py) logs it in through the same token process, with the
same PIN-flags check before the login (signer/token.py, `pin_tries`: the last try is never
spent) and the same rules for shares as the daemon's own token; the residency and
certificates are checked once it is logged in. Its PIN is kept nowhere: not on disk, and not
across a pull either. The token process that held the PIN (and the shares sent so far) ends
when the card goes, and the new one, when the card is back, starts locked again: the journal
says so, and custodians unlock it again. So a card swapped while away is never logged in with
a PIN meant for another. A session that dies without a pull (a reset) locks it too: the
daemon cannot tell the two apart, and asking the custodians again is the safe side.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from signer import certs, pin, unlocking
from signer.algorithms import BY_NAME, Algorithm
from signer.config import Profile, TokenSpec
from signer.errors import Exit, SignerError
from signer.policy import Denied
from signer.tokenproc import KeyHandle, TokenProcess

if TYPE_CHECKING:
    from signer.daemon import Daemon

log = logging.getLogger("signerd")

RETRY = 2.0  # seconds between two attempts to open a card that is not there


class CardToken:
    """What a profile on a card signs through: the card's token process, and the card told
    when a signature fails because the card went away."""

    def __init__(self, cards: Cards, name: str, proc: TokenProcess) -> None:
        self._cards, self._name, self._proc = cards, name, proc

    @property
    def logged_in(self) -> bool:
        return self._proc.logged_in

    def sign_digest(self, key: KeyHandle, alg: Algorithm, digest: bytes, urgent: bool = False
                    ) -> bytes:
        try:
            return self._proc.sign_digest(key, alg, digest, urgent)
        except SignerError as exc:
            # Whatever a card answers when its reader goes (OpenSC: CKR_DEVICE_REMOVED,
            # CKR_TOKEN_NOT_PRESENT, but also CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED mid-way),
            # the card is closed and opened again, and checked again, before its next signature.
            # The request that finds its session dead opens the card once at once: a card that
            # was pulled and is back (or was reset) signs this request, with a handle of the
            # new session; nothing was signed by the failed attempt, so trying again is safe.
            why = exc.message
            fresh = self._cards.lost(self._name, self._proc, why, reopen=True)
            handle = self._cards.d.keys.get((key.uri, alg.name)) if fresh is not None else None
            if fresh is not None and handle is not None:
                try:
                    return fresh.sign_digest(handle, alg, digest, urgent)
                except SignerError as again:
                    self._cards.lost(self._name, fresh, again.message)
                    why = again.message
            raise SignerError(Exit.UNAVAILABLE, f"token {self._name!r}: {why}") from None


class Cards:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._lock = threading.Lock()  # opening and closing; never held while signing
        self._procs: dict[str, TokenProcess] = {}
        self._why: dict[str, str] = {}  # name -> why unavailable (logged once)
        self._next_try: dict[str, float] = {}
        # the cards whose PIN custodians give (pin_source prompt): who has sent a share (set
        # by open_all, at the daemon's start)
        self.locks: dict[str, unlocking.Lock] = {}

    def profiles(self, name: str) -> list[Profile]:
        return [p for p in self.d.cfg.profiles.values() if p.token == name]

    def open_all(self) -> None:
        self.locks = {name: unlocking.Lock(name, t.pin_shares, t.pin_share_window)
                      for name, t in self.d.cfg.tokens.items() if t.pin_file is None}
        for name in self.d.cfg.tokens:
            with self._lock:
                self._open(name)

    def close_all(self) -> None:
        with self._lock:
            for proc in self._procs.values():
                proc.close()
            self._procs.clear()

    def ready(self, profile: Profile) -> CardToken:
        """The card of `profile`, opened again if it had gone; UNAVAILABLE if it is not there."""
        assert profile.token is not None
        name = profile.token
        with self._lock:
            proc = self._procs.get(name)
            if proc is None and time.monotonic() >= self._next_try.get(name, 0.0):
                proc = self._open(name)
        if proc is None:
            raise SignerError(Exit.UNAVAILABLE, f"token {name!r} of profile {profile.name!r} "
                              f"is unavailable ({self._why.get(name, 'not opened yet')}): "
                              "plug it in and try again")
        if not proc.logged_in:
            raise SignerError(Exit.UNAVAILABLE, f"profile {profile.name!r}: "
                              f"{self.locks[name].missing(time.monotonic())}")
        return CardToken(self, name, proc)

    def unlock_target(self, name: str) -> unlocking.Target:
        """What `unlock --token NAME` logs in: the card's token process, opened now if the
        card was away. USAGE for a name that is no card with pin_source prompt."""
        lock = self.locks.get(name)
        if lock is None:
            why = ("its PIN comes from a file" if name in self.d.cfg.tokens
                   else "no such token in the signer's configuration")
            raise Denied(Exit.USAGE, f"token {name!r} is not unlocked by custodians ({why})",
                         "unlock of a token that takes no PIN from custodians")
        with self._lock:
            found = self._procs.get(name) or self._open(name)
        if found is None:
            raise SignerError(Exit.UNAVAILABLE, f"token {name!r} is unavailable "
                              f"({self._why.get(name, 'not opened yet')}): plug it in and "
                              "try again")
        proc: TokenProcess = found

        def failed(code: int, message: str) -> None:
            if code == Exit.UNAVAILABLE:  # gone while locked, or during the login
                self.lost(name, proc, message)

        return unlocking.Target(proc, lock, lambda **fields: self._unlocked(name, proc,
                                                                            fields),
                                failed, {"token": name})

    def lost(self, name: str, proc: TokenProcess, why: str, reopen: bool = False
             ) -> TokenProcess | None:
        """`proc` failed: close it (once, whoever notices first). With `reopen`, the one that
        closed it opens the card again at once: the new process, or None."""
        with self._lock:
            if self._procs.get(name) is not proc:
                return None  # already closed by another failed request
            del self._procs[name]
            self._forget_keys(name)
            self._unavailable(name, why)
        proc.close()
        if not reopen:
            return None
        with self._lock:
            return self._procs.get(name) or self._open(name)

    # --- under self._lock ------------------------------------------------------------------

    def _unavailable(self, name: str, why: str) -> None:
        if self._why.get(name) != why:
            log.error("token %s unavailable, its profiles refuse to sign: %s", name, why)
        self._why[name] = why
        self._next_try[name] = time.monotonic() + RETRY

    def _forget_keys(self, name: str) -> None:
        for p in self.profiles(name):
            self.d.keys.pop((p.key, p.algorithm), None)
            self.d.key_problems.pop((p.key, p.algorithm), None)
            self.d.profile_certs.pop(p.name, None)
            self.d.cert_problems.pop(p.name, None)

    def _open(self, name: str) -> TokenProcess | None:
        spec: TokenSpec = self.d.cfg.tokens[name]
        proc: TokenProcess | None = None
        try:
            secret = pin.read_file(spec.pin_file) if spec.pin_file is not None else None
            proc = TokenProcess(spec.module, spec.label, spec.serial,
                                on_lost=lambda why: log.error("token %s: %s", name, why))
            if secret is not None:
                proc.login(secret)
                self._check(name, proc)
        except SignerError as exc:
            if proc is not None:
                proc.close()
            self._forget_keys(name)
            self._unavailable(name, exc.message)
            return None
        back = self._why.pop(name, None) is not None
        if secret is not None:
            if back:
                log.warning("token %s is back: its profiles sign again", name)
        else:  # a new token process, a new round: no PIN, no share is kept across a pull
            lock = self.locks[name]
            lock.reset()
            log.warning("token %s %s: %s", name, "is back, locked again (its PIN is not kept "
                        "across a pull)" if back else "is there, locked",
                        lock.missing(time.monotonic()))
        self._procs[name] = proc
        return proc

    def _unlocked(self, name: str, proc: TokenProcess, fields: dict[str, Any]) -> None:
        """A card with pin_source prompt is logged in (commands.unlock): the log says who,
        then its keys' residency and its profiles' certificates are checked, as at a
        file-PIN card's opening."""
        assert self.d.writer is not None
        self.d.writer.append("unlock", token=name, **fields)
        with self._lock:
            if self._procs.get(name) is not proc:
                return  # pulled meanwhile: the next opening locks it again
            try:
                self._check(name, proc)
            except SignerError as exc:
                del self._procs[name]
                self._forget_keys(name)
                self._unavailable(name, exc.message)
                proc.close()
                return
        who = fields.get("custodians") or [fields.get("custodian")]
        log.warning("token %s unlocked by %s: its profiles sign", name,
                    ", ".join(str(c) for c in who))

    def _check(self, name: str, proc: TokenProcess) -> None:
        """Residency of the card's keys and the match of its profiles' certificates, as the
        daemon's check_keys does for its own token (refusals in the audit log)."""
        assert self.d.writer is not None
        for p in self.profiles(name):
            k = (p.key, p.algorithm)
            problems = proc.residency_problems(p.key, BY_NAME[p.algorithm])
            if problems:
                why = "; ".join(problems)
                if self.d.key_problems.get(k) != why:
                    log.error("key %s refused: %s", p.key, why)
                    self.d.writer.append("residency-failure", profile=p.name, key=str(p.key),
                                         reason=why)
                self.d.key_problems[k] = why
                continue
            handle: Any = proc.private_key(p.key)
            self.d.keys[k] = handle
            if p.cert is None:
                continue
            try:
                cert = certs.load_cert(p.cert)
                if not certs.matches(cert, proc.public_key_info(p.key)):
                    raise SignerError(Exit.CONFIG, f"{p.cert}: certificate is not for the key "
                                      f"{p.key}")
                self.d.profile_chains[p.name] = certs.load_chain(p.chain) if p.chain else ()
                self.d.profile_certs[p.name] = cert
            except SignerError as exc:
                if exc.code == Exit.UNAVAILABLE:
                    raise
                self.d.cert_problems[p.name] = exc.message
                log.error("profile %s: %s", p.name, exc.message)
