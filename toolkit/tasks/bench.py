"""`invoke bench`: the figures of toolkit.bench.figures, into reports/bench/ and a table."""

from __future__ import annotations

from pathlib import Path

from invoke.context import Context
from invoke.tasks import task

from toolkit import pipeline
from toolkit.bench import figures


@task(help={
    "instance": "lab instance for the lab figures (default lab6)",
    "cold": "also measure a cold lab.up (removes and rebuilds the cached base image)",
    "no_lab": "only the figures that need no VM (signer throughput, hashing, audit "
              "forwarding on vs off, audit start-up)",
    "audit_sizes": "history lengths for the audit start-up figures, comma-separated "
                   "(default 100000,1000000,10000000; empty: skip them)",
    "before": "a checkout of another version (git worktree add /tmp/before main): its signer "
              "daemon runs beside this one's, measured alternately in the same run",
    "lab_tests": "after verify, also time each half of the lab tests (CI runs them at once on "
                 "two VMs; here one after the other on the bench's VM: about 17 min more)",
})
def bench(c: Context, instance: str = "lab6", cold: bool = False, no_lab: bool = False,
          audit_sizes: str = "100000,1000000,10000000", before: str = "",
          lab_tests: bool = False) -> None:
    """Measure: signer vs raw token (and vs another checkout's daemon with --before), hashing
    vs sha256sum, signing with audit forwarding on vs off, audit start-up with history (full
    replay vs from the last checkpoint), lab up/reset, plays, verify (and with --lab-tests
    each half of the lab tests)."""
    try:
        sizes = tuple(int(x) for x in audit_sizes.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--audit-sizes: not a comma-separated list of entry counts: "
                         f"{audit_sizes!r}") from None
    checkout = Path(before).resolve() if before else None
    if checkout is not None and not (checkout / "signer" / "daemon.py").is_file():
        raise SystemExit(f"--before: {before} is not a checkout of this toolkit")
    if lab_tests and no_lab:
        raise SystemExit("--lab-tests needs the lab: it cannot go with --no-lab")
    halves = {half: pipeline.lab_tests_argv(None, None, half, str(
        figures.OUT / f"lab-tests-{half}.junit.xml")) for half in ("first", "second", "early")}
    result = figures.collect(instance, cold, no_lab, sizes, checkout,
                             halves if lab_tests else None)
    path = figures.write(result)
    print("\n==> bench results")
    for key, val in figures.flatten(result).items():
        print(f"  {key:<48} {val}")
    print(f"  written to {path}")
