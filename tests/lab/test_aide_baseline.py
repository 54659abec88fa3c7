"""The AIDE baseline is not a laundry (BASE-07): a change under a deployed path that deploy did
not make stops `invoke deploy` before anything is re-baselined, and only the operator's
explicit, logged decision (`--accept-aide-changes`) takes it in."""

from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path

import pytest

from lab.target import Target
from tests.lab.aide import HELPER, limit, root
from toolkit.runner.ansible_run import PlayOptions, build_command, run_playbook

pytestmark = pytest.mark.lab






@pytest.mark.slow
@pytest.mark.control("BASE-07")
def test_deploy_stops_on_changes_it_did_not_make_and_runs_again_after_its_own_failure(
        target: Target, tmp_path: Path) -> None:
    """Three tagged deploys share one story (each full deploy costs minutes on an emulated guest):

    1. a deploy that writes a file and then fails records what it wrote (issue 22);
    2. someone then changes that file and drops a stray file under the certificates' directory:
       the same deploy stops on both before anything is re-baselined (the AIDE database is
       unchanged), naming each;
    3. the file put back as the failed run left it and the stray removed (its directory's times
       still changed), the deploy with the operator's acceptance of exactly that directory goes
       through: it takes the failed run's file in as its own, logs the acceptance on the host,
       and leaves nothing differing and no record behind.
    """
    config_dir = str(Path(str(target.values["signer_config"])).parent)
    cert_dir = str(target.values["signer_cert_dir"])
    written = f"{config_dir}/selftest-partial-deploy"
    stray = f"{cert_dir}/out-of-band-{uuid.uuid4().hex[:8]}.pem"
    db = shlex.quote(str(target.values["base_aide_database"]))
    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    inv, vault = target.inventory, target.vault_password_file
    assert target.admin_run(f"test -d {shlex.quote(cert_dir)}", sudo=True).returncode == 0, \
        f"{cert_dir} is missing: run `invoke deploy` on this lab first"
    both = limit([config_dir, cert_dir])
    assert target.admin_run(f"{HELPER} compare {both}", sudo=True).returncode == 0, \
        f"{config_dir} or {cert_dir} differs from the baseline before the test: run `invoke deploy`"

    def deploy(name: str, **extra: object) -> tuple[int, str]:
        r = run_playbook(build_command("deploy.yml", PlayOptions(
                             tags="SGN-08",
                             extra_vars={"signer_selftest_fail_once": True, **extra},
                             inventory=inv, vault_password_file=vault)),
                         tmp_path / f"{name}.log")
        return r.returncode, " ".join(r.log.read_text().split())  # the callback folds lines

    try:
        rc, log = deploy("failed")
        assert rc != 0 and "failing on purpose after writing a file" in log, log[-3000:]
        assert "recorded what it wrote" in log and written in log, log[-3000:]
        # the file and its directory (one more entry in it), each with what it holds (and what
        # else the run wrote before it failed: the venv's byte code of the config check)
        assert {config_dir, written} <= set(root(target, f"{HELPER} own").splitlines())

        # The failed run's file changed by someone (the record no longer matches) and a file
        # nobody deployed: deploy stops on both, and the baseline stays as it was.
        baseline = root(target, f"sha256sum {db}")
        content = root(target, f"cat {shlex.quote(written)}")
        root(target, f"echo tampered >> {shlex.quote(written)} && "
                      f"echo 'not from the toolkit' > {shlex.quote(stray)}")
        rc, log = deploy("refused")
        assert rc != 0, "deploy took changes it did not make"
        assert "differ from the AIDE baseline and this deploy has not changed anything yet" \
            in log and written in log and stray in log, log[-3000:]
        assert root(target, f"sha256sum {db}") == baseline, "the refused deploy re-baselined"

        # As the failed run left it (same content, mode, owner), the stray gone: the directory's
        # changed times still stop a deploy until the operator accepts exactly that.
        root(target, f"printf '%s\\n' {shlex.quote(content)} > {shlex.quote(written)} && "
                      f"rm -f {shlex.quote(stray)}")
        since = root(target, "date +%s")
        rc, log = deploy("accepted", base_aide_accept_changes=[cert_dir])
        assert rc == 0, log[-3000:]
        assert "written by an earlier deploy that failed part way" in log, log[-3000:]
        assert root(target, f"sha256sum {db}") != baseline, "the accepted change was not taken in"
        journal = root(target, f"journalctl -q -o cat -t signhost-deploy --since @{since}")
        assert "accepted differences from the AIDE baseline" in journal and cert_dir in journal, \
            journal
        clean = target.admin_run(f"{HELPER} compare {both}", sudo=True)
        assert clean.returncode == 0, f"still differs after the accepted deploy: {clean.stdout}"
        assert root(target, f"{HELPER} own") == "", "the record outlived the deploy that took it"
    finally:
        # whatever a failed assertion left: the test's own writes, exactly, into the baseline
        own = set(root(target, f"{HELPER} own").splitlines()) | {config_dir, written, cert_dir}
        root(target, f"rm -f {shlex.quote(written)} {shlex.quote(stray)} && "
                      f"{HELPER} take {limit(sorted(own), whole=False)} && {HELPER} clear")
