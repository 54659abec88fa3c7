"""A card's PIN from its custodians (issue 23, points 4 and 5, for [tokens.*]): the real daemon,
the card's own token process and a second SoftHSM2 token standing in for the card
(tests/signer/test_cards.py). A card with pin_source prompt starts locked and its profiles say
which custodians' step is missing; k shares unlock it and k-1 do not; a custodian counts once;
shares of the daemon's own token never count for the card (nor the card's for the daemon's); a
garbled share fails before any login; a wrong PIN from combined shares is tried once and not
again; a share counts only within the window; the card locks again when it comes back; no PIN
and no share in the audit log or the daemon's output."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from signer import shares
from signer.errors import Exit
from tests.signer.conftest import MakeSigner, Signer, one_line_error, until
from tests.signer.test_cards import generate, make_card, with_card
from tests.signer.test_sign import openssl_dgst_verify
from toolkit.local_signer import SOFTHSM_MODULE, Lab

SIGN = "sign --profile card --format raw"
COUNT_LOW = 0x10000  # CKF_USER_PIN_COUNT_LOW: the token saw a wrong PIN since the last good


class Card:
    def __init__(self, s: Signer, label: str, pin_file: Path, cert: Path, k: int) -> None:
        self.s, self.label, self.pin_file, self.cert, self.k = s, label, pin_file, cert, k
        # the ceremony's shares of the card's PIN (signer pin split --token card), one per
        # custodian: alice, bob, carol, mallory
        self.lines = [sh.line() for sh in shares.split(self.pin, k, 4, token="card")] \
            if k else []

    @property
    def pin(self) -> bytes:
        return self.pin_file.read_bytes().strip()

    def send(self, custodian: str, line: str | bytes, token: str = "card"
             ) -> subprocess.CompletedProcess[bytes]:
        raw = line.encode() if isinstance(line, str) else line
        return self.s.gw(f"unlock --token {token} --share" if token else "unlock --share",
                         raw + b"\n", client=None, custodian=custodian)

    def flags(self) -> int:
        """The card's flags as C_GetTokenInfo gives them now, read in a process of its own."""
        script = ("import sys, pkcs11\n"
                  "lib = pkcs11.lib(sys.argv[1])\n"
                  "print(int(lib.get_token(token_label=sys.argv[2]).flags))\n")
        r = subprocess.run([sys.executable, "-c", script, str(SOFTHSM_MODULE), self.label],
                           env=self.s.lab.env, capture_output=True, text=True, check=True)
        return int(r.stdout)

    def secrets_absent(self, more: Sequence[str] = ()) -> None:
        """Neither the PIN nor any part of a share in the audit log or the daemon's output."""
        text = self.s.audit_log.read_text() + self.s.log
        assert self.pin.decode() not in text
        assert f"{shares.PREFIX}." not in text  # the marker the posture suite greps for
        for line in [*self.lines, *more]:
            parts = line.split(".")
            for secret in (line, parts[5], parts[6]):  # the line, the share, the sealed PIN
                assert secret not in text


def _card(lab: Lab, make_signer: MakeSigner, k: int, window: int = 900,
          **daemon: Any) -> Card:
    label = f"card-pin-{secrets.token_hex(3)}"
    pin_file, cert = make_card(lab, label)
    extra: dict[str, Any] = {"pin_source": "prompt"}
    if k:
        extra.update(pin_shares=k, pin_share_window=window)
    s = with_card(make_signer(start=False, **daemon), label, pin_file, cert, **extra)
    s.start()
    return Card(s, label, pin_file, cert, k)


def _signs(c: Card, tmp_path: Path) -> None:
    art = tmp_path / "artifact"
    art.write_bytes(secrets.token_bytes(3000))
    r = c.s.gw(SIGN, art.read_bytes())
    assert r.returncode == 0, r.stderr
    sig = tmp_path / "artifact.sig"
    sig.write_bytes(r.stdout)
    v = openssl_dgst_verify(art, sig, c.cert, pss=False)
    assert v.returncode == 0, v.stderr


@pytest.mark.control("TOK-03")
def test_a_card_with_prompt_starts_locked_and_k_custodians_shares_unlock_it(
        lab: Lab, make_signer: MakeSigner, tmp_path: Path) -> None:
    c = _card(lab, make_signer, 3)
    s = c.s
    err = one_line_error(s.gw(SIGN, b"x"))
    assert s.gw(SIGN, b"x").returncode == Exit.UNAVAILABLE
    assert "token 'card' is locked: 3 more custodians must each send their share with " \
        "`unlock --token card --share` (0 of 3" in err, err
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0  # the rest signs
    assert "token card is there, locked" in s.log
    r = c.send("alice", c.lines[0])
    assert r.returncode == 0 and b"share counted: 1 of 3 (alice)" in r.stderr, r.stderr
    r = c.send("alice", c.lines[0])  # the same custodian twice counts once
    assert r.returncode == 0 and b"already counts (once): 1 of 3" in r.stderr, r.stderr
    r = c.send("alice", c.lines[1])  # another's share, sent by alice: still once
    assert r.returncode == 0 and b"1 of 3 (alice)" in r.stderr, r.stderr
    assert c.send("carol", c.lines[2]).returncode == 0
    err = one_line_error(s.gw(SIGN, b"x"))  # k-1 shares: still locked, and says who is in
    assert "1 more custodian must send" in err and "in so far: alice, carol" in err, err
    r = c.send("mallory", c.lines[3])
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"signer: unlocked with the shares of alice, carol, mallory\n"
    _signs(c, tmp_path)
    assert c.send("bob", c.lines[1]).stderr == b"signer: already unlocked\n"
    # the log: who sent a share for which token, and the unlock; the journal says so
    assert [(e["custodian"], e["have"], e["need"], e["token"])
            for e in s.events("unlock-share")] == \
        [("alice", 1, 3, "card"), ("carol", 2, 3, "card"), ("mallory", 3, 3, "card")]
    assert [(e["token"], e["custodians"]) for e in s.events("unlock")] == \
        [("card", ["alice", "carol", "mallory"])]
    assert "token card unlocked by alice, carol, mallory" in s.log
    s.stop()
    c.secrets_absent()
    # a restart: the card is locked again (its PIN is kept nowhere)
    s.start()
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))


@pytest.mark.control("TOK-03")
def test_shares_for_one_token_never_count_for_another(
        lab: Lab, make_signer: MakeSigner, tmp_path: Path) -> None:
    """The daemon's own token and the card both take 2-of-4 shares: each one's shares are
    refused by the other's round on arrival, and a share relabelled for the card (checksum
    made right) never opens the card's seal: neither PIN is ever tried on the other token."""
    c = _card(lab, make_signer, 2, pin_source="prompt", pin_shares=2)
    s = c.s
    own = [sh.line() for sh in shares.split(s.lab.pin_file.read_bytes().strip(), 2, 4)]
    for who, line, token, want in [("alice", own[0], "card", "the signer's own token, not "
                                    "token 'card'"),
                                   ("alice", c.lines[0], "", "token 'card', not the signer's "
                                    "own token")]:
        r = c.send(who, line, token)
        assert r.returncode == Exit.DATA and want in one_line_error(r), r.stderr
    # the daemon's shares relabelled as the card's: they count, but never combine
    relabelled = [shares.Share(sh.set_id, sh.k, sh.n, sh.index, sh.value, sh.sealed,
                               "card").line() for sh in map(lambda x: shares.parse(x.encode()),
                                                            own)]
    assert c.send("alice", relabelled[0]).returncode == 0
    r = c.send("bob", relabelled[1])
    assert r.returncode == Exit.DATA and "nothing was tried" in one_line_error(r)
    assert not c.flags() & COUNT_LOW  # the card saw no PIN
    # each token with its own shares: both unlock, both sign
    assert c.send("alice", own[0], "").returncode == 0
    assert b"unlocked" in c.send("bob", own[1], "").stderr
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))  # the daemon's unlock is not the card's
    assert c.send("carol", c.lines[2]).returncode == 0
    assert b"unlocked" in c.send("mallory", c.lines[3]).stderr
    _signs(c, tmp_path)
    assert s.gw("sign --profile dev --format raw", b"x").returncode == 0
    assert [e.get("token") for e in s.events("unlock")] == [None, "card"]
    s.stop()
    c.secrets_absent([*own, *relabelled])


def _forged(line: str) -> str:
    """The same share number, set and token, another value, the checksum made right again."""
    sh = shares.parse(line.encode())
    return shares.Share(sh.set_id, sh.k, sh.n, sh.index, bytes(b ^ 0x5A for b in sh.value),
                        sh.sealed, sh.token).line()


@pytest.mark.control("TOK-03")
def test_a_garbled_share_or_a_wrong_pin_is_never_tried_twice_on_the_card(
        lab: Lab, make_signer: MakeSigner, tmp_path: Path) -> None:
    c = _card(lab, make_signer, 2)
    s = c.s
    # damaged in copying: refused on arrival; forged with a right checksum: the seal fails,
    # before the card is asked (its wrong-PIN flag stays clear)
    damaged = c.lines[1][:40] + ("A" if c.lines[1][40] != "A" else "B") + c.lines[1][41:]
    r = c.send("bob", damaged)
    assert r.returncode == Exit.DATA and "damaged" in one_line_error(r)
    assert c.send("alice", c.lines[0]).returncode == 0
    r = c.send("bob", _forged(c.lines[1]))
    err = one_line_error(r)
    assert r.returncode == Exit.DATA and "nothing was tried on the token" in err, err
    assert not c.flags() & COUNT_LOW
    # the ceremony split a wrong PIN (the card's was changed since): one try, refused, the
    # round forgotten; nothing tries it again
    wrong = [sh.line() for sh in shares.split(b"not-the-pin", 2, 4, token="card")]
    assert c.send("alice", wrong[0]).returncode == 0
    r = c.send("bob", wrong[1])
    assert r.returncode == Exit.NOPERM and "refused the PIN" in one_line_error(r), r.stderr
    assert c.flags() & COUNT_LOW  # the one try the card saw
    assert not s.events("unlock")
    # the round starts again (nothing was kept to retry): carol's good share is the first
    r = c.send("carol", c.lines[2])
    assert r.returncode == 0 and b"1 of 2 (carol)" in r.stderr, r.stderr
    assert "in so far: carol" in one_line_error(s.gw(SIGN, b"x"))
    # the k-th good share: the login warns of the wrong PIN before (COUNT_LOW), then signs
    assert b"unlocked with the shares of bob, carol" in c.send("bob", c.lines[1]).stderr
    assert "token card: the token reports a wrong PIN" in s.log
    _signs(c, tmp_path)
    s.stop()
    c.secrets_absent([damaged, _forged(c.lines[1]), *wrong])


@pytest.mark.control("TOK-03")
def test_a_card_share_counts_only_within_the_window(lab: Lab, make_signer: MakeSigner) -> None:
    c = _card(lab, make_signer, 2, window=2)
    assert c.send("alice", c.lines[0]).returncode == 0
    time.sleep(2.5)  # alice's share expires (a window, not a timing assert)
    r = c.send("bob", c.lines[1])
    assert r.returncode == 0 and b"share counted: 1 of 2 (bob)" in r.stderr, r.stderr
    assert "0 of 2" not in one_line_error(c.s.gw(SIGN, b"x"))
    assert b"unlocked with the shares of bob, carol" in c.send("carol", c.lines[2]).stderr
    assert c.s.gw(SIGN, b"x").returncode == 0


@pytest.mark.control("TOK-03")
def test_a_card_takes_the_whole_pin_from_one_custodian_when_not_shared(
        lab: Lab, make_signer: MakeSigner) -> None:
    c = _card(lab, make_signer, 0)
    s = c.s
    err = one_line_error(s.gw(SIGN, b"x"))
    assert "a custodian must run `unlock --token card`" in err, err
    r = s.gw("unlock --token card --share", b"x\n", client=None, custodian="alice")
    assert r.returncode == Exit.USAGE and "without --share" in one_line_error(r)
    r = s.gw("unlock --token nope", c.pin + b"\n", client=None, custodian="alice")
    assert r.returncode == Exit.USAGE and "no such token" in one_line_error(r)
    r = s.gw("unlock --token card", c.pin + b"\n", client="build1")
    assert r.returncode == Exit.NOPERM  # a build client never unlocks
    r = s.gw("unlock --token card", c.pin + b"\n", client=None, custodian="alice")
    assert r.returncode == 0 and r.stderr == b"signer: unlocked\n", r.stderr
    assert s.gw(SIGN, b"x").returncode == 0
    assert [(e["token"], e["custodian"]) for e in s.events("unlock")] == [("card", "alice")]
    s.stop()
    c.secrets_absent()


def test_a_card_whose_pin_comes_from_a_file_is_not_unlocked_by_custodians(
        lab: Lab, make_signer: MakeSigner) -> None:
    label = f"card-file-{secrets.token_hex(3)}"
    pin_file, cert = make_card(lab, label)
    s = with_card(make_signer(start=False), label, pin_file, cert)
    s.start()
    r = s.gw("unlock --token card", pin_file.read_bytes(), client=None, custodian="alice")
    assert r.returncode == Exit.USAGE and "its PIN comes from a file" in one_line_error(r)
    assert s.gw(SIGN, b"x").returncode == 0


@pytest.mark.control("TOK-03")
def test_a_card_back_in_its_reader_is_locked_again(lab: Lab, make_signer: MakeSigner) -> None:
    """Pulled (here: the SoftHSM2 token deleted under the daemon) and plugged back (made
    again, same label and PIN, a new key): the card's profiles fail UNAVAILABLE, and the card
    that comes back is locked until k custodians send their shares again."""
    label = f"card-pull-{secrets.token_hex(3)}"
    pin_file, _cert = make_card(lab, label)
    s = with_card(make_signer(start=False), label, pin_file, None, pin_source="prompt",
                  pin_shares=2)
    s.start()
    c = Card(s, label, pin_file, _cert, 2)
    assert c.send("alice", c.lines[0]).returncode == 0
    assert b"unlocked" in c.send("bob", c.lines[1]).stderr
    assert s.gw(SIGN, b"x").returncode == 0
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label], env=lab.env,
                   check=True, capture_output=True)
    r = s.gw(SIGN, b"x")
    assert r.returncode == Exit.UNAVAILABLE, r.stderr
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin",
                    c.pin.decode(), "--so-pin", secrets.token_hex(8)], env=lab.env,
                   check=True, capture_output=True)
    generate(lab, label, pin_file, "cardkey", None)

    def locked() -> bool:
        r = s.gw(SIGN, b"x")
        return r.returncode == Exit.UNAVAILABLE and b"is locked" in r.stderr

    until(locked, timeout=20)
    assert "token card is back, locked again" in s.log
    assert c.send("carol", c.lines[2]).returncode == 0
    assert b"unlocked with the shares of carol, mallory" in c.send("mallory", c.lines[3]).stderr
    assert s.gw(SIGN, b"x").returncode == 0
    s.stop()
    c.secrets_absent()


@pytest.mark.control("TOK-03")
def test_the_ceremony_splits_a_cards_pin_and_custodians_unlock_it_with_signer_unlock(
        lab: Lab, make_signer: MakeSigner, tmp_path: Path) -> None:
    """`signer pin split --token card`: one file per custodian (age, to their SSH key), whose
    shares name the card; `signer unlock --token card --share` sends each (stdin to ssh) and
    the second unlocks the card; the same shares are refused for the daemon's own token."""
    import shutil

    from tests.signer.test_approvals import _fake_ssh

    if shutil.which("age") is None:
        pytest.skip("age not installed (apt install age)")
    c = _card(lab, make_signer, 2, pin_source="prompt", pin_shares=2)
    out = tmp_path / "shares"
    args: list[str | Path] = ["pin", "split", "--threshold", "2", "--pin-file", c.pin_file,
                              "--out", out, "--token", "card"]
    for who in ("alice", "bob", "carol"):
        args += ["--custodian", f"{who}={lab.custodian(who)}.pub"]
    r = lab.signer(*args)
    assert r.returncode == 0, r.stderr
    assert b"unlock token card; each runs: " in r.stdout
    assert b"unlock --token card --share" in r.stdout and c.pin not in r.stdout + r.stderr
    ssh = _fake_ssh(tmp_path, c.s)

    def opened(who: str) -> bytes:
        got = subprocess.run(["age", "-d", "-i", str(lab.custodian(who)),
                              str(out / f"{who}.share.age")], capture_output=True, check=True)
        return got.stdout

    def unlock(who: str, share: bytes, *token: str) -> subprocess.CompletedProcess[bytes]:
        return lab.signer("unlock", "--host", f"{who}@signer", *token, "--share", "--ssh", ssh,
                          input=share)

    r = unlock("carol", opened("carol"))  # the daemon's own token: not its share
    assert r.returncode == Exit.DATA and b"not the signer's own token" in r.stderr, r.stderr
    r = unlock("carol", opened("carol"), "--token", "card")
    assert r.returncode == 0 and b"share counted: 1 of 2 (carol)" in r.stderr, r.stderr
    r = unlock("alice", opened("alice"), "--token", "card")
    assert r.returncode == 0 and b"unlocked with the shares of alice, carol" in r.stderr
    # the card signs once the daemon's own token is unlocked too (its audit key vouches)
    err = one_line_error(c.s.gw(SIGN, b"x"))
    assert "the signer is locked: 2 more custodians" in err, err
    own = [sh.line() for sh in shares.split(lab.pin_file.read_bytes().strip(), 2, 4)]
    assert c.send("bob", own[1], "").returncode == 0
    assert b"unlocked" in c.send("alice", own[0], "").stderr
    _signs(c, tmp_path)
    c.s.stop()
    c.secrets_absent([opened(w).decode().strip() for w in ("alice", "bob", "carol")])
