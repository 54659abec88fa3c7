"""The token PIN as k-of-n custodian shares (issue 23, points 4 and 5): the real daemon, its
token process and SoftHSM2. k shares unlock and k-1 do not; a custodian counts once; a forged,
damaged or foreign share never reaches the token; a share counts only within the window; the
log says who sent a share and never holds one; the token's PIN flags are read before a try."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from signer import shares
from signer.token import pin_tries
from tests.signer.conftest import MakeSigner, Signer, one_line_error

SIGN = "sign --profile dev --format raw"


def _locked(make_signer: MakeSigner, k: int, window: int = 900) -> tuple[Signer, list[str]]:
    """A daemon that starts locked and takes k shares; the ceremony's shares of its PIN, one
    per custodian (alice, bob, carol, mallory)."""
    s: Signer = make_signer(pin_source="prompt", pin_shares=k, pin_share_window=window)
    pin = s.lab.pin_file.read_bytes().strip()
    return s, [sh.line() for sh in shares.split(pin, k, 4)]


def _share(s: Signer, custodian: str, line: str | bytes) -> subprocess.CompletedProcess[bytes]:
    raw = line.encode() if isinstance(line, str) else line
    return s.gw("unlock --share", raw + b"\n", client=None, custodian=custodian)


def _secrets_absent(s: Signer, lines: list[str]) -> None:
    """Neither the PIN nor any part of a share in the audit log or the daemon's journal."""
    pin = s.lab.pin_file.read_text().strip()
    text = s.audit_log.read_text() + s.log
    assert pin not in text
    assert f"{shares.PREFIX}." not in text  # no share at all, whoever's (the posture marker)
    for line in lines:
        parts = line.split(".")
        for secret in (line, parts[5], parts[6]):  # the whole line, the share, the sealed PIN
            assert secret not in text


@pytest.mark.control("TOK-03")
def test_k_custodians_shares_unlock_and_k_minus_one_do_not(make_signer: MakeSigner) -> None:
    s, lines = _locked(make_signer, 3)
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))
    for i, who in enumerate(("alice", "carol"), 1):
        r = _share(s, who, lines[{"alice": 0, "carol": 2}[who]])
        assert r.returncode == 0, r.stderr
        assert f"share counted: {i} of 3".encode() in r.stderr
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))  # k-1 = 2 shares: still locked
    r = _share(s, "mallory", lines[3])
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"signer: unlocked with the shares of alice, carol, mallory\n"
    assert s.gw(SIGN, b"x").returncode == 0
    assert _share(s, "bob", lines[1]).stderr == b"signer: already unlocked\n"
    # who sent a share, in order; the unlock names the k custodians
    assert [(e["custodian"], e["have"], e["need"]) for e in s.events("unlock-share")] == \
        [("alice", 1, 3), ("carol", 2, 3), ("mallory", 3, 3)]
    assert [e["custodians"] for e in s.events("unlock")] == [["alice", "carol", "mallory"]]
    s.stop()
    _secrets_absent(s, lines)


@pytest.mark.control("TOK-03")
def test_the_same_custodian_twice_counts_once(make_signer: MakeSigner) -> None:
    s, lines = _locked(make_signer, 2)
    assert _share(s, "alice", lines[0]).returncode == 0
    r = _share(s, "alice", lines[0])
    assert r.returncode == 0 and b"already counts (once): 1 of 2" in r.stderr, r.stderr
    r = _share(s, "alice", lines[1])  # bob's share, sent by alice: still alice, still once
    assert r.returncode == 0 and b"1 of 2 (alice)" in r.stderr, r.stderr
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))
    # bob sending alice's share (a copy): refused, it is the same share
    r = _share(s, "bob", lines[0])
    assert r.returncode == 65
    assert "already sent by another custodian" in one_line_error(r)
    r = _share(s, "bob", lines[1])
    assert r.returncode == 0, r.stderr
    assert s.gw(SIGN, b"x").returncode == 0
    assert [e["custodian"] for e in s.events("unlock-share")] == ["alice", "bob"]
    denied = [e for e in s.events("deny") if e.get("custodian") == "bob"]
    assert len(denied) == 1 and "already sent by another custodian" in denied[0]["reason"]
    s.stop()
    _secrets_absent(s, lines)


def _flags(s: Signer) -> int:
    """The token's flags as C_GetTokenInfo gives them now, read in a process of its own."""
    script = ("import sys, pkcs11\n"
              "lib = pkcs11.lib(sys.argv[1])\n"
              "print(int(lib.get_token(token_label=sys.argv[2]).flags))\n")
    from toolkit.local_signer import SOFTHSM_MODULE, TOKEN_LABEL

    r = subprocess.run([sys.executable, "-c", script, str(SOFTHSM_MODULE), TOKEN_LABEL],
                       env=s.lab.env, capture_output=True, text=True, check=True)
    return int(r.stdout)


def _good_login(s: Signer) -> None:
    """A good login clears the token's wrong-PIN flag (other tests give wrong PINs)."""
    script = ("import sys, pkcs11\n"
              "t = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
              "t.open(user_pin=sys.stdin.read().strip()).close()\n")
    from toolkit.local_signer import SOFTHSM_MODULE, TOKEN_LABEL

    subprocess.run([sys.executable, "-c", script, str(SOFTHSM_MODULE), TOKEN_LABEL],
                   env=s.lab.env, input=s.lab.pin_file.read_text(), text=True, check=True)


def _forged(line: str) -> str:
    """The same share number and set, another value, the checksum made right again: what a
    custodian who wants the combination to fail (or to learn something) would send."""
    sh = shares.parse(line.encode())
    other = bytes(b ^ 0x5A for b in sh.value)
    return shares.Share(sh.set_id, sh.k, sh.n, sh.index, other, sh.sealed).line()


@pytest.mark.control("TOK-03")
def test_a_forged_or_damaged_share_fails_without_a_try_on_the_token(
        make_signer: MakeSigner) -> None:
    from pkcs11 import TokenFlag

    s, lines = _locked(make_signer, 2)
    _good_login(s)
    assert not _flags(s) & TokenFlag.USER_PIN_COUNT_LOW
    # damaged in copying: refused on arrival, counts nothing
    damaged = lines[1][:40] + ("A" if lines[1][40] != "A" else "B") + lines[1][41:]
    r = _share(s, "bob", damaged)
    assert r.returncode == 65 and "damaged" in one_line_error(r)
    # from another ceremony (another PIN's shares): refused against the ones already in
    other = shares.split(b"another-pin", 2, 4)
    assert _share(s, "alice", lines[0]).returncode == 0
    r = _share(s, "carol", other[2].line())
    assert r.returncode == 65 and "another ceremony" in one_line_error(r)
    # forged with a right checksum: the k-th share, the seal does not open, nothing is tried
    r = _share(s, "bob", _forged(lines[1]))
    assert r.returncode == 65
    err = one_line_error(r)
    assert "forged, damaged or from another ceremony" in err and "nothing was tried" in err
    assert not _flags(s) & TokenFlag.USER_PIN_COUNT_LOW  # the token saw no wrong PIN
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))
    # the round starts again: alice's share was forgotten with the forged one
    r = _share(s, "bob", lines[1])
    assert r.returncode == 0 and b"1 of 2 (bob)" in r.stderr, r.stderr
    assert _share(s, "alice", lines[0]).returncode == 0
    assert s.gw(SIGN, b"x").returncode == 0
    assert not s.events("unlock-share")[-1].get("share")
    s.stop()
    _secrets_absent(s, [*lines, _forged(lines[1]), damaged])


@pytest.mark.control("TOK-03")
def test_a_share_counts_only_within_the_window(make_signer: MakeSigner) -> None:
    s, lines = _locked(make_signer, 2, window=2)
    assert _share(s, "alice", lines[0]).returncode == 0
    time.sleep(2.5)  # alice's share expires (a window, not a timing assert)
    r = _share(s, "bob", lines[1])
    assert r.returncode == 0 and b"share counted: 1 of 2 (bob)" in r.stderr, r.stderr
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))
    r = _share(s, "carol", lines[2])
    assert r.returncode == 0 and b"unlocked with the shares of bob, carol" in r.stderr
    assert s.gw(SIGN, b"x").returncode == 0


@pytest.mark.control("TOK-03")
def test_a_restart_forgets_the_shares_sent_and_locks_again(make_signer: MakeSigner) -> None:
    """The shares live in the token process's memory only: a restart between two custodians'
    shares starts the round again (the log's `unlock-share` entries, which no checkpoint
    vouches for while locked, do not stop the start), and a restart after the unlock locks."""
    s, lines = _locked(make_signer, 2)
    assert _share(s, "alice", lines[0]).returncode == 0
    s.stop()
    s.start()
    r = _share(s, "bob", lines[1])
    assert r.returncode == 0 and b"share counted: 1 of 2 (bob)" in r.stderr, r.stderr
    assert _share(s, "carol", lines[2]).returncode == 0
    assert s.gw(SIGN, b"x").returncode == 0
    s.stop()
    s.start()
    assert "locked" in one_line_error(s.gw(SIGN, b"x"))
    assert [e["custodian"] for e in s.events("unlock-share")] == ["alice", "bob", "carol"]


@pytest.mark.control("TOK-03")
def test_shares_and_the_whole_pin_are_not_interchangeable(make_signer: MakeSigner) -> None:
    s, lines = _locked(make_signer, 2)
    pin = s.lab.pin_file.read_bytes()
    r = s.gw("unlock", pin, client=None, custodian="alice")
    assert r.returncode == 64 and "unlock --share" in one_line_error(r)
    plain: Signer = make_signer(pin_source="prompt")
    r = _share(plain, "alice", lines[0])
    assert r.returncode == 64 and "without --share" in one_line_error(r)
    r = s.gw("unlock --share", b"", client="build1")
    assert r.returncode == 77


@pytest.mark.parametrize(("flags", "refused", "warned"), [
    (0, False, False),
    (0x10000, False, True),  # CKF_USER_PIN_COUNT_LOW: a wrong PIN since the last good one
    (0x10000 | 0x20000, True, False),  # CKF_USER_PIN_FINAL_TRY
    (0x40000, True, False),  # CKF_USER_PIN_LOCKED
])
def test_the_pin_is_never_tried_when_one_try_is_left(flags: int, refused: bool,
                                                     warned: bool) -> None:
    why, warning = pin_tries(flags)
    assert (why is not None) is refused
    assert (warning is not None) is warned


@pytest.mark.control("TOK-03")
def test_a_wrong_pin_sets_the_tokens_flag_and_the_next_unlock_warns(
        make_signer: MakeSigner) -> None:
    """What SoftHSM2 reports for real: CKF_USER_PIN_COUNT_LOW after a wrong PIN (it never
    sets FINAL_TRY or LOCKED: it counts nothing; the refusal is proven on the flags above). The
    daemon reads the flags before the login and says so in its journal."""
    from pkcs11 import TokenFlag

    s: Signer = make_signer(pin_source="prompt")
    _good_login(s)
    r = s.gw("unlock", b"000000\n", client=None, custodian="alice")
    assert r.returncode == 77
    assert _flags(s) & TokenFlag.USER_PIN_COUNT_LOW
    r = s.gw("unlock", s.lab.pin_file.read_bytes(), client=None, custodian="alice")
    assert r.returncode == 0, r.stderr
    assert "CKF_USER_PIN_COUNT_LOW" in s.log
    assert not _flags(s) & TokenFlag.USER_PIN_COUNT_LOW


def test_the_ceremony_gives_each_custodian_a_share_only_their_key_opens(
        make_signer: MakeSigner, tmp_path: Path) -> None:
    """`signer pin split`: one file per custodian, encrypted to their SSH key (age); another
    custodian's key does not open it; the files hold no share in clear; two opened shares
    unlock the daemon."""
    import shutil

    if shutil.which("age") is None:
        pytest.skip("age not installed (apt install age)")
    s: Signer = make_signer(pin_source="prompt", pin_shares=2)
    lab = s.lab
    out = tmp_path / "shares"
    args: list[str | Path] = ["pin", "split", "--threshold", "2", "--pin-file", lab.pin_file,
                              "--out", out]
    for who in ("alice", "bob", "carol"):
        args += ["--custodian", f"{who}={lab.custodian(who)}.pub"]
    r = lab.signer(*args)
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{w}.share.age" for w in ("alice", "bob", "carol")]
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    assert all(shares.PREFIX.encode() not in f.read_bytes() for f in files)
    assert lab.pin_file.read_bytes().strip() not in r.stdout + r.stderr

    def opened(who: str, key: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["age", "-d", "-i", str(lab.custodian(key)),
                               str(out / f"{who}.share.age")], capture_output=True,
                              check=False)

    assert opened("alice", "bob").returncode != 0  # bob's key does not open alice's share
    again = lab.signer(*args)
    assert again.returncode != 0 and b"exists" in again.stderr  # no silent second ceremony
    for who in ("carol", "alice"):
        got = opened(who, who)
        assert got.returncode == 0, got.stderr
        r = _share(s, who, got.stdout.strip())
        assert r.returncode == 0, r.stderr
    assert s.gw(SIGN, b"x").returncode == 0
    r = lab.signer("pin", "split", "--threshold", "1", "--pin-file", lab.pin_file, "--out",
                   tmp_path / "one", "--custodian", f"alice={lab.custodian('alice')}.pub")
    assert r.returncode == 64 and b"k=1" in r.stderr


@pytest.mark.parametrize(("daemon", "problem"), [
    ({"pin_source": "prompt", "pin_shares": 1}, "daemon.pin_shares: must be 0"),
    ({"pin_shares": 2}, "daemon.pin_shares: needs pin_source = 'prompt'"),
    ({"pin_source": "prompt", "pin_shares": 5}, "daemon.pin_shares: needs 5 custodians, 4"),
    ({"pin_source": "prompt", "pin_shares": 2, "pin_share_window": 0},
     "daemon.pin_share_window: must be >= 1"),
])
def test_config_check_refuses_shares_that_could_never_or_too_easily_unlock(
        make_signer: MakeSigner, daemon: dict[str, Any], problem: str) -> None:
    s: Signer = make_signer(start=False, **daemon)
    r = s.lab.signer("config", "check", s.config)
    assert r.returncode == 78
    assert problem in r.stderr.decode()


class _CountingToken:
    """The real SoftHSM2 token, with the flags a card shows when one try is left added to what
    it reports (SoftHSM2 never sets them), and its logins counted."""

    def __init__(self, real: Any, extra: int) -> None:
        self._real, self._extra, self.opened = real, extra, 0
        self.slot = self

    def get_token(self) -> Any:
        fresh = self._real.slot.get_token()

        class _Flags:
            flags = int(fresh.flags) | self._extra

        return _Flags()

    def open(self, **kw: Any) -> Any:
        self.opened += 1
        return self._real.open(**kw)


@pytest.mark.control("TOK-03")
@pytest.mark.parametrize(("extra", "tried"), [(0x20000, False), (0x40000, False), (0, True)])
def test_login_never_reaches_the_token_when_one_try_is_left(
        make_signer: MakeSigner, monkeypatch: pytest.MonkeyPatch, extra: int,
        tried: bool) -> None:
    """The wiring of `pin_tries` into Token.login, on the real token: with FINAL_TRY or LOCKED
    reported, C_Login is never called (the right PIN is given: only the flags stop it)."""
    from signer.errors import SignerError
    from signer.token import Token
    from toolkit.local_signer import SOFTHSM_MODULE, TOKEN_LABEL

    s: Signer = make_signer(start=False)
    monkeypatch.setenv("SOFTHSM2_CONF", s.lab.env["SOFTHSM2_CONF"])
    token = Token(SOFTHSM_MODULE, TOKEN_LABEL)
    counting = _CountingToken(token._token, extra)
    token._token = counting
    pin = s.lab.pin_file.read_text().strip()
    if tried:
        token.login(pin)
        assert token.logged_in
    else:
        with pytest.raises(SignerError) as refused:
            token.login(pin)
        assert refused.value.code == 77
        assert "PIN_FINAL_TRY" in refused.value.message or "LOCKED" in refused.value.message
    assert counting.opened == int(tried)
    token.close()
