"""The AIDE baseline is not a laundry (BASE-07): a change under a deployed path that deploy did
not make stops `invoke deploy` before anything is re-baselined, and only the operator's
explicit, logged decision (`--accept-aide-changes`) takes it in."""

from __future__ import annotations

import os
import re
import shlex
import uuid
from pathlib import Path

import pytest

from lab.target import Target
from toolkit.runner.ansible_run import PlayOptions, build_command, run_playbook

pytestmark = pytest.mark.lab


def _root(target: Target, command: str) -> str:
    r = target.admin_run(command, sudo=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(r.stdout).strip()


@pytest.mark.slow
@pytest.mark.control("BASE-07")
def test_deploy_refuses_a_change_it_did_not_make_and_keeps_the_baseline(  # type: ignore[no-untyped-def]
        target: Target, tmp_path) -> None:
    db = shlex.quote(str(target.values["base_aide_database"]))
    cert_dir = str(target.values["signer_cert_dir"])
    assert target.admin_run(f"test -d {shlex.quote(cert_dir)}", sudo=True).returncode == 0, \
        f"{cert_dir} is missing: run `invoke deploy` on this lab first"
    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    inv, vault = target.inventory, target.vault_password_file
    # Only the BASE-07 steps (tagged `always`, they run whatever the tags): a full deploy would
    # prove nothing more here and take minutes on an emulated guest.
    baseline = _root(target, f"sha256sum {db}")
    stray = f"{cert_dir}/out-of-band-{uuid.uuid4().hex[:8]}.pem"
    _root(target, f"echo 'not from the toolkit' > {shlex.quote(stray)}")
    try:
        refused = run_playbook(build_command("deploy.yml", PlayOptions(
                                   tags="BASE-07", inventory=inv, vault_password_file=vault)),
                               tmp_path / "refused.log")
        log = " ".join(refused.log.read_text().split())  # the callback folds long messages
        assert refused.returncode != 0, "deploy took a change it did not make"
        assert "differ from the AIDE baseline and this deploy has not changed" in log \
            and stray in log, log[-3000:]
        assert _root(target, f"sha256sum {db}") == baseline, "the refused deploy re-baselined"
    finally:
        _root(target, f"rm -f {shlex.quote(stray)}")

    # Gone again, the stray file still left the directory's times changed: deploy still
    # refuses until the operator accepts exactly that, and the acceptance is logged.
    since = _root(target, "date +%s")
    accepted = run_playbook(
        build_command("deploy.yml", PlayOptions(
            tags="BASE-07", extra_vars={"base_aide_accept_changes": [cert_dir]}, inventory=inv,
            vault_password_file=vault)),
        tmp_path / "accepted.log")
    assert accepted.returncode == 0, accepted.log.read_text()[-3000:]
    assert _root(target, f"sha256sum {db}") != baseline, "the accepted change was not taken in"
    journal = _root(target, f"journalctl -q -o cat -t signhost-deploy --since @{since}")
    assert "accepted differences from the AIDE baseline" in journal and cert_dir in journal, \
        journal
    helper = "/usr/local/sbin/signhost-aide-baseline"
    clean = target.admin_run(
        f"{helper} compare {shlex.quote('^(' + re.escape(cert_dir) + ')(/|$)')}",
        sudo=True)
    assert clean.returncode == 0, f"still differs after the accepted deploy: {clean.stdout}"


def _limit(paths: list[str], whole: bool = True) -> str:
    """AIDE's --limit for these paths: what is under them (whole) or exactly them."""
    tail = "(/|$)" if whole else "$"
    return shlex.quote("^(" + "|".join(re.escape(p) for p in paths) + ")" + tail)


HELPER = "/usr/local/sbin/signhost-aide-baseline"


@pytest.mark.slow
@pytest.mark.control("BASE-07")
def test_harden_takes_its_own_changes_and_leaves_one_it_found_reported(
        target: Target, tmp_path: Path) -> None:
    """After the pipeline's harden and deploy, nothing under the hardened paths is left for the
    daily check. Then a harden run that finds a file nobody installed under /etc/ssh logs it and
    leaves it reported, and takes in a file it writes itself (an audit rules file it puts
    back, whose absence the baseline had recorded)."""
    if not target.values["base_aide"]:
        pytest.skip("AIDE is off in this inventory (base_aide)")
    hardened = [str(p) for p in target.values["base_aide_hardened_paths"]]
    limit = _limit(hardened)
    before = target.admin_run(f"{HELPER} compare {limit}", sudo=True)
    assert before.returncode == 0, \
        f"harden and deploy left differences under the hardened paths: {before.stdout}"

    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    inv, vault = target.inventory, target.vault_password_file
    stray = f"/etc/ssh/out-of-band-{uuid.uuid4().hex[:8]}"
    rules = "/etc/audit/rules.d/90-signhost.rules"
    kept = f"/root/{os.path.basename(rules)}.kept"
    _root(target, f"cp -p {rules} {kept} && echo 'not from the toolkit' > {stray}")
    try:
        # The host without the rules file, and a baseline that says so: the file harden puts
        # back differs after the run and not before it, so it is harden's own.
        _root(target, f"rm {rules} && {HELPER} take {_limit(['/etc/audit/rules.d', rules], False)}")
        since = _root(target, "date +%s")
        run = run_playbook(build_command("harden.yml", PlayOptions(
                               tags="BASE-07,auditd-rules", inventory=inv,
                               vault_password_file=vault)),
                           tmp_path / "harden.log")
        log = " ".join(run.log.read_text().split())
        assert run.returncode == 0, log[-3000:]
        assert _root(target, f"test -s {rules} && echo back") == "back"
        assert "differed from the AIDE baseline before harden" in log and stray in log, \
            log[-3000:]
        journal = _root(target, f"journalctl -q -o cat -t signhost-harden --since @{since}")
        assert stray in journal, journal
        after = target.admin_run(f"{HELPER} compare {limit}", sudo=True)
        left = set(str(after.stdout).split())
        assert after.returncode == 1 and left == {"/etc/ssh", stray}, \
            f"want only the stray file and its directory still reported: {after.stdout}"
    finally:
        target.admin_run(f"test -e {rules} || cp -p {kept} {rules}; rm -f {stray} {kept}",
                         sudo=True)
        _root(target, f"{HELPER} take {_limit(['/etc/ssh', stray], False)}")
    clean = target.admin_run(f"{HELPER} compare {limit}", sudo=True)
    assert clean.returncode == 0, f"still differs after the clean-up: {clean.stdout}"


@pytest.mark.slow
@pytest.mark.control("BASE-07")
def test_a_deploy_that_failed_part_way_can_be_run_again(  # type: ignore[no-untyped-def]
        target: Target, tmp_path) -> None:
    """Issue 22: a deploy that wrote a file and then failed records what it wrote; the same
    deploy again recognises it and goes through (taking it into the baseline), while the same
    file changed by someone else after the failure stops that deploy as any change would."""
    config_dir = str(Path(str(target.values["signer_config"])).parent)
    written = f"{config_dir}/selftest-partial-deploy"
    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    inv, vault = target.inventory, target.vault_password_file
    limit = _limit([config_dir])
    assert target.admin_run(f"{HELPER} compare {limit}", sudo=True).returncode == 0, \
        f"{config_dir} differs from the baseline before the test: run `invoke deploy` first"

    def deploy(name: str) -> tuple[int, str]:
        r = run_playbook(build_command("deploy.yml", PlayOptions(
                             tags="SGN-08", extra_vars={"signer_selftest_fail_once": True},
                             inventory=inv, vault_password_file=vault)),
                         tmp_path / f"{name}.log")
        return r.returncode, " ".join(r.log.read_text().split())

    try:
        rc, log = deploy("failed")
        assert rc != 0 and "failing on purpose after writing a file" in log, log[-3000:]
        assert "recorded what it wrote" in log and written in log, log[-3000:]
        # the file and its directory (one more entry in it), each with what it holds (and what
        # else the run wrote before it failed: the venv's byte code of the config check)
        assert {config_dir, written} <= set(_root(target, f"{HELPER} own").splitlines())

        # Someone changes the failed run's file: the record no longer matches, deploy stops.
        content = _root(target, f"cat {shlex.quote(written)}")
        _root(target, f"echo tampered >> {shlex.quote(written)}")
        rc, log = deploy("tampered")
        assert rc != 0 and "this deploy has not changed anything yet" in log \
            and written in log, log[-3000:]

        # As the failed run left it (same content, mode, owner): the same deploy goes through.
        _root(target, f"printf '%s\\n' {shlex.quote(content)} > {shlex.quote(written)}")
        rc, log = deploy("again")
        assert rc == 0, log[-3000:]
        assert "written by an earlier deploy that failed part way" in log, log[-3000:]
        assert target.admin_run(f"{HELPER} compare {limit}", sudo=True).returncode == 0, \
            "the failed run's file is still outside the baseline"
        assert _root(target, f"{HELPER} own") == "", "the record outlived the deploy that took it"
    finally:
        # whatever a failed assertion left: the test's own writes, exactly, into the baseline
        own = set(_root(target, f"{HELPER} own").splitlines()) | {config_dir, written}
        _root(target, f"rm -f {shlex.quote(written)} && "
                      f"{HELPER} take {_limit(sorted(own), whole=False)} && {HELPER} clear")
