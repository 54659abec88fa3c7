"""inventory/lab passes the same check as every customer inventory (it reads the running
instance's facts, so this runs with the lab up; tests/unit checks production.example)."""

from __future__ import annotations

from lab.state import LabState
from toolkit.runner import inventory_check
from toolkit.runner.ansible_run import ROOT


def test_the_lab_inventory_passes(lab: LabState) -> None:
    result = inventory_check.check(str(ROOT / "inventory" / "lab"))
    assert result.ok, "\n".join(result.lines())
