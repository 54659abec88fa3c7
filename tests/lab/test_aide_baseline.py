"""The AIDE baseline is not a laundry (BASE-07): a change under a deployed path that deploy did
not make stops `invoke deploy` before anything is re-baselined, and only the operator's
explicit, logged decision (`--accept-aide-changes`) takes it in."""

from __future__ import annotations

import os
import re
import shlex
import uuid

import pytest

from lab.target import Target
from toolkit.runner.ansible_run import build_command, run_playbook

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
        refused = run_playbook(build_command("deploy.yml", tags="BASE-07", inventory=inv,
                                             vault_password_file=vault),
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
        build_command("deploy.yml", tags="BASE-07",
                      extra_vars={"base_aide_accept_changes": [cert_dir]}, inventory=inv,
                      vault_password_file=vault),
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
