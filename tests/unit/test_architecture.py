"""Imports run downward (ARCHITECTURE.md): every Python file's imports, read with ast, against
one table of which part of the house may import which.

`LAYERS` below is that table, and the only one: ARCHITECTURE.md draws it and points here. Each
part names the parts it may import; a part may always import itself. Every import counts: at
the top of a module, inside a function, under `if TYPE_CHECKING:`. Imports made by importlib
from a string are not seen.

A file that belongs to no part fails the test: a new package gets its row (and its place in
ARCHITECTURE.md) before it gets its first import.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Part -> the parts it may import, from the bottom up. A part is a module-name prefix; a
# module belongs to the longest part that prefixes it.
LAYERS: dict[str, frozenset[str]] = {
    # The signing service runs on the host, alone: nothing else of ours is installed there.
    "signer": frozenset(),
    # How a host is reached and what its inventory says: below both the lab and the toolkit.
    "hostaccess": frozenset(),
    # Ansible loads these by path, inside its own process.
    "callback_plugins": frozenset(),
    "strategy_plugins": frozenset(),
    "roles": frozenset(),
    # The lab VM and its network: reads its inventory like any host's, knows nothing of toolkit.
    "lab": frozenset({"hostaccess"}),
    "toolkit": frozenset(),  # toolkit/__init__.py: empty
    "toolkit.exitcodes": frozenset(),
    "toolkit.local_signer": frozenset({"signer"}),
    "toolkit.local_forwarder": frozenset({"lab"}),
    # The controls of the threat model and whether each is in place: below the play runner and
    # the assurance, which both read it.
    "toolkit.controls": frozenset(),
    "toolkit.runner": frozenset({"signer", "hostaccess", "lab", "toolkit", "toolkit.exitcodes",
                                 "toolkit.controls"}),
    "toolkit.assurance": frozenset({"hostaccess", "lab", "toolkit", "toolkit.exitcodes",
                                    "toolkit.controls", "toolkit.runner"}),
    "toolkit.pipeline": frozenset({"lab", "toolkit", "toolkit.exitcodes", "toolkit.runner"}),
    "toolkit.bench": frozenset({"signer", "lab", "toolkit", "toolkit.exitcodes",
                                "toolkit.local_signer", "toolkit.local_forwarder",
                                "toolkit.runner"}),
    "toolkit.tasks": frozenset({"signer", "hostaccess", "lab", "toolkit", "toolkit.exitcodes",
                                "toolkit.controls", "toolkit.runner", "toolkit.assurance", "toolkit.pipeline",
                                "toolkit.bench", "toolkit.local_signer"}),
    "tasks": frozenset({"toolkit", "toolkit.tasks"}),
    # The posture suite runs against any host: no lab, no play runner.
    "tests.posture": frozenset({"tests", "hostaccess", "toolkit", "toolkit.controls",
                                "toolkit.assurance"}),
    # Every other test may import whatever it tests.
    "tests": frozenset({"signer", "hostaccess", "lab", "toolkit", "toolkit.exitcodes",
                        "toolkit.local_signer", "toolkit.local_forwarder", "toolkit.controls",
                        "toolkit.runner",
                        "toolkit.assurance", "toolkit.pipeline", "toolkit.bench",
                        "toolkit.tasks", "tasks"}),
}

# Imports that run back up, each named by file so that no other joins it; strike a line when
# its import is gone (the test says so). None today: the runner<->registry loop ended when the
# controls moved below both (toolkit/controls, issue 25).
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()

OURS = frozenset(part.split(".")[0] for part in LAYERS)


def part_of(module: str) -> str | None:
    """The longest part of LAYERS that `module` lies in (None: not ours)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    return None


def module_name(rel: Path) -> str:
    """`toolkit/runner/playbook.py` -> `toolkit.runner.playbook`; a package is its folder."""
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool, root: Path) -> Iterator[
        tuple[int, str]]:
    """(line, module) of every import in `tree`, wherever it stands; `from a import b` names
    a.b when b is a module of ours, else a."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                path = root / sub.replace(".", "/")
                yield node.lineno, sub if path.with_suffix(".py").is_file() or path.is_dir() \
                    else base


def python_files(root: Path) -> list[Path]:
    """The repository's Python files, tracked or new (what .gitignore leaves out is not ours)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard", "--", "*.py"],
                         capture_output=True, check=True).stdout.split(b"\0")
    return sorted({Path(n.decode()) for n in out if n and (root / n.decode()).is_file()})


def crossings(root: Path, files: list[Path]) -> tuple[list[str], set[tuple[str, str]]]:
    """Each import against the direction, `file:line: part -> part (module)`, and the known
    exceptions that were met."""
    wrong: list[str] = []
    met: set[tuple[str, str]] = set()
    for rel in files:
        module = module_name(rel)
        source = part_of(module)
        if source is None:
            wrong.append(f"{rel}: in no part of the house: give it a row in LAYERS")
            continue
        tree = ast.parse((root / rel).read_text(encoding="utf-8"), str(rel))
        for line, target in imported(tree, module, rel.name == "__init__.py", root):
            if target.split(".")[0] not in OURS:
                continue  # the standard library, a third party
            dest = part_of(target)
            if dest is None or dest == source or dest in LAYERS[source]:
                continue
            if (str(rel), target) in KNOWN_EXCEPTIONS:
                met.add((str(rel), target))
                continue
            wrong.append(f"{rel}:{line}: {source} -> {dest} ({target}) runs against the "
                         "direction in LAYERS")
    return wrong, met


def test_every_import_runs_downward() -> None:
    wrong, _ = crossings(ROOT, python_files(ROOT))
    assert wrong == [], "\n".join(wrong)


def test_every_known_exception_is_still_there() -> None:
    _, met = crossings(ROOT, python_files(ROOT))
    assert sorted(KNOWN_EXCEPTIONS - met) == [], "gone: strike them from KNOWN_EXCEPTIONS"


def test_the_table_has_no_loop() -> None:
    """A part may not import, through any chain, a part that imports it: the table is floors."""
    def above(part: str, seen: tuple[str, ...]) -> None:
        for lower in LAYERS[part] - {part}:
            assert lower in LAYERS, f"{part} may import {lower}, which has no row"
            assert lower not in seen, f"loop: {' -> '.join((*seen, lower))}"
            above(lower, (*seen, lower))

    for part in LAYERS:
        above(part, (part,))


def test_the_controls_stand_below_the_runner_and_the_assurance() -> None:
    """The rule the controls package was made for (issue 25): both read it, it reads neither."""
    assert LAYERS["toolkit.controls"] == frozenset()
    for above in ("toolkit.runner", "toolkit.assurance", "tests.posture"):
        assert "toolkit.controls" in LAYERS[above]


def test_lab_and_host_access_import_nothing_of_the_toolkit() -> None:
    """The rule that the split of toolkit/runner was made for, said outright."""
    for low in ("lab", "hostaccess", "signer"):
        assert not any(p.split(".")[0] == "toolkit" for p in LAYERS[low])


@pytest.mark.parametrize(
    ("rel", "code", "found"),
    [
        ("signer/x.py", "import toolkit.runner.playbook\n", "signer -> toolkit.runner"),
        ("lab/x.py", "def f() -> None:\n    from toolkit.runner import ansible_run\n",
         "lab -> toolkit.runner"),
        ("hostaccess/x.py", "from lab import state\n", "hostaccess -> lab"),
        ("toolkit/runner/x.py", "from toolkit import pipeline\n",
         "toolkit.runner -> toolkit.pipeline"),
        ("tests/posture/test_x.py", "from lab.state import LabState\n", "tests.posture -> lab"),
        ("toolkit/runner/x.py", "from .. import pipeline\n", "toolkit.runner -> toolkit.pipeline"),
        ("toolkit/runner/__init__.py", "from ..pipeline import f\n",
         "toolkit.runner -> toolkit.pipeline"),
        ("toolkit/controls/x.py", "from toolkit.runner import playbook\n",
         "toolkit.controls -> toolkit.runner"),
        ("toolkit/controls/x.py", "def f() -> None:\n    from ..assurance import report\n",
         "toolkit.controls -> toolkit.assurance"),
    ],
)
def test_an_import_against_the_direction_is_named_with_file_and_line(
    tmp_path: Path, rel: str, code: str, found: str
) -> None:
    for package in ("signer", "lab", "hostaccess", "toolkit/runner", "toolkit/controls",
                    "toolkit/assurance", "tests/posture"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    (tmp_path / "toolkit" / "pipeline.py").write_text("")
    (tmp_path / "toolkit" / "runner" / "playbook.py").write_text("")
    (tmp_path / "toolkit" / "runner" / "ansible_run.py").write_text("")
    (tmp_path / "lab" / "state.py").write_text("")
    (tmp_path / "toolkit" / "assurance" / "report.py").write_text("")
    (tmp_path / rel).write_text("import os\n" + code)
    wrong, _ = crossings(tmp_path, [Path(rel)])
    assert len(wrong) == 1 and wrong[0].startswith(f"{rel}:") and found in wrong[0], wrong


def test_an_import_that_runs_down_passes(tmp_path: Path) -> None:
    (tmp_path / "lab").mkdir()
    (tmp_path / "hostaccess").mkdir()
    (tmp_path / "hostaccess" / "hostvars.py").write_text("")
    (tmp_path / "lab" / "target.py").write_text("from hostaccess import hostvars\nimport yaml\n")
    assert crossings(tmp_path, [Path("lab/target.py")]) == ([], set())
