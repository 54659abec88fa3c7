"""CI's record of the toolkit's own tests, as evidence for controls no test can prove on a host.

Some controls are the signer's behaviour (a release needs M approvals, a budget freezes a
profile): no posture test can exercise them on a production host without side effects, so the
toolkit's tests prove them in CI (tests/signer, tests/unit, tests/lab). A report that calls such a
control proven must point at a run of those tests, for the toolkit commit that was deployed, in
which they passed; "CI proves it" without that record is a claim.

Two halves:
- a pytest plugin (`pytest -p toolkit.controls.ci_record --junitxml FILE`, as the CI pipeline
  runs the unit and lab tests) that writes the toolkit's commit, and whether the tree had
  uncommitted changes, into the JUnit file's properties, so the file says what it is a record of;
- `load()`, which `invoke verify --ci-evidence FILE` uses: it reads such files and gives the
  outcome of each test, or the reason the record cannot vouch for this toolkit (another commit,
  uncommitted changes on either side, no commit recorded).

The JUnit files are CI's own artefacts, read with the standard library's parser (expat refuses
entity expansion attacks since Python 3.7.1 with expat 2.4.1); nothing in them is executed.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET  # our own CI artefacts (see the docstring)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FORMAT = "signhost-ci-record/1"
PROPS = ("ci_record", "toolkit_commit", "toolkit_dirty")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def toolkit_state() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes to tracked files), None where git cannot say."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "HEAD"), (bool(status) if status is not None else None)


# --- the pytest plugin -------------------------------------------------------------------------

def pytest_sessionstart(session: Any) -> None:
    """Stamp the JUnit file (when one is written) with what it is a record of. (At session
    start: the junitxml plugin has made its writer by then, whatever the plugin order.)"""
    from _pytest.junitxml import xml_key

    xml = session.config.stash.get(xml_key, None)
    if xml is None:
        return
    commit, dirty = toolkit_state()
    xml.add_global_property("ci_record", FORMAT)
    xml.add_global_property("toolkit_commit", commit or "")
    xml.add_global_property("toolkit_dirty", "unknown" if dirty is None else str(dirty).lower())


# --- reading records ---------------------------------------------------------------------------

class RecordError(Exception):
    """A file given as CI evidence that is not one (missing, not JUnit, not stamped)."""


@dataclass
class Evidence:
    """What the given records say, and whether they can vouch for this toolkit."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # base node id -> outcome
    usable: bool = False
    why: str = "no CI record was given (invoke verify --ci-evidence FILE)"

    def describe(self) -> str:
        return "; ".join(f"{s['file']} (commit {str(s['commit'])[:12]}, {s['tests']} tests, "
                         f"{s['failed']} failed)" for s in self.sources) or "none"

    def as_dict(self) -> dict[str, Any]:
        return {"usable": self.usable, "why": self.why, "sources": self.sources}


_WORSE = {"failed": 3, "passed": 2, "skipped": 1}


def _merge(outcomes: dict[str, str], node: str, outcome: str) -> None:
    """A test (all its parameters, in all records) passed only if no case failed and one ran."""
    if node not in outcomes or _WORSE[outcome] > _WORSE[outcomes[node]]:
        outcomes[node] = outcome


def _nodeid(classname: str, name: str) -> str:
    """pytest's node id (parameters dropped) from JUnit's classname and name.

    classname is the module's dotted path, then any test classes: tests.signer.test_x.TestY.
    The module part is the longest prefix that is a file under the project."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (ROOT / path).is_file():
            return "::".join([path, *parts[cut:], name.split("[", 1)[0]])
    return "::".join(["/".join(parts) + ".py", name.split("[", 1)[0]])


def read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(the record's stamp and counts, outcome per base node id) of one JUnit file."""
    try:
        root = ET.parse(path).getroot()  # noqa: S314 - see the module docstring
    except (OSError, ET.ParseError) as exc:
        raise RecordError(f"{path}: not a readable JUnit XML file ({exc})") from exc
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    if not suites:
        raise RecordError(f"{path}: no <testsuite> in it: not a pytest JUnit file")
    props: dict[str, str] = {}
    outcomes: dict[str, str] = {}
    tests = failed = 0
    for suite in suites:
        for p in suite.iter("property"):
            if p.get("name") in PROPS:
                props[str(p.get("name"))] = p.get("value") or ""
        for case in suite.iter("testcase"):
            tests += 1
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
                failed += 1
            elif case.find("skipped") is not None:
                outcome = "skipped"
            else:
                outcome = "passed"
            node = _nodeid(case.get("classname") or "", case.get("name") or "")
            # A parametrised test passed only if every case did; skips do not count as passes.
            _merge(outcomes, node, outcome)
    if props.get("ci_record") != FORMAT:
        raise RecordError(
            f"{path}: not stamped with the toolkit commit (run pytest with "
            "`-p toolkit.controls.ci_record --junitxml FILE`, as `invoke ci` does)")
    stamp = {"file": str(path), "commit": props.get("toolkit_commit") or None,
             "dirty": {"true": True, "false": False}.get(props.get("toolkit_dirty", "")),
             "tests": tests, "failed": failed}
    return stamp, outcomes


def load(paths: list[Path], commit: str | None, dirty: bool | None) -> Evidence:
    """The evidence of `paths` for the toolkit at `commit` (the one running this verify)."""
    ev = Evidence()
    if not paths:
        return ev
    for path in paths:
        stamp, outcomes = read(path)
        ev.sources.append(stamp)
        for node, outcome in outcomes.items():
            _merge(ev.outcomes, node, outcome)
    others = sorted({str(s["commit"]) for s in ev.sources if s["commit"] != commit})
    if not commit:
        ev.why = "this toolkit's commit is unknown (not a git checkout)"
    elif dirty is not False:
        ev.why = "this toolkit has uncommitted changes: no CI run tested this code"
    elif others:
        ev.why = (f"the CI record is of commit {', '.join(o[:12] for o in others)}, "
                  f"not this toolkit's {commit[:12]}")
    elif any(s["dirty"] is not False for s in ev.sources):
        ev.why = "the CI record was made from a tree with uncommitted changes"
    else:
        ev.usable, ev.why = True, ""
    return ev
