"""`invoke bench`: the figures of toolkit.bench.figures, into reports/bench/ and a table."""

from __future__ import annotations

from invoke.context import Context
from invoke.tasks import task

from toolkit.bench import figures


@task(help={
    "instance": "lab instance for the lab figures (default lab6)",
    "cold": "also measure a cold lab.up (removes and rebuilds the cached base image)",
    "no_lab": "only the figures that need no VM (signer throughput, hashing)",
})
def bench(c: Context, instance: str = "lab6", cold: bool = False, no_lab: bool = False) -> None:
    """Measure: signer vs raw token, hashing vs sha256sum, lab up/reset, plays, verify."""
    result = figures.collect(instance, cold, no_lab)
    path = figures.write(result)
    print("\n==> bench results")
    for key, val in figures.flatten(result).items():
        print(f"  {key:<48} {val}")
    print(f"  written to {path}")
