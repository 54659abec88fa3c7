"""What one `invoke harden` run does to a host that drifted, two ways at once (one check-mode run
and one real run serve both tests: a harden run costs minutes on an emulated guest).

- KRN-01: a hardened value changed on the host behind the toolkit's back is seen by the check
  mode without changing anything, then put back by the next harden, which reports it as a change.
- BASE-07: after the pipeline's harden and deploy nothing under the hardened paths is left for
  the daily check; a harden run that finds a file nobody installed under /etc/ssh logs it and
  leaves it reported, and takes in a file it writes itself (an audit rules file it puts back,
  whose absence the baseline had recorded).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab.target import Target
from tests.lab.aide import HELPER, limit, root
from toolkit.runner.ansible_run import PlaybookResult, PlayOptions, build_command, run_playbook

pytestmark = [pytest.mark.lab, pytest.mark.slow]

RULES = "/etc/audit/rules.d/90-signhost.rules"
SYSCTL = "kernel.kptr_restrict"




@dataclass
class Runs:
    """What the shared runs found; each test asserts its part."""

    aide: bool  # base_aide on in this inventory: the BASE-07 half ran
    sysctl_before: str = ""
    sysctl_after_check: str = ""
    sysctl_after_fix: str = ""
    check: PlaybookResult | None = None
    fix: PlaybookResult | None = None
    fix_log: str = ""
    stray: str = ""
    hardened_before: tuple[int, str] = (0, "")  # compare under the hardened paths, before
    rules_back: str = ""
    journal: str = ""
    hardened_after: tuple[int, str] = (0, "")  # ... after the run
    hardened_clean: tuple[int, str] = (0, "")  # ... after the clean-up


@pytest.fixture(scope="module")
def runs(target: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("harden-runs")
    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    inv, vault = target.inventory, target.vault_password_file
    r = Runs(aide=bool(target.values["base_aide"]))
    hardened = [str(p) for p in target.values["base_aide_hardened_paths"]] if r.aide else []
    r.stray = f"/etc/ssh/out-of-band-{uuid.uuid4().hex[:8]}"
    kept = f"/root/{os.path.basename(RULES)}.kept"
    tags = "preflight,kernel-sysctl" + (",BASE-07,auditd-rules" if r.aide else "")

    def compare() -> tuple[int, str]:
        c = target.admin_run(f"{HELPER} compare {limit(hardened)}", sudo=True)
        return c.returncode, str(c.stdout)

    r.sysctl_before = root(target, f"/usr/sbin/sysctl -n {SYSCTL}")
    if r.aide:
        r.hardened_before = compare()
    try:
        # The file on disk stays as harden wrote it: only the running kernel drifts.
        root(target, f"/usr/sbin/sysctl -q -w {SYSCTL}=0")
        if r.aide:
            # The host without the rules file, and a baseline that says so: the file harden
            # puts back differs after the run and not before it, so it is harden's own.
            root(target, f"cp -p {RULES} {kept} && echo 'not from the toolkit' > {r.stray}")
            root(target, f"rm {RULES} && {HELPER} take {limit(['/etc/audit/rules.d', RULES], False)}")
        r.check = run_playbook(build_command("harden.yml", PlayOptions(
                                   tags="preflight,kernel-sysctl", check=True, inventory=inv,
                                   vault_password_file=vault)), tmp / "check.log")
        r.sysctl_after_check = root(target, f"/usr/sbin/sysctl -n {SYSCTL}")
        since = root(target, "date +%s")
        r.fix = run_playbook(build_command("harden.yml", PlayOptions(
                                 tags=tags, inventory=inv, vault_password_file=vault)),
                             tmp / "harden.log")
        r.fix_log = " ".join(r.fix.log.read_text().split())  # the callback folds long lines
        r.sysctl_after_fix = root(target, f"/usr/sbin/sysctl -n {SYSCTL}")
        if r.aide:
            r.rules_back = root(target, f"test -s {RULES} && echo back || true")
            r.journal = root(target, f"journalctl -q -o cat -t signhost-harden --since @{since}")
            r.hardened_after = compare()
    finally:
        target.admin_run("/usr/sbin/sysctl -q --system", sudo=True)
        if r.aide:
            target.admin_run(f"test -e {RULES} || cp -p {kept} {RULES}; rm -f {r.stray} {kept}",
                             sudo=True)
            root(target, f"{HELPER} take {limit(['/etc/ssh', r.stray], False)}")
            r.hardened_clean = compare()
    yield r


@pytest.mark.control("KRN-01")
def test_a_sysctl_changed_by_hand_is_put_back_by_harden(runs: Runs) -> None:
    assert runs.sysctl_before == "2", "not hardened yet"
    assert runs.check is not None and runs.fix is not None
    [check] = runs.check.controls
    assert runs.check.returncode == 0 and "KRN-01" in check.changed(), \
        "check mode did not see the drift"
    assert runs.sysctl_after_check == "0", "check mode changed the host"
    [fix] = runs.fix.controls
    assert runs.fix.returncode == 0, runs.fix_log[-3000:]
    assert "KRN-01" in fix.changed(), "harden did not report the drift"
    assert runs.sysctl_after_fix == "2"


@pytest.mark.control("BASE-07")
def test_harden_takes_its_own_changes_and_leaves_one_it_found_reported(runs: Runs) -> None:
    if not runs.aide:
        pytest.skip("AIDE is off in this inventory (base_aide)")
    rc, out = runs.hardened_before
    assert rc == 0, f"harden and deploy left differences under the hardened paths: {out}"
    assert runs.fix is not None and runs.fix.returncode == 0, runs.fix_log[-3000:]
    assert runs.rules_back == "back"
    assert "differed from the AIDE baseline before harden" in runs.fix_log \
        and runs.stray in runs.fix_log, runs.fix_log[-3000:]
    assert runs.stray in runs.journal, runs.journal
    rc, out = runs.hardened_after
    assert rc == 1 and set(out.split()) == {"/etc/ssh", runs.stray}, \
        f"want only the stray file and its directory still reported: {out}"
    rc, out = runs.hardened_clean
    assert rc == 0, f"still differs after the clean-up: {out}"
