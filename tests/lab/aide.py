"""The AIDE baseline helper on the host under test, as the lab tests drive it (BASE-07)."""

from __future__ import annotations

import re
import shlex

from lab.target import Target

HELPER = "/usr/local/sbin/signhost-aide-baseline"


def root(target: Target, command: str) -> str:
    """`command` as root on the host; its output, or the test fails with what it printed."""
    r = target.admin_run(command, sudo=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(r.stdout).strip()


def limit(paths: list[str], whole: bool = True) -> str:
    """AIDE's --limit for these paths (shell-quoted): what is under them (whole) or exactly them."""
    tail = "(/|$)" if whole else "$"
    return shlex.quote("^(" + "|".join(re.escape(p) for p in paths) + ")" + tail)
