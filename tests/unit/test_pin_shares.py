"""The PIN as k-of-n custodian shares, the pure parts: the encoding (signer/shares.py), the
round the token process keeps, and inventory.check's rules for k and n."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signer import shares
from toolkit.runner.inventory_check import pin_share_rules

PIN = b"Nq3uD8sJw1yXo0a7LmZkV5pRb2cTe9Hf"


@settings(max_examples=25, deadline=None)
@given(pin=st.binary(min_size=1, max_size=256), k=st.integers(2, 5), extra=st.integers(0, 3))
def test_any_k_shares_give_the_pin_back(pin: bytes, k: int, extra: int) -> None:
    made = [shares.parse(s.line().encode()) for s in shares.split(pin, k, k + extra)]
    for subset in itertools.islice(itertools.combinations(made, k), 10):
        assert shares.combine(list(subset)) == pin


def test_fewer_than_k_shares_never_combine() -> None:
    made = shares.split(PIN, 3, 5)
    with pytest.raises(shares.ShareError, match="3 distinct shares"):
        shares.combine(made[:2])
    with pytest.raises(shares.ShareError, match="3 distinct shares"):
        shares.combine([made[0], made[0], made[1]])


def test_a_forged_share_does_not_open_the_seal() -> None:
    a, b, _c = shares.split(PIN, 2, 3)
    forged = shares.Share(b.set_id, b.k, b.n, b.index, bytes(16), b.sealed)
    assert shares.parse(forged.line().encode()) == forged  # its checksum is right
    with pytest.raises(shares.ShareError, match="forged, damaged or from another ceremony"):
        shares.combine([a, forged])


def test_a_share_whose_k_was_edited_does_not_open_the_seal() -> None:
    """k and n are bound to the seal: a share rewritten as 2-of-3 from a 3-of-3 set (so that
    two custodians would do) never opens it."""
    made = shares.split(PIN, 3, 3)
    edited = [shares.Share(s.set_id, 2, s.n, s.index, s.value, s.sealed) for s in made]
    with pytest.raises(shares.ShareError):
        shares.combine(edited[:2])


def test_shares_of_two_ceremonies_never_combine() -> None:
    one, two = shares.split(PIN, 2, 2), shares.split(PIN, 2, 2)
    with pytest.raises(shares.ShareError, match="different ceremonies"):
        shares.combine([one[0], two[1]])


@pytest.mark.parametrize("mangle", [
    lambda s: s[:-1] + ("0" if s[-1] != "0" else "1"),  # the checksum
    lambda s: s[:30] + ("x" if s[30] != "x" else "y") + s[31:],  # a character of the body
    lambda s: s.replace("signer-share-1", "signer-share-2"),
    lambda s: s[:60],  # cut
    lambda s: s + ".extra",
    lambda s: "ä" + s,
])
def test_a_damaged_share_is_refused_on_arrival(mangle: object) -> None:
    line = shares.split(PIN, 2, 3)[0].line()
    assert callable(mangle)
    with pytest.raises(shares.ShareError):
        shares.parse(mangle(line).encode())


@pytest.mark.parametrize(("k", "n"), [(1, 3), (0, 3), (4, 3), (2, 256)])
def test_the_ceremony_refuses_k_below_two_or_above_n(k: int, n: int) -> None:
    with pytest.raises(shares.ShareError):
        shares.split(PIN, k, n)


def test_the_round_counts_a_custodian_once_and_forgets_after_the_window() -> None:
    a, b, c = (s.line().encode() for s in shares.split(PIN, 2, 3))
    r = shares.Round()
    assert r.add("alice", a, 2, now=0, window=10) == "added"
    assert r.add("alice", b, 2, now=1, window=10) == "again"  # another's share: still once
    assert not r.ready(2)
    with pytest.raises(shares.ShareError, match="already sent by another custodian"):
        r.add("bob", a, 2, now=2, window=10)
    with pytest.raises(shares.ShareError, match="needs 3"):
        r.add("bob", b, 3, now=2, window=10)
    assert r.add("bob", b, 2, now=11, window=10) == "added"  # alice's share expired at 10
    assert r.custodians(11, 10) == ["bob"] and not r.ready(2)
    assert r.add("carol", c, 2, now=12, window=10) == "added"
    assert r.ready(2)
    assert r.take() == PIN
    assert r.custodians(12, 10) == []


def test_a_round_that_fails_to_combine_starts_again() -> None:
    a, b, _c = shares.split(PIN, 2, 3)
    r = shares.Round()
    r.add("alice", a.line().encode(), 2, 0, 10)
    r.add("bob", shares.Share(b.set_id, 2, 3, b.index, bytes(16), b.sealed).line().encode(),
          2, 0, 10)
    with pytest.raises(shares.ShareError):
        r.take()
    assert r.custodians(0, 10) == []


ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHGlfnL7HQ9ZZUvEfAK/AS64olnaOPLaMuBRspW/ygbE"
SK = ("sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIHGlfnL7HQ9ZZUv"
      "EfAK/AS64olnaOPLaMuBRspW/ygbEAAAABHNzaDo=")
AGE = "age10dsmfn79xyjswgwd5aetjvy7rvu7hamvhk04yqjc9ajtl0keeftstwx48s"
CUSTODIANS = [{"name": "carol", "ssh_key": ED}, {"name": "dave", "ssh_key": ED},
              {"name": "erin", "ssh_key": SK}]
RELEASE = [{"name": "release", "approvals": 2}]


ERIN = {"erin": AGE}


@pytest.mark.parametrize(("source", "k", "holders", "recipients", "expect"), [
    ("prompt", 0, [], {}, []),  # the whole PIN: no shares to check
    ("file", 0, [], {}, []),
    ("prompt", 2, [], ERIN, []),  # 2 of every custodian (3)
    ("prompt", 3, ["carol", "dave", "erin"], ERIN, []),
    ("prompt", 2, ["carol", "dave"], {}, []),  # erin holds no share: her sk- key is no matter
    ("prompt", 1, [], ERIN, ["k >= 2 (release profile 'release')"]),
    ("prompt", 3, ["carol", "dave"], {}, ["3 shares needed but 2 holders"]),
    ("prompt", 4, [], ERIN, ["4 shares needed but 3 holders"]),
    ("file", 2, [], ERIN, ["needs token_pin_source: prompt"]),
    ("prompt", 2, ["carol", "mallory"], {}, ["'mallory' is not in signer_custodians"]),
    ("prompt", 2, ["carol", "carol", "dave"], {}, ["'carol' is listed twice"]),
    ("prompt", 2, [], {}, ["[erin]: the share cannot be encrypted to erin's key"]),
    ("prompt", 2, ["carol", "dave"], {"dave": "age1nope"}, ["[dave]: the share cannot"]),
])
def test_inventory_check_refuses_k_above_n_or_below_two(
        source: str, k: int, holders: list[str], recipients: dict[str, str],
        expect: list[str]) -> None:
    problems = pin_share_rules(source, k, holders, recipients, CUSTODIANS, RELEASE)
    assert len(problems) == len(expect), problems
    for p, e in zip(problems, expect, strict=True):
        assert e in p


def test_the_posture_suite_looks_for_the_marker_every_share_starts_with() -> None:
    """tests/posture may not import the signer: its copy of the marker (in the log search it
    uses) is held equal here, and the marker is what a share line starts with (and no refusal
    message holds)."""
    from toolkit.assurance.log_search import SHARE_MARKER

    assert SHARE_MARKER == f"{shares.PREFIX}.".encode()
    assert shares.split(PIN, 2, 2)[0].line().encode().startswith(SHARE_MARKER)
    with pytest.raises(shares.ShareError) as refused:
        shares.parse(b"not a share")
    assert SHARE_MARKER.decode() not in str(refused.value)


def test_a_cards_shares_name_it_and_count_for_no_other_token() -> None:
    """A card's shares (`--token NAME`) carry its name, bound to the seal: another token's
    round refuses them on arrival, the daemon's own shares are refused by the card's round, and
    a share whose name was edited (checksum made right) never opens the seal."""
    card = shares.split(PIN, 2, 3, token="card")
    lines = [s.line() for s in card]
    assert all(ln.startswith("signer-share-1.") and ln.count(".") == 8 for ln in lines)
    assert shares.combine([shares.parse(ln.encode()) for ln in lines[:2]]) == PIN
    r = shares.Round()
    with pytest.raises(shares.ShareError, match="for token 'card', not the signer's own"):
        r.add("alice", lines[0].encode(), 2, 0, 10)
    with pytest.raises(shares.ShareError, match="for token 'card', not token 'other'"):
        r.add("alice", lines[0].encode(), 2, 0, 10, token="other")
    own = shares.split(PIN, 2, 3)[0].line().encode()
    with pytest.raises(shares.ShareError, match="for the signer's own token, not token 'card'"):
        r.add("alice", own, 2, 0, 10, token="card")
    assert r.add("alice", lines[0].encode(), 2, 0, 10, token="card") == "added"
    renamed = [shares.Share(s.set_id, s.k, s.n, s.index, s.value, s.sealed, "other")
               for s in card]
    with pytest.raises(shares.ShareError, match="forged, damaged or from another ceremony"):
        shares.combine(renamed[:2])
    unnamed = [shares.Share(s.set_id, s.k, s.n, s.index, s.value, s.sealed) for s in card]
    with pytest.raises(shares.ShareError, match="forged, damaged or from another ceremony"):
        shares.combine(unnamed[:2])
    body = lines[0].rsplit(".", 1)[0].replace(".card", ".Card")  # checksum made right
    bad_name = f"{body}.{hashlib.sha256(body.encode()).hexdigest()[:8]}"
    with pytest.raises(shares.ShareError, match="token name"):
        shares.parse(bad_name.encode())
    with pytest.raises(shares.ShareError):
        shares.split(PIN, 2, 3, token="../x")
