"""The threat-model registry: threats, controls, and what implements and proves each control.

Each link is written once, where it belongs, and everything else is derived from it:

- threat -> control: `controls:` of each threat in `threat-model/threats.yml`;
- control -> task:   the control's id as a tag on the Ansible tasks that implement it
                     (toolkit/controls/task_tags.py reads roles/ and playbooks/);
- control -> test:   `@pytest.mark.control(ID)` on the tests that prove it (read by AST, not
                     by importing the tests: collection would import testinfra, fixtures and
                     whatever the tests import, and the check must run anywhere in a second);
- control -> code:   `code:` in `threat-model/controls/*.yml`, for what the signer's own
                     modules enforce (checked to exist).

`load()` reads the registry files (validated by the JSON Schemas in threat-model/schema/) and
joins them with the tags and markers; `Control.threats`, `.tests` and `.implemented_in` are
those derived links. toolkit/controls/check.py judges them (`invoke threat-model.check`),
toolkit/controls/tables.py renders the generated tables of threat-model/.
"""

from __future__ import annotations

import ast
import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from toolkit.controls import task_tags

ROOT = Path(__file__).resolve().parents[2]
THREAT_MODEL = ROOT / "threat-model"
TESTS = ROOT / "tests"
SCHEMAS = THREAT_MODEL / "schema"

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


# The outside auditors `invoke audit` runs (toolkit/assurance/outside_auditors.py), by the name
# their figures are filed under; the schema's enum is the same list.
AUDITORS = ("lynis", "ssh-audit", "systemd-analyze")
# How a figure is held to its threshold: the YAML key, its sign.
BOUNDS = {"at_most": "<=", "at_least": ">="}


@dataclass(frozen=True)
class Threshold:
    """An outside auditor's figure that is evidence for a control, and the bound it must keep:
    `auditors:` of the control in threat-model/controls/*.yml, and written nowhere else
    (tests/unit/test_auditor_evidence.py looks for a second copy)."""

    control: str
    auditor: str  # one of AUDITORS
    figure: str  # a key of the auditor's figures: exposure, fail, hardening_index
    bound: str  # a key of BOUNDS
    limit: float

    @property
    def text(self) -> str:
        """`<= 2.0`, `>= 85`, `<= 0`: the limit as written in the YAML."""
        return f"{BOUNDS[self.bound]} {self.limit}"  # an int stays one: 85, not 85.0

    def met(self, value: float) -> bool:
        return value <= self.limit if self.bound == "at_most" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.auditor} {self.figure} {self.text}"


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    kind: str
    source: str  # the registry file that defines it
    # Derived by load(): where it lives ({role, tag, tasks, playbooks} from the tags, then
    # {module, where} from `code:`, {where} from `implemented_outside:`, {owner, where} for a
    # procedure), the tests whose markers name it, the active threats that list it.
    implemented_in: tuple[dict[str, Any], ...] = ()
    tests: tuple[str, ...] = ()
    threats: tuple[str, ...] = ()
    applies_to: str = "both"
    procedure: str | None = None
    waiver_lab: str | None = None
    owner: str | None = None  # procedures: the role that carries it out
    frequency: str | None = None  # procedures: how often it is done and audited
    evidence: str | None = None  # procedures: what the audit looks at
    where: str | None = None  # procedures: where it is carried out
    code: tuple[dict[str, str], ...] = ()  # the modules that implement it (signer/...)
    implemented_outside: str | None = None  # technical, but no task or module here does it
    tasks: tuple[task_tags.TaskRef, ...] = ()  # the tasks a playbook runs that carry its id
    auditors: tuple[Threshold, ...] = ()  # outside auditors' figures that are evidence for it

    def applies(self, target: str) -> bool:
        """Whether the control is expected to hold on a `lab` or `production` host."""
        return self.applies_to == "both" or self.applies_to == target


@dataclass
class Registry:
    threats: dict[str, Threat] = field(default_factory=dict)
    controls: dict[str, Control] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # found while loading
    tasks: task_tags.Project = field(default_factory=task_tags.Project)
    tests: list[TestRef] = field(default_factory=list)
    project: Path | None = None  # where roles/, playbooks/, tests/ and the code were read from

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


# --- the files and their schema ----------------------------------------------------------


@cache
def schema(name: str) -> dict[str, Any]:
    """threat-model/schema/<name>.schema.json (threats, controls)."""
    data: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return data


def _allowed(err: jsonschema.ValidationError) -> list[str]:
    props = err.schema.get("properties", {}) if isinstance(err.schema, dict) else {}
    return sorted(props)


def _schema_problems(data: Any, name: str, where: str) -> list[str]:
    """One line per schema violation: file, the entry's id, the key, what is wrong."""
    validator = jsonschema.Draft202012Validator(schema(name))
    out: list[str] = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path))):
        path = list(err.absolute_path)
        entry = ""
        if len(path) >= 2 and isinstance(data, dict):
            items = data.get(path[0])
            if isinstance(items, list) and isinstance(path[1], int) and path[1] < len(items):
                item = items[path[1]]
                entry = f" {item.get('id') or f'entry {path[1] + 1}'}" if isinstance(
                    item, dict) else f" entry {path[1] + 1}"
        key = ".".join(str(p) for p in path[2:])
        at = f"{where}{entry}" + (f": {key}" if key else "")
        if err.validator == "additionalProperties":
            allowed = _allowed(err)
            given = err.instance if isinstance(err.instance, dict) else {}
            for extra in sorted(set(given) - set(allowed)):
                close = difflib.get_close_matches(str(extra), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                kind = f" of a {given.get('kind')} control" if name == "controls" and \
                    given.get("kind") in KINDS and not close else ""
                out.append(f"{at}: unknown key {extra!r}{kind}{hint}; allowed: "
                           + ", ".join(allowed))
        elif err.validator == "required":
            missing = str(err.message).split("'")[1] if "'" in err.message else err.message
            out.append(f"{at}: {missing}: missing")
        else:
            out.append(f"{at}: {err.message}")
    return list(dict.fromkeys(out))


def _load_yaml(path: Path, name: str, where: str, problems: list[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{where}: cannot be read: {exc}".splitlines()[0])
        return {}
    problems += _schema_problems(data, name, where)
    return data if isinstance(data, dict) else {}


def _strs(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple):
        return (str(value),)
    return tuple(str(v) for v in value)


def _rating(value: Any) -> int:
    """A 1-5 rating as written; the schema reports one that is not (and this reads it as 1)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5
    return value if ok else 1


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    return str(value).strip() if value else None


def _residual(raw: Any, where: str, problems: list[str]) -> Residual | None:
    if not isinstance(raw, dict):
        return None
    res = Residual(
        accepted=bool(raw.get("accepted", False)),
        rationale=str(raw.get("rationale") or "").strip(),
        owner=str(raw.get("owner") or "").strip(),
        likelihood=_rating(raw["likelihood"]) if raw.get("likelihood") is not None else None,
        impact=_rating(raw["impact"]) if raw.get("impact") is not None else None,
    )
    if res.accepted and (not res.rationale or not res.owner):
        problems.append(f"{where}: an accepted residual risk needs a rationale and an owner")
    return res


def _threat(raw: dict[str, Any], problems: list[str]) -> Threat | None:
    tid = str(raw.get("id") or "")
    if not tid:
        return None  # the schema said so
    return Threat(
        id=tid,
        title=str(raw.get("title") or ""),
        stride=_strs(raw.get("stride")),
        likelihood=_rating(raw.get("likelihood")),
        impact=_rating(raw.get("impact")),
        controls=_strs(raw.get("controls")),
        residual=_residual(raw.get("residual"), f"threats.yml {tid}", problems),
        description=str(raw.get("description") or "").strip(),
        retired=bool(raw.get("retired", False)),
    )


def _control(raw: dict[str, Any], source: str) -> Control | None:
    cid = str(raw.get("id") or "")
    if not cid:
        return None  # the schema said so
    kind = str(raw.get("kind") or "technical")
    applies = str(raw.get("applies_to") or "both")
    code: list[Any] = raw["code"] if isinstance(raw.get("code"), list) else []
    return Control(
        id=cid,
        title=str(raw.get("title") or ""),
        kind=kind if kind in KINDS else "technical",
        source=source,
        applies_to=applies if applies in APPLIES else "both",
        procedure=_text(raw, "procedure"),
        waiver_lab=_text(raw, "waiver_lab"),
        owner=_text(raw, "owner"),
        frequency=_text(raw, "frequency"),
        evidence=_text(raw, "evidence"),
        where=_text(raw, "where"),
        code=tuple(
            {k: str(v) for k, v in c.items() if k in ("module", "where")}
            for c in code if isinstance(c, dict) and c.get("module")
        ),
        implemented_outside=_text(raw, "implemented_outside"),
        auditors=_thresholds(cid, raw.get("auditors")),
    )


def _thresholds(cid: str, raw: Any) -> tuple[Threshold, ...]:
    """`auditors:` of a control as written; the schema reports an entry it cannot be read from."""
    out: list[Threshold] = []
    for entry in raw if isinstance(raw, list) else ():
        if not isinstance(entry, dict):
            continue
        for bound in BOUNDS:
            limit = entry.get(bound)
            if isinstance(limit, int | float) and not isinstance(limit, bool):
                out.append(Threshold(cid, str(entry.get("auditor") or ""),
                                     str(entry.get("figure") or ""), bound, limit))
    return tuple(out)


def _where(control: Control, project: task_tags.Project) -> tuple[dict[str, Any], ...]:
    """Where a control lives, for readers and the report: roles from the tags first."""
    out: list[dict[str, Any]] = []
    tasks = control.tasks
    for role in dict.fromkeys(t.role for t in tasks):
        mine = [t for t in tasks if t.role == role]
        books = sorted({b for t in mine for b in project.playbooks_of(t)})
        # A play's own task (an include in post_tasks) lives in its playbook, not in a role.
        where = {"role": role} if role else {"play": ", ".join(books)}
        out.append(where | {
            "tag": control.id,
            "tasks": [f"{t.where} {t.name}" for t in mine],
            "playbooks": books,
        })
    out += [dict(c) for c in control.code]
    if control.implemented_outside:
        out.append({"where": control.implemented_outside})
    if control.kind == "procedure" and (control.owner or control.where):
        out.append({k: v for k, v in (("owner", control.owner), ("where", control.where)) if v})
    return tuple(out)


def load_controls(root: Path = THREAT_MODEL, problems: list[str] | None = None
                  ) -> dict[str, Control]:
    """The controls as threat-model/controls/*.yml define them, without the links that load()
    derives (tags, markers, threats): what a posture test or a help text needs, at once."""
    problems = [] if problems is None else problems
    controls: dict[str, Control] = {}
    for cpath in sorted((root / "controls").glob("*.yml")):
        source = f"controls/{cpath.name}"
        for raw in _load_yaml(cpath, "controls", source, problems).get("controls") or ():
            control = _control(raw, source) if isinstance(raw, dict) else None
            if control is None:
                continue
            if control.id in controls:
                first = controls[control.id].source
                problems.append(f"{source}: control {control.id} already defined in {first}")
                continue
            controls[control.id] = control
    return controls


def load(root: Path = THREAT_MODEL, project: Path | None = None) -> Registry:
    """The registry under `root`, joined with the tags and markers of `project` (its parent).

    A file that breaks the schema is still read as far as it goes, so that a report never
    hides a control; `problems` says what is wrong, and check() returns it.
    """
    project = project if project is not None else root.parent
    reg = Registry(project=project)
    tpath = root / "threats.yml"
    if not tpath.exists():
        reg.problems.append(f"{tpath}: missing")
    data = _load_yaml(tpath, "threats", "threats.yml", reg.problems) if tpath.exists() else {}
    for raw in data.get("threats") or ():
        threat = _threat(raw, reg.problems) if isinstance(raw, dict) else None
        if threat is None:
            continue
        if threat.id in reg.threats:
            reg.problems.append(f"threats.yml: threat {threat.id} defined twice")
        reg.threats[threat.id] = threat
    controls = load_controls(root, reg.problems)
    reg.tasks = task_tags.load(project)
    reg.tests = collect_tests(project / "tests", project) if (project / "tests").is_dir() else []
    for cid, control in controls.items():
        control = replace(
            control,
            tasks=tuple(reg.tasks.implementing(cid)),
            tests=tuple(t.nodeid for t in reg.tests if cid in t.controls),
            threats=tuple(t.id for t in reg.active if cid in t.controls),
        )
        reg.controls[cid] = replace(control, implemented_in=_where(control, reg.tasks))
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


def id_key(cid: str) -> tuple[str, int]:
    family, _, num = cid.rpartition("-")
    return (family, int(num)) if num.isdigit() else (cid, 0)


def tests_of(reg: Registry, tests: list[TestRef], control_id: str) -> list[str]:
    """Node ids that prove a control: those whose marker names it."""
    control = reg.controls.get(control_id)
    out = list(control.tests) if control else []
    out += [t.nodeid for t in tests if control_id in t.controls]
    return list(dict.fromkeys(out))
