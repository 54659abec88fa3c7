"""The generated tables of threat-model/ (README.md: threats, residuals; CONTROL_IDS.md:
controls), rendered from the registry; `sync_docs` says where a document is out of date and
rewrites it on request (`invoke threat-model.check --write-tables`).
"""

from __future__ import annotations

from pathlib import Path

from toolkit.controls.registry import THREAT_MODEL, Control, Registry, band, id_key

# Which document of threat-model/ holds which generated tables.
DOCS = {"README.md": ("threats", "residuals"), "CONTROL_IDS.md": ("controls",)}
TABLES = DOCS["README.md"]
TIMES = "\u00d7"  # multiplication sign, as the README writes risks


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _implemented_by(control: Control) -> str:
    parts: list[str] = []
    roles = list(dict.fromkeys(t.role for t in control.tasks if t.role))
    plays = sorted({t.playbook for t in control.tasks if not t.role and t.playbook})
    if roles:
        parts.append("roles: " + ", ".join(roles))
    if plays:
        parts.append("plays: " + ", ".join(plays))
    if control.code:
        parts.append("code: " + ", ".join(c["module"] for c in control.code))
    if control.implemented_outside:
        parts.append("outside: " + control.implemented_outside)
    if control.kind == "procedure":
        parts.append("people: " + (control.owner or "(no owner)"))
    return _cell("; ".join(parts)) or "**nothing**"


def render_table(reg: Registry, name: str) -> str:
    """A Markdown table generated from the registry, for threat-model/README.md and
    CONTROL_IDS.md."""
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
    elif name == "controls":
        rows += [
            "| id | file | kind | applies to | control | mitigates | implemented by |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in sorted(reg.controls.values(), key=lambda c: id_key(c.id)):
            # An outside auditor's threshold is part of what the control promises.
            held = f"; outside auditor: {', '.join(map(str, c.auditors))}" if c.auditors else ""
            rows.append(
                f"| {c.id} | {c.source} | {c.kind} | {c.applies_to} | {_cell(c.title + held)} | "
                f"{', '.join(c.threats) or '-'} | {_implemented_by(c)} |"
            )
    else:
        raise ValueError(f"unknown table {name!r}")
    return "\n".join(rows) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN generated table: {name} (invoke threat-model.check --write-tables) -->\n",
        f"<!-- END generated table: {name} -->",
    )


def sync_tables(reg: Registry, doc: Path, write: bool = False) -> list[str]:
    """Problems where a document's generated tables (DOCS) differ from the registry; rewrite
    them if asked."""
    if not doc.exists():
        return [f"{doc.name}: missing"]
    text = original = doc.read_text()
    problems: list[str] = []
    for name in DOCS.get(doc.name, TABLES):
        begin, end = _markers(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            problems.append(f"{doc.name}: no generated '{name}' table (markers missing)")
            continue
        body = render_table(reg, name)
        if text[start + len(begin) : stop] != body:
            text = text[: start + len(begin)] + body + text[stop:]
            if not write:
                problems.append(
                    f"{doc.name}: the '{name}' table is out of date with the registry "
                    "(run: invoke threat-model.check --write-tables)"
                )
    if write and text != original:
        doc.write_text(text)
    return problems


def sync_docs(reg: Registry, root: Path = THREAT_MODEL, write: bool = False) -> list[str]:
    """sync_tables over every document of threat-model/ that has generated tables."""
    return [p for name in DOCS for p in sync_tables(reg, root / name, write)]
