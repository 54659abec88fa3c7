"""Budgets, freezes and thaws; the policy state survives a restart because it is the log."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.signer.conftest import MakeSigner, Signer, one_line_error
from toolkit.local_signer import sign_over_socket


@pytest.mark.control("SGN-03")
def test_budget_exceeded_freezes_the_profile_until_a_custodian_thaws_it(signer: Signer) -> None:
    for _ in range(3):
        assert signer.gw("sign --profile small --format raw", b"x").returncode == 0
    r = signer.gw("sign --profile small --format raw", b"x")
    assert r.returncode == 77
    assert "budget of 3 signatures per 3600 s exhausted" in one_line_error(r)
    r = signer.gw("sign --profile small --format raw", b"x")
    assert r.returncode == 77 and "is frozen" in one_line_error(r)
    # The other profiles on the same key are not affected.
    assert signer.gw("sign --profile dev --format raw", b"x").returncode == 0
    # A client cannot thaw; a custodian can, and the window starts again.
    assert signer.gw("thaw small", client="build1").returncode == 77
    r = signer.gw("thaw small", custodian="alice")
    assert r.returncode == 0, r.stderr
    for _ in range(3):
        assert signer.gw("sign --profile small --format raw", b"x").returncode == 0
    assert signer.gw("sign --profile small --format raw", b"x").returncode == 77
    events = [e["event"] for e in signer.entries() if e.get("profile") == "small"]
    assert events == ["sign"] * 3 + ["budget-exceeded", "deny", "deny", "deny", "thaw"] + \
        ["sign"] * 3 + ["budget-exceeded", "deny"]


@pytest.mark.control("SGN-03")
def test_freeze_and_budget_survive_a_restart(signer: Signer) -> None:
    for _ in range(2):
        assert signer.gw("sign --profile small --format raw", b"x").returncode == 0
    assert signer.gw("freeze dev", custodian="mallory").returncode == 0
    signer.stop()
    signer.start()
    r = signer.gw("sign --profile dev --format raw", b"x")
    assert r.returncode == 77 and "frozen" in one_line_error(r)
    assert signer.gw("sign --profile small --format raw", b"x").returncode == 0
    r = signer.gw("sign --profile small --format raw", b"x")
    assert r.returncode == 77 and "budget" in one_line_error(r)


@pytest.mark.control("SGN-03")
def test_only_a_custodian_of_the_profile_thaws_it(signer: Signer) -> None:
    assert signer.gw("freeze release", custodian="mallory").returncode == 0
    r = signer.gw("thaw release", custodian="mallory")
    assert r.returncode == 77
    assert "not a custodian of profile 'release'" in one_line_error(r)
    assert signer.gw("thaw release", custodian="bob").returncode == 0


@pytest.mark.control("SGN-03")
def test_budget_holds_under_a_concurrent_burst(make_signer: MakeSigner) -> None:
    s: Signer = make_signer(profile_overrides={"small": {"budget_count": 5}})

    def one(i: int) -> int:
        code, _msg, _payload = sign_over_socket(s.socket, "small", b"burst %d" % i, fmt="raw")
        return code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(one, range(24)))
    assert codes.count(0) == 5
    assert set(codes) == {0, 77}
    assert len(s.events("sign")) == 5
    assert len(s.events("budget-exceeded")) == 1
