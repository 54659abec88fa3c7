"""`invoke up` (the main job on the lab) and `invoke ci` (everything CI runs)."""

from __future__ import annotations

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from toolkit import pipeline
from toolkit.pipeline import Stage, invoke


@task(help={"instance": "lab instance (default: $SIGNLAB_INSTANCE or lab0)"})
def up(c: Context, instance: str | None = None) -> None:
    """The main job on the lab: lab.up -> provision -> harden -> deploy -> verify.

    Leaves the lab running so you can look around (`invoke lab.ssh`); reports in reports/.
    """
    env = {"SIGNLAB_INSTANCE": instance} if instance else {}
    stages = pipeline.main_job_stages(instance)
    if not pipeline.run(stages, title="invoke up", env_extra=env):
        raise Exit("invoke up: a stage failed (see above); the lab is left up for inspection",
                   code=1)


@task(help={
    "instance": "lab instance used for the pipeline (default lab9, so your lab0 is untouched)",
    "skip_lab": "only the static checks and the tests that need no VM",
    "keep": "leave the lab up after a failure (for debugging)",
    "lab_only": "only the lab pipeline (skip the static checks and the VM-less tests)",
})
def ci(c: Context, instance: str = "lab9", skip_lab: bool = False, keep: bool = False,
       lab_only: bool = False) -> None:
    """Static checks, unit and signer tests, then the whole pipeline on a fresh lab VM,
    driven by the production-style inventory `lab.site` renders (pipeline.lab_stages).

    The same run as CI (`.ci/run`). The lab instance is brought up fresh and torn down at
    the end, whatever happens (unless --keep after a failure).
    """
    tests = [] if lab_only else pipeline.test_stages()
    stages = [] if lab_only else pipeline.static_stages() + tests
    if not skip_lab:
        # The unit and signer tests need no VM: they run while the lab is built and provisioned
        # (image build and emulated guest leave the controller's CPUs mostly idle).
        # Joined before harden, so their JUnit record exists when verify cites it.
        for t in tests:
            t.until = "harden"
        lab = pipeline.lab_stages(instance, [pipeline.UNIT_RECORD] if tests else [])
        # A fresh VM: whatever an earlier run left of this instance goes first.
        stages.append(Stage("lab.down (before)", invoke("lab.down", "--instance", instance)))
        stages += lab
        if keep:
            for s in lab:
                s.always = False
    title = "invoke ci" if skip_lab else (
        f"invoke ci (VM driven by {pipeline.site_inventory(instance)}, "
        "rendered from inventory/production.example)")
    ok = pipeline.run(stages, title=title, env_extra={"SIGNLAB_INSTANCE": instance,
                                                           "SIGNLAB_REQUIRE_LAB": "1"})
    if not ok:
        raise Exit("invoke ci: FAILED (see the summary above)", code=1)
