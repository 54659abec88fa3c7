"""Static check: nothing that runs against real hosts knows the lab exists.

Roles, playbooks, the posture tests and the expectations they read run against every
inventory; a lab variable there (`signlab_state_dir`, `lab.vm...`), an import of the lab
package or a lab instance name makes the lab the only host they work on. The lab lives in
lab/, inventory/lab and tests/lab only.

`python -m toolkit.assurance.lab_coupling` prints one `file:line: what` per finding and exits 1, or
exits 0 when there is none (CI's static stage runs it).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Where the lab must not appear (directories are searched recursively).
SCOPE = ("roles", "playbooks", "tests/posture", "hostaccess/expectations.py")

RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"signlab", re.I), "the lab's name (signlab_* variables, $SIGNLAB_*, its paths)"),
    (re.compile(r"^\s*(from\s+lab(\.\w+)*\s+import|import\s+lab(\.\w+)*)\b"),
     "an import of the lab package"),
    (re.compile(r"(?<![\w/.-])lab(\.[A-Za-z_]|\s*\[)"), "a lab variable (lab.*, lab[...])"),
    (re.compile(r"(?<![\w-])lab[0-9]\b"), "a lab instance name"),
)


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file()
                              and "__pycache__" not in p.parts)
        elif path.is_file():
            yield path


def findings(root: Path | None = None, scope: Iterable[str] = SCOPE) -> list[str]:
    """Every lab coupling under `scope` (relative to `root`, default the repository), as
    `file:line: what: text`."""
    root = ROOT if root is None else root
    out: list[str] = []
    for path in _files(root / s for s in scope):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files hold no variables
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, what in RULES:
                if pattern.search(line):
                    out.append(f"{path.relative_to(root)}:{number}: {what}: {line.strip()[:120]}")
                    break
    return out


def main(argv: list[str] | None = None) -> int:
    problems = findings()
    for p in problems:
        print(p)
    if problems:
        print(f"lab coupling: {len(problems)} finding(s) in {', '.join(SCOPE)}; "
              "take the value from the inventory instead", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
