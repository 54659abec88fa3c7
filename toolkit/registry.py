"""The threat-model registry: threats, controls, and the tests that prove them.

`load()` reads `threat-model/threats.yml` and `threat-model/controls/*.yml`; `check()` returns
every broken link in the chain threat -> control -> test as one line per problem. Test markers
are read by parsing the test files (AST), not by importing them: collection would import
testinfra, fixtures and whatever the tests import, and the check must run anywhere in a second.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
THREAT_MODEL = ROOT / "threat-model"
TESTS = ROOT / "tests"

STRIDE = {
    "S": "Spoofing",
    "T": "Tampering",
    "R": "Repudiation",
    "I": "Information disclosure",
    "D": "Denial of service",
    "E": "Elevation of privilege",
}
KINDS = ("technical", "procedure")
APPLIES = ("lab", "production", "both")
# Risk = likelihood x impact, each 1-5 (see threat-model/README.md, "Scale").
HIGH_RISK = 12
BANDS = ((20, "critical"), (HIGH_RISK, "high"), (6, "medium"), (1, "low"))


def band(risk: int) -> str:
    for floor, name in BANDS:
        if risk >= floor:
            return name
    return "low"


@dataclass(frozen=True)
class Residual:
    accepted: bool
    rationale: str
    owner: str
    likelihood: int | None = None
    impact: int | None = None

    @property
    def risk(self) -> int | None:
        if self.likelihood is None or self.impact is None:
            return None
        return self.likelihood * self.impact


@dataclass(frozen=True)
class Threat:
    id: str
    title: str
    stride: tuple[str, ...]
    likelihood: int
    impact: int
    controls: tuple[str, ...]
    residual: Residual | None = None
    description: str = ""
    retired: bool = False  # kept so that its id is never reused; ignored by check and report

    @property
    def risk(self) -> int:
        return self.likelihood * self.impact

    @property
    def band(self) -> str:
        return band(self.risk)

    @property
    def high(self) -> bool:
        return self.risk >= HIGH_RISK


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    kind: str
    source: str  # the registry file that defines it
    implemented_in: tuple[dict[str, Any], ...] = ()
    tests: tuple[str, ...] = ()
    applies_to: str = "both"
    procedure: str | None = None
    waiver_lab: str | None = None
    threats: tuple[str, ...] = ()
    owner: str | None = None  # procedures: the role that carries it out
    frequency: str | None = None  # procedures: how often it is done and audited

    def applies(self, target: str) -> bool:
        """Whether the control is expected to hold on a `lab` or `production` host."""
        return self.applies_to == "both" or self.applies_to == target


@dataclass
class Registry:
    threats: dict[str, Threat] = field(default_factory=dict)
    controls: dict[str, Control] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # found while loading

    @property
    def active(self) -> list[Threat]:
        return [t for t in self.threats.values() if not t.retired]

    def threats_of(self, control_id: str) -> list[Threat]:
        return [t for t in self.active if control_id in t.controls]


@dataclass(frozen=True)
class TestRef:
    """A test function found in a test file, with the controls its markers name."""

    nodeid: str
    controls: tuple[str, ...]
    line: int


# --- loading -------------------------------------------------------------------------------


def _load_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{path.name}: cannot be read: {exc}".splitlines()[0])
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name}: expected a mapping at the top")
        return {}
    return data


def _strs(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _int_1_5(value: Any, where: str, name: str, problems: list[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
        return value
    problems.append(f"{where}: {name} must be an integer 1-5, got {value!r}")
    return 1


def _residual(raw: Any, where: str, problems: list[str]) -> Residual | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{where}: residual must be a mapping")
        return None
    res = Residual(
        accepted=bool(raw.get("accepted", False)),
        rationale=str(raw.get("rationale") or "").strip(),
        owner=str(raw.get("owner") or "").strip(),
        likelihood=raw.get("likelihood"),
        impact=raw.get("impact"),
    )
    if res.accepted and (not res.rationale or not res.owner):
        problems.append(f"{where}: an accepted residual risk needs a rationale and an owner")
    for name in ("likelihood", "impact"):
        if raw.get(name) is not None:
            _int_1_5(raw[name], where, f"residual {name}", problems)
    return res


def _threat(raw: dict[str, Any], problems: list[str]) -> Threat | None:
    tid = str(raw.get("id") or "")
    if not tid:
        problems.append(f"threats.yml: a threat without id: {raw.get('title')!r}")
        return None
    where = f"threats.yml {tid}"
    stride = _strs(raw.get("stride"))
    for letter in stride:
        if letter not in STRIDE:
            problems.append(f"{where}: unknown STRIDE category {letter!r}")
    if not stride:
        problems.append(f"{where}: no STRIDE category")
    if not raw.get("title"):
        problems.append(f"{where}: no title")
    return Threat(
        id=tid,
        title=str(raw.get("title") or ""),
        stride=stride,
        likelihood=_int_1_5(raw.get("likelihood"), where, "likelihood", problems),
        impact=_int_1_5(raw.get("impact"), where, "impact", problems),
        controls=_strs(raw.get("controls")),
        residual=_residual(raw.get("residual"), where, problems),
        description=str(raw.get("description") or "").strip(),
        retired=bool(raw.get("retired", False)),
    )


def _control(raw: dict[str, Any], source: str, problems: list[str]) -> Control | None:
    cid = str(raw.get("id") or "")
    if not cid:
        problems.append(f"{source}: a control without id: {raw.get('title')!r}")
        return None
    where = f"{source} {cid}"
    kind = str(raw.get("kind") or "technical")
    if kind not in KINDS:
        problems.append(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    applies = str(raw.get("applies_to") or "both")
    if applies not in APPLIES:
        problems.append(f"{where}: applies_to must be one of {', '.join(APPLIES)}, got {applies!r}")
    impl = raw.get("implemented_in") or ()
    if isinstance(impl, dict):
        impl = (impl,)
    procedure = raw.get("procedure")
    waiver = raw.get("waiver_lab")
    return Control(
        id=cid,
        title=str(raw.get("title") or ""),
        kind=kind,
        source=source,
        implemented_in=tuple(i if isinstance(i, dict) else {"where": str(i)} for i in impl),
        tests=_strs(raw.get("tests")),
        applies_to=applies,
        procedure=str(procedure).strip() if procedure else None,
        waiver_lab=str(waiver).strip() if waiver else None,
        threats=_strs(raw.get("threats")),
        owner=str(raw["owner"]).strip() if raw.get("owner") else None,
        frequency=str(raw["frequency"]).strip() if raw.get("frequency") else None,
    )


def load(root: Path = THREAT_MODEL) -> Registry:
    reg = Registry()
    tpath = root / "threats.yml"
    if not tpath.exists():
        reg.problems.append(f"{tpath}: missing")
    data = _load_yaml(tpath, reg.problems) if tpath.exists() else {}
    for raw in data.get("threats") or ():
        threat = _threat(raw, reg.problems) if isinstance(raw, dict) else None
        if threat is None:
            continue
        if threat.id in reg.threats:
            reg.problems.append(f"threats.yml: threat {threat.id} defined twice")
        reg.threats[threat.id] = threat
    for cpath in sorted((root / "controls").glob("*.yml")):
        source = f"controls/{cpath.name}"
        for raw in _load_yaml(cpath, reg.problems).get("controls") or ():
            control = _control(raw, source, reg.problems) if isinstance(raw, dict) else None
            if control is None:
                continue
            if control.id in reg.controls:
                first = reg.controls[control.id].source
                reg.problems.append(f"{source}: control {control.id} already defined in {first}")
                continue
            reg.controls[control.id] = control
    return reg


# --- tests and their markers ----------------------------------------------------------------


def _is_control_mark(node: ast.AST) -> bool:
    """`pytest.mark.control(...)` or `mark.control(...)`."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    func = node.func
    if func.attr != "control":
        return False
    base = func.value
    return (isinstance(base, ast.Attribute) and base.attr == "mark") or (
        isinstance(base, ast.Name) and base.id == "mark"
    )


def _marked_controls(nodes: Iterable[ast.AST]) -> list[str]:
    out: list[str] = []
    for top in nodes:
        for node in ast.walk(top):
            if _is_control_mark(node):
                assert isinstance(node, ast.Call)
                out.extend(
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                )
    return out


def _pytestmark(body: list[ast.stmt]) -> list[str]:
    nodes: list[ast.AST] = []
    for stmt in body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets
        ):
            nodes.append(stmt.value)
    return _marked_controls(nodes)


def _functions(
    body: list[ast.stmt], prefix: str, inherited: list[str]
) -> Iterator[tuple[str, list[str], int]]:
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name.startswith(
            "test"
        ):
            marks = inherited + _marked_controls(stmt.decorator_list)
            yield f"{prefix}{stmt.name}", marks, stmt.lineno
        elif isinstance(stmt, ast.ClassDef) and stmt.name.startswith("Test"):
            marks = inherited + _marked_controls(stmt.decorator_list) + _pytestmark(stmt.body)
            yield from _functions(stmt.body, f"{prefix}{stmt.name}::", marks)


def collect_tests(tests_root: Path = TESTS, base: Path | None = None) -> list[TestRef]:
    """Every test function under tests_root with its control markers (file order)."""
    base = base or tests_root.parent
    refs: list[TestRef] = []
    for path in sorted(tests_root.rglob("test_*.py")):
        if ".venv" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as exc:
            refs.append(TestRef(f"{path.relative_to(base)}::<syntax error>", (), exc.lineno or 0))
            continue
        rel = path.relative_to(base).as_posix()
        module_marks = _pytestmark(tree.body)
        for name, marks, line in _functions(tree.body, f"{rel}::", module_marks):
            refs.append(TestRef(name, tuple(dict.fromkeys(marks)), line))
    return refs


# --- the consistency check ------------------------------------------------------------------


def _id_key(cid: str) -> tuple[str, int]:
    family, _, num = cid.rpartition("-")
    return (family, int(num)) if num.isdigit() else (cid, 0)


def check(reg: Registry, tests: list[TestRef], posture_dir: str = "tests/posture/") -> list[str]:
    """Every broken link between threats, controls and tests, one line each (empty: all good)."""
    problems = list(reg.problems)
    by_node = {t.nodeid: t for t in tests}
    marked: dict[str, list[str]] = {}
    for t in tests:
        for cid in t.controls:
            marked.setdefault(cid, []).append(t.nodeid)

    undefined: dict[str, list[str]] = {}
    for threat in reg.active:
        where = f"threat {threat.id}"
        accepted = threat.residual is not None and threat.residual.accepted
        if not threat.controls and not accepted:
            problems.append(f"{where}: no control and no accepted residual risk")
        for cid in threat.controls:
            if cid not in reg.controls:
                undefined.setdefault(cid, []).append(threat.id)
        if threat.high and len(set(threat.controls)) < 2:
            problems.append(
                f"{where}: high risk ({threat.likelihood}x{threat.impact}={threat.risk}) "
                f"rests on {len(set(threat.controls))} control(s); needs at least two"
            )

    for cid, tids in sorted(undefined.items(), key=lambda kv: _id_key(kv[0])):
        problems.append(
            f"control {cid}: named by {', '.join(tids)}, but no controls/*.yml defines it"
        )

    referenced = {cid for t in reg.active for cid in t.controls}
    for control in reg.controls.values():
        where = f"control {control.id} ({control.source})"
        if control.id not in referenced:
            problems.append(f"{where}: mitigates no threat in threats.yml")
        for tid in control.threats:
            if tid not in reg.threats:
                problems.append(f"{where}: lists threat {tid}, which threats.yml does not define")
            elif control.id not in reg.threats[tid].controls:
                problems.append(f"{where}: lists threat {tid}, but {tid} does not list it")
        if control.kind == "procedure":
            if not control.procedure:
                problems.append(f"{where}: procedure without audit text (procedure:)")
            continue
        if not control.tests and not marked.get(control.id):
            problems.append(f"{where}: technical control without a test")
        for nodeid in control.tests:
            ref = by_node.get(nodeid.split("[", 1)[0])
            if ref is None:
                problems.append(f"{where}: lists test {nodeid}, which does not exist")
            elif control.id not in ref.controls:
                problems.append(
                    f"{where}: lists test {nodeid}, whose control marker does not name it"
                )

    for t in tests:
        for cid in t.controls:
            if cid not in reg.controls:
                problems.append(f"test {t.nodeid}: marker names unknown control {cid}")
        if t.nodeid.startswith(posture_dir) and not t.controls:
            problems.append(f"test {t.nodeid}: posture test without a control marker")
    return problems


def tests_of(reg: Registry, tests: list[TestRef], control_id: str) -> list[str]:
    """Node ids that prove a control: those the registry lists and those whose marker names it."""
    control = reg.controls.get(control_id)
    out = [n.split("[", 1)[0] for n in control.tests] if control else []
    out += [t.nodeid for t in tests if control_id in t.controls]
    return list(dict.fromkeys(out))


# --- the README's tables --------------------------------------------------------------------

TABLES = ("threats", "residuals")
TIMES = "\u00d7"  # multiplication sign, as the README writes risks


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_table(reg: Registry, name: str) -> str:
    """A Markdown table generated from threats.yml, for threat-model/README.md."""
    rows: list[str] = []
    if name == "threats":
        rows += [
            "| id | threat | STRIDE | L | I | risk | controls |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in reg.active:
            rows.append(
                f"| {t.id} | {_cell(t.title)} | {''.join(t.stride)} | {t.likelihood} | "
                f"{t.impact} | **{t.risk}** {t.band} | {', '.join(t.controls)} |"
            )
    elif name == "residuals":
        rows += [
            "| id | inherent | residual | owner | why it is acceptable |",
            "|---|---|---|---|---|",
        ]
        for t in reg.active:
            r = t.residual
            if r is None:
                rows.append(f"| {t.id} | {t.risk} | - | - | no residual recorded |")
                continue
            res = (
                f"**{r.likelihood}{TIMES}{r.impact}={r.risk}** {band(r.risk)}"
                if r.risk is not None
                else "not rated"
            )
            why = _cell(r.rationale) + ("" if r.accepted else " **(not accepted)**")
            rows.append(f"| {t.id} | {t.risk} | {res} | {_cell(r.owner)} | {why} |")
    else:
        raise ValueError(f"unknown table {name!r}")
    return "\n".join(rows) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN generated table: {name} (invoke threat-model.check --write-tables) -->\n",
        f"<!-- END generated table: {name} -->",
    )


def sync_tables(reg: Registry, readme: Path, write: bool = False) -> list[str]:
    """Problems where README.md's generated tables differ from threats.yml; rewrite if asked."""
    if not readme.exists():
        return [f"{readme.name}: missing"]
    text = original = readme.read_text()
    problems: list[str] = []
    for name in TABLES:
        begin, end = _markers(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            problems.append(f"{readme.name}: no generated '{name}' table (markers missing)")
            continue
        body = render_table(reg, name)
        if text[start + len(begin) : stop] != body:
            text = text[: start + len(begin)] + body + text[stop:]
            if not write:
                problems.append(
                    f"{readme.name}: the '{name}' table is out of date with threats.yml "
                    "(run: invoke threat-model.check --write-tables)"
                )
    if write and text != original:
        readme.write_text(text)
    return problems
