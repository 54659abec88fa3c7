"""Control ids as Ansible tags: which tasks implement which control (roles/, playbooks/).

Each task that implements a control carries the control's id as a tag (`tags: [SSH-05]`), as
ansible-lockdown tags each task with its rule id. `--tags SSH-05` then applies exactly that
control, a run's events say which controls it touched (toolkit/controls/play_status.py), and the
registry derives where a control lives from here instead of keeping a copy
(toolkit/controls/registry.py).

The YAML is read the way Ansible composes it: static imports (import_tasks, import_role) and
blocks pass their tags down, a playbook's role entry tags every task of the role, a dynamic
include (include_tasks, include_role) passes down only its `apply:` tags and must itself be
selected. Ansible is not imported (the walk takes a fraction of a second where
`ansible-playbook --list-tasks` takes seconds); that command is the cross-check
(tests/unit/test_task_tags.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

# A tag that is (or looks like, SSH-5) a control id; lower-case tags are families and
# features: ssh, ssh-config.
CONTROL_TAG = re.compile(r"^[A-Z][A-Z0-9]*-\d+$")
# A control id cited in a task name (ids have two digits: SHA-512 is not one), with the house
# abbreviations: SSH-01..06 (a range), KRN-01/02 (a list), "BASE-01, NET-05".
_CITATION = re.compile(r"\b([A-Z][A-Z0-9]*)-(\d\d)((?:(?:\.\.|/)\d\d)*)(?![\w-])")
_STEP = re.compile(r"(\.\.|/)(\d\d)")

_IMPORT_TASKS = {"import_tasks", "ansible.builtin.import_tasks"}
_INCLUDE_TASKS = {"include_tasks", "ansible.builtin.include_tasks", "include",
                  "ansible.builtin.include"}
_IMPORT_ROLE = {"import_role", "ansible.builtin.import_role"}
_INCLUDE_ROLE = {"include_role", "ansible.builtin.include_role"}
_SET_FACT = {"set_fact", "ansible.builtin.set_fact"}
# Task keywords (not modules): what is left of a task after these is its action.
_KEYWORDS = {
    "name", "tags", "when", "vars", "register", "loop", "loop_control", "with_items",
    "with_dict", "with_list", "notify", "become", "become_user", "become_method",
    "delegate_to", "delegate_facts", "run_once", "changed_when", "failed_when", "check_mode",
    "diff", "no_log", "ignore_errors", "ignore_unreachable", "environment", "args", "until",
    "retries", "delay", "async", "poll", "throttle", "listen", "any_errors_fatal", "timeout",
    "collections", "module_defaults", "debugger", "connection", "port", "remote_user",
    "block", "rescue", "always", "action", "local_action",
}
_LINE = "__line__"
ALWAYS = "always"
UNTAGGED = frozenset({"untagged"})


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that records each mapping's line, so a problem names file:line."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping[_LINE] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line
)


def cited(name: str) -> tuple[str, ...]:
    """The control ids a task name cites: 'SSH-01..03 | x' -> SSH-01, SSH-02, SSH-03."""
    out: list[str] = []
    for m in _CITATION.finditer(name):
        family, first, tail = m.group(1), m.group(2), m.group(3)
        width, prev = len(first), int(first)
        nums = [prev]
        for op, num in _STEP.findall(tail):
            n = int(num)
            nums += list(range(prev + 1, n + 1)) if op == ".." else [n]
            prev = n
        out += [f"{family}-{n:0{width}d}" for n in nums]
    return tuple(dict.fromkeys(out))


def control_ids(tags: Iterable[str]) -> frozenset[str]:
    return frozenset(t for t in tags if CONTROL_TAG.match(t))


def _tags(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(t.strip() for t in value.split(",") if t.strip())
    if isinstance(value, list):
        return frozenset(str(t).strip() for t in value if str(t).strip())
    return frozenset({str(value)})


def selected(tags: Iterable[str], only: Iterable[str] = ("all",),
             skip: Iterable[str] = ()) -> bool:
    """Whether `--tags only --skip-tags skip` runs a task with these (effective) tags.

    Ansible's rule (ansible.playbook.taggable.Taggable.evaluate_tags), without templating.
    """
    have = frozenset(tags) or UNTAGGED
    only, skip = frozenset(only), frozenset(skip)
    run = True
    if only:
        run = (
            ALWAYS in have
            or ("all" in only and "never" not in have)
            or not have.isdisjoint(only)
            or ("tagged" in only and have != UNTAGGED and "never" not in have)
        )
    if run and skip:
        if "all" in skip:
            run = ALWAYS in have and ALWAYS not in skip
        elif not have.isdisjoint(skip) or ("tagged" in skip and have != UNTAGGED):
            run = False
    return run


@dataclass(frozen=True)
class TaskRef:
    """One task as a play runs it (or, for a task file no playbook reaches, as written)."""

    file: str  # relative to the project: roles/ssh/tasks/config.yml, playbooks/deploy.yml
    line: int
    name: str
    role: str | None  # the role it belongs to; None for a play's own task
    tags: frozenset[str]  # effective: its own and those it inherits
    kind: str  # task | include (dynamic: selected on its own tags) | block | import
    playbook: str | None = None  # the playbook (file name) that runs it; None: none does
    index: int = 0  # its place in the playbook's run order
    section: str = "block"  # of its block: block | rescue (only when it failed) | always
    dynamic: bool = False  # reached through include_tasks/include_role (known only at run time)
    inner: frozenset[str] = frozenset()  # block, import, include: control ids of what is inside
    registers: tuple[str, ...] = ()  # variables it sets (register:, set_fact:)
    text: str = ""  # the task and the conditions around it, to find the variables it uses

    @property
    def controls(self) -> frozenset[str]:
        return control_ids(self.tags)

    @property
    def cited(self) -> tuple[str, ...]:
        return cited(self.name)

    @property
    def runs(self) -> bool:
        """A task that produces a result of its own when it runs (blocks and imports do not)."""
        return self.kind in ("task", "include")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Project:
    """Every task of the project's playbooks in run order, and the problems met reading them."""

    tasks: list[TaskRef] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def of_playbook(self, playbook: str) -> list[TaskRef]:
        name = Path(playbook).name
        return [t for t in self.tasks if t.playbook == name]

    def playbooks_of(self, task: TaskRef) -> list[str]:
        """Every playbook that runs this task (a role can be in several)."""
        return sorted({t.playbook for t in self.tasks
                       if t.playbook and (t.file, t.line) == (task.file, task.line)})

    def implementing(self, control_id: str) -> list[TaskRef]:
        """The tasks a playbook runs that carry the control's id (one entry per task)."""
        seen: set[tuple[str, int]] = set()
        out: list[TaskRef] = []
        for t in self.tasks:
            if t.playbook and t.runs and control_id in t.tags and (t.file, t.line) not in seen:
                seen.add((t.file, t.line))
                out.append(t)
        return out


def _action(task: dict[str, Any]) -> tuple[str, Any]:
    for key, value in task.items():
        if key not in _KEYWORDS and key != _LINE:
            return str(key), value
    return "", None


def _text(value: Any) -> str:
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != _LINE}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return json.dumps(strip(value), default=str, sort_keys=True)


@dataclass(frozen=True)
class _Ctx:
    """What a task inherits from where it stands."""

    role: str | None = None
    tags: frozenset[str] = frozenset()
    conditions: tuple[str, ...] = ()
    section: str = "block"
    dynamic: bool = False


class _Walker:
    def __init__(self, project: Path, playbook: str | None, problems: list[str]) -> None:
        self.root = project
        self.playbook = playbook
        self.problems = problems
        self.out: list[TaskRef] = []
        self.files: set[Path] = set()  # task files read by this walk
        self._stack: list[Path] = []

    def rel(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def load(self, path: Path) -> list[Any]:
        try:
            data = yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 (a SafeLoader)
        except (OSError, yaml.YAMLError) as exc:
            self.problems.append(f"{self.rel(path)}: cannot be read: {exc}".splitlines()[0])
            return []
        if data is None:
            return []
        if not isinstance(data, list):
            self.problems.append(f"{self.rel(path)}: expected a list")
            return []
        return data

    def tasks_file(self, path: Path, ctx: _Ctx) -> frozenset[str]:
        if path in self._stack:
            self.problems.append(f"{self.rel(path)}: imports itself")
            return frozenset()
        self.files.add(path.resolve())
        self._stack.append(path)
        try:
            return self.tasks(self.load(path), path, ctx)
        finally:
            self._stack.pop()

    def role(self, role: str, tasks_from: str | None, ctx: _Ctx, where: str) -> frozenset[str]:
        base = self.root / "roles" / role / "tasks"
        stem = tasks_from or "main"
        for cand in (base / stem, base / f"{stem}.yml", base / f"{stem}.yaml"):
            if cand.is_file():
                return self.tasks_file(cand, replace(ctx, role=role))
        self.problems.append(f"{where}: role {role}: no tasks file {stem!r}")
        return frozenset()

    def add(self, item: dict[str, Any], path: Path, ctx: _Ctx, kind: str,
            registers: tuple[str, ...] = ()) -> int:
        """Record a task in run order (a container before what it holds); returns its slot."""
        body = {k: v for k, v in item.items() if k not in ("block", "rescue", "always")}
        self.out.append(TaskRef(
            file=self.rel(path), line=int(item.get(_LINE, 0)), name=str(item.get("name") or ""),
            role=ctx.role, tags=ctx.tags, kind=kind, playbook=self.playbook,
            index=len(self.out), section=ctx.section, dynamic=ctx.dynamic, registers=registers,
            text=" ".join((*ctx.conditions, _text(body))),
        ))
        return len(self.out) - 1

    def holds(self, slot: int, inner: frozenset[str]) -> None:
        self.out[slot] = replace(self.out[slot], inner=inner)

    def tasks(self, items: list[Any], path: Path, outer: _Ctx) -> frozenset[str]:
        """Walk a task list; returns the control ids tagged on the tasks in it."""
        found: set[str] = set()
        for item in items or ():
            if not isinstance(item, dict):
                self.problems.append(f"{self.rel(path)}: a task that is not a mapping: {item!r}")
                continue
            where = f"{self.rel(path)}:{item.get(_LINE, 0)}"
            here = replace(outer, tags=outer.tags | _tags(item.get("tags")))
            inside = replace(here, conditions=(*here.conditions, _text(item["when"]))) \
                if "when" in item else here
            if "block" in item:
                slot = self.add(item, path, here, "block")
                held = self.tasks(item.get("block") or [], path, inside)
                for section in ("rescue", "always"):
                    held |= self.tasks(item.get(section) or [], path,
                                       replace(inside, section=section))
                self.holds(slot, held)
                found |= held | control_ids(here.tags)
                continue
            action, args = _action(item)
            spec = args if isinstance(args, dict) else {}
            apply: dict[str, Any] = spec["apply"] if isinstance(spec.get("apply"), dict) else {}
            static = action in _IMPORT_TASKS | _IMPORT_ROLE
            # A dynamic include passes down only its `apply:` tags; a static import, its own.
            down = inside if static else replace(
                inside, tags=outer.tags | _tags(apply.get("tags")), dynamic=True)
            inner: frozenset[str] = frozenset()
            if action in _IMPORT_TASKS | _INCLUDE_TASKS:
                slot = self.add(item, path, here, "import" if static else "include")
                file_arg = spec.get("file") if spec else args
                target = (path.parent / str(file_arg)) if file_arg else None
                if target is None or not target.is_file():
                    self.problems.append(f"{where}: {action}: no such file {file_arg!r}")
                else:
                    inner = self.tasks_file(target, down)
                self.holds(slot, inner)
            elif action in _IMPORT_ROLE | _INCLUDE_ROLE:
                slot = self.add(item, path, here, "import" if static else "include")
                if spec.get("name"):
                    inner = self.role(str(spec["name"]), spec.get("tasks_from"), down, where)
                self.holds(slot, inner)
            else:
                registers: tuple[str, ...] = ()
                if item.get("register"):
                    registers += (str(item["register"]),)
                if action in _SET_FACT:
                    registers += tuple(str(k) for k in spec if k not in ("cacheable", _LINE))
                self.add(item, path, inside, "task", registers)
            found |= inner | control_ids(here.tags)
        return frozenset(found)

    def playbook_file(self, path: Path) -> None:
        for play in self.load(path):
            if not isinstance(play, dict):
                continue
            if "import_playbook" in play or "ansible.builtin.import_playbook" in play:
                continue  # walked on its own
            ctx = _Ctx(tags=_tags(play.get("tags")))
            self.tasks(play.get("pre_tasks") or [], path, ctx)
            for entry in play.get("roles") or ():
                spec = {"role": entry} if isinstance(entry, str) else dict(entry)
                name = str(spec.get("role") or spec.get("name") or "")
                where = f"{self.rel(path)}:{spec.get(_LINE, 0)}"
                here = replace(ctx, tags=ctx.tags | _tags(spec.get("tags")),
                               conditions=(_text(spec["when"]),) if "when" in spec else ())
                self.role(name, None, here, where)
            for section in ("tasks", "post_tasks"):
                self.tasks(play.get(section) or [], path, ctx)


def _role_of(path: Path, root: Path) -> str | None:
    parts = path.resolve().relative_to(root.resolve()).parts
    return parts[1] if len(parts) > 3 and parts[0] == "roles" and parts[2] == "tasks" else None


def load(project: Path) -> Project:
    """Every task of project/playbooks/*.yml in run order; task files no playbook reaches are
    read on their own (playbook None), so that their names and tags are checked too."""
    proj = Project()
    reached: set[Path] = set()
    for book in sorted((project / "playbooks").glob("*.yml")):
        walker = _Walker(project, book.name, proj.problems)
        walker.playbook_file(book)
        proj.tasks += walker.out
        reached |= walker.files
    for path in sorted((project / "roles").glob("*/tasks/*.y*ml")):
        if path.resolve() in reached:
            continue
        walker = _Walker(project, None, proj.problems)
        walker.tasks_file(path, _Ctx(role=_role_of(path, project)))
        proj.tasks += walker.out
        reached |= walker.files
    proj.problems[:] = list(dict.fromkeys(proj.problems))
    return proj


# --- the checks ------------------------------------------------------------------------------


def _uses(task: TaskRef, var: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(var)}(?!\w)", task.text) is not None


def check(proj: Project, known: Iterable[str], technical: Iterable[str],
          elsewhere: Iterable[str] = ()) -> list[str]:
    """What is wrong between the control ids in task names, tags and the registry.

    `known`: every control id; `technical`: those a task must implement, unless listed in
    `elsewhere` (implemented by the signer's code or outside this repository).
    """
    known = set(known)
    problems = list(proj.problems)
    seen: set[tuple[str, int, str]] = set()

    def report(t: TaskRef, what: str) -> None:
        key = (t.file, t.line, what)
        if key not in seen:
            seen.add(key)
            problems.append(f"task {t.where} ({t.name or t.kind}): {what}")

    for t in proj.tasks:
        have = t.controls | (t.inner if t.kind in ("block", "import") else frozenset())
        missing = [c for c in t.cited if c not in have]
        if missing:
            report(t, f"its name cites {', '.join(missing)}, but it is not tagged so")
        for cid in sorted(t.controls - known):
            report(t, f"tagged {cid}, which no controls/*.yml defines")
        if t.kind == "include":
            lost = sorted(t.inner - t.controls)
            if lost:
                report(t, f"includes tasks tagged {', '.join(lost)} without that tag itself: "
                          f"--tags {lost[0]} would not reach them")
        if t.playbook is None and t.runs and t.controls:
            report(t, f"tagged {', '.join(sorted(t.controls))}, but no playbook runs it")
    problems += _dependencies(proj)
    implemented = {c for t in proj.tasks if t.playbook and t.runs for c in t.controls}
    for cid in sorted(set(technical) - implemented - set(elsewhere)):
        problems.append(f"control {cid}: technical control without a task tagged {cid} "
                        "(nor `code:` or `implemented_outside:` in the registry)")
    return problems


def _dependencies(proj: Project) -> list[str]:
    """A task that uses what an earlier task registered needs that task whenever --tags
    selects it: every control id on the user is on the producer (or the producer is `always`).
    Otherwise `--tags ID` runs the user alone and fails on an undefined variable."""
    out: list[str] = []
    books = sorted({t.playbook for t in proj.tasks if t.playbook})
    seen: set[tuple[str, str, str]] = set()
    for book in books:
        tasks = [t for t in proj.tasks if t.playbook == book]
        producers: dict[str, TaskRef] = {}
        for t in tasks:
            if not t.runs:
                continue  # the conditions of blocks and imports are in their tasks' text
            for var, prod in producers.items():
                # A task's own register (until:, failed_when:) is its own result, whichever
                # import of a shared file (the roll-back sequence) it was reached through.
                if prod is t or var in t.registers or ALWAYS in prod.tags or not _uses(t, var):
                    continue
                lacking = sorted(t.controls - prod.controls)
                key = (t.where, var, ",".join(lacking))
                if lacking and key not in seen:
                    seen.add(key)
                    out.append(
                        f"task {t.where} ({t.name}): uses {var}, registered by {prod.where}, "
                        f"which is not tagged {', '.join(lacking)}: --tags {lacking[0]} would "
                        "run it without its input"
                    )
            for var in t.registers:
                producers[var] = t
    return out

