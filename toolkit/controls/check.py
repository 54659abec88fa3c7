"""`invoke threat-model.check`: every broken link between threats, controls, tasks, code and
tests, one line each (threat-model/README.md, "Consistency", lists the rules).

The links themselves come from toolkit/controls/registry.py (threats, controls, markers) and
toolkit/controls/task_tags.py (tags); this module only judges them.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.controls import task_tags
from toolkit.controls.registry import Registry, TestRef, id_key


def _module_exists(project: Path, module: str) -> bool:
    base = project.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def check(
    reg: Registry, tests: list[TestRef] | None = None, posture_dir: str = "tests/posture/"
) -> list[str]:
    """Every broken link between threats, controls, tasks, code and tests, one line each."""
    tests = reg.tests if tests is None else tests
    problems = list(reg.problems)
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

    for cid, tids in sorted(undefined.items(), key=lambda kv: id_key(kv[0])):
        problems.append(
            f"control {cid}: named by {', '.join(tids)}, but no controls/*.yml defines it"
        )

    referenced = {cid for t in reg.active for cid in t.controls}
    technical: list[str] = []
    elsewhere: list[str] = []
    bounds: dict[tuple[str, str, str], str] = {}  # (auditor, figure, bound) -> its control
    for control in reg.controls.values():
        where = f"control {control.id} ({control.source})"
        for th in control.auditors:
            key = (th.auditor, th.figure, th.bound)
            if key in bounds:
                problems.append(f"{where}: auditors: {th} is a second threshold for "
                                f"{th.auditor} {th.figure} (the first is under {bounds[key]}): "
                                "a threshold is written once")
            bounds.setdefault(key, control.id)
        if control.id not in referenced:
            problems.append(f"{where}: mitigates no threat in threats.yml")
        if control.kind == "procedure":
            if not control.procedure:
                problems.append(f"{where}: procedure without audit text (procedure:)")
            continue
        technical.append(control.id)
        if control.code or control.implemented_outside:
            elsewhere.append(control.id)
        if control.implemented_outside and control.tasks:
            problems.append(
                f"{where}: implemented_outside, but tasks are tagged {control.id} "
                f"({control.tasks[0].where}): one of the two is wrong"
            )
        for entry in control.code:
            if reg.project is not None and not _module_exists(reg.project, entry["module"]):
                problems.append(f"{where}: code: module {entry['module']} does not exist")
        if not marked.get(control.id):
            problems.append(f"{where}: technical control without a test")

    problems += task_tags.check(reg.tasks, reg.controls, technical, elsewhere)

    for t in tests:
        for cid in t.controls:
            if cid not in reg.controls:
                problems.append(f"test {t.nodeid}: marker names unknown control {cid}")
        if t.nodeid.startswith(posture_dir) and not t.controls:
            problems.append(f"test {t.nodeid}: posture test without a control marker")
    return problems


def summary(reg: Registry) -> str:
    """One line: how many threats, controls, tagged tasks and marked tests the registry has."""
    kinds = [ctl.kind for ctl in reg.controls.values()]
    marked = sum(1 for t in reg.tests if t.controls)
    high = sum(1 for t in reg.active if t.high)
    tagged = {(t.file, t.line) for t in reg.tasks.tasks if t.playbook and t.controls}
    return (
        f"threat model: {len(reg.active)} threats ({high} high or critical), "
        f"{len(reg.controls)} controls ({kinds.count('technical')} technical, "
        f"{kinds.count('procedure')} procedures), {len(tagged)} tasks tagged with "
        f"control ids, {marked} tests with control markers"
    )


def group_problems(problems: list[str]) -> dict[str, list[str]]:
    """check()'s problems by what they are about (threat, control, task, test, registry)."""
    groups: dict[str, list[str]] = {}
    for line in problems:
        head = line.split(" ", 1)[0].rstrip(":")
        key = head if head in ("threat", "control", "task", "test") else "registry"
        groups.setdefault(key, []).append(line)
    return groups
