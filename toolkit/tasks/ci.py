"""`invoke up` (the main job on the lab) and `invoke ci` (everything CI runs)."""

from __future__ import annotations

from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from toolkit import exitcodes, pipeline


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


def _releases(releases: str) -> list[str]:
    names = [r.strip() for r in releases.split(",") if r.strip()]
    unknown = [r for r in names if r not in pipeline.RELEASES]
    if not names or unknown or len(set(names)) != len(names):
        raise Exit(f"--releases: {releases!r}: name each of "
                   f"{', '.join(pipeline.RELEASES)} at most once, comma-separated",
                   code=exitcodes.BAD_INPUT)
    return names


@task(help={
    "instance": "lab instance used for the pipeline (default lab9, so your lab0 is untouched)",
    "skip_lab": "only the static checks and the tests that need no VM",
    "keep": "leave the lab up after a failure (for debugging)",
    "lab_only": "only the lab pipeline (skip the static checks and the VM-less tests)",
    "releases": "Debian releases to prove, comma-separated (default trixie,bookworm): the "
                "first gets the whole pipeline and the lab tests (their second half on a VM "
                "of its own), each other one provision -> verify on an instance of its own "
                "(lab6, lab5, ...), beside it",
})
def ci(c: Context, instance: str = "lab9", skip_lab: bool = False, keep: bool = False,
       lab_only: bool = False, releases: str = "trixie,bookworm") -> None:
    """Static checks, unit and signer tests, then the whole pipeline on a fresh lab VM,
    driven by the production-style inventory `lab.site` renders (pipeline.lab_stages), on
    the first release; the other releases run provision -> harden -> harden again -> deploy
    -> verify beside it, each on its own VM (`invoke ci-lane`), and a second VM of the first
    release runs the second half of the lab tests (`invoke ci-lane --lab-tests`) while the
    pipeline's VM runs the first. The summary names each.

    The same run as CI (`.ci/run`). The lab instances are brought up fresh and torn down at
    the end, whatever happens (unless --keep after a failure).
    """
    first, *others = _releases(releases)
    stages = pipeline.ci_stages(instance, [first, *others], tests=not lab_only,
                                lab=not skip_lab, keep=keep)
    title = "invoke ci" if skip_lab else (
        f"invoke ci ({', '.join(pipeline.RELEASES[r] for r in [first, *others])}; "
        f"{pipeline.RELEASES[first]} driven by {pipeline.site_inventory(instance)}, "
        "rendered from inventory/production.example)")
    ok = pipeline.run(stages, title=title, env_extra={"SIGNLAB_INSTANCE": instance,
                                                           "SIGNLAB_REQUIRE_LAB": "1"})
    if not ok:
        raise Exit("invoke ci: FAILED (see the summary above)", code=1)


@task(help={
    "release": "the Debian release of the lane (trixie or bookworm)",
    "instance": "lab instance of the lane (default lab6)",
    "keep": "leave the lab up after a failure (for debugging)",
    "lab_tests": "instead of the release's proof, the second half of the lab tests "
                 "(pipeline.LAB_TESTS_SECOND_HALF) through the production-style site",
    "gate": "with --lab-tests: park after the early part of the lab tests until this file "
            "says 'open' (`invoke ci` opens it once its verify has run alone; anything else "
            "in it stops the lane)",
    "park": "with --gate: the file written once parked (default: the gate's name + .parked)",
})
def ci_lane(c: Context, release: str = "", instance: str = "lab6", keep: bool = False,
            lab_tests: bool = False, gate: str = "", park: str = "") -> None:
    """One release on a fresh VM of its own: lab.up -> provision -> harden -> harden again
    (changed=0) -> deploy -> verify -> down (pipeline.release_lane_stages). `invoke ci` runs
    one per release after the first, beside the main pipeline; its logs and summary are in
    reports/ci/<release>/.

    With --lab-tests: lab.up -> lab.site -> provision -> harden -> deploy -> the second half
    of the lab tests -> down (pipeline.lab_tests_lane_stages), in reports/ci/<release>-lab-tests/;
    `invoke ci` runs it for the first release while that one's VM runs the first half."""
    if not release:  # an option, not a positional: `invoke ci-lane --help` shows the help
        raise Exit("invoke ci-lane: --release is required (trixie or bookworm)",
                   code=exitcodes.BAD_INPUT)
    (rel,) = _releases(release)
    if (gate or park) and not lab_tests:
        raise Exit("invoke ci-lane: --gate and --park go with --lab-tests",
                   code=exitcodes.BAD_INPUT)
    if park and not gate:
        raise Exit("invoke ci-lane: --park needs --gate", code=exitcodes.BAD_INPUT)
    stages = (pipeline.lab_tests_lane_stages(instance, rel, Path(gate) if gate else None,
                                             Path(park) if park else None) if lab_tests
              else pipeline.release_lane_stages(instance, rel))
    if keep:
        for s in stages[:-2]:
            s.always = False
    what = "lab tests, second half" if lab_tests else "release"
    ok = pipeline.run(stages,
                      title=f"invoke ci-lane ({pipeline.RELEASES[rel]}, {what}, {instance})",
                      env_extra={"SIGNLAB_INSTANCE": instance, "SIGNLAB_RELEASE": rel,
                                 "SIGNLAB_REQUIRE_LAB": "1"},
                      ci_dir=pipeline.lane_dir(rel, lab_tests=lab_tests))
    if not ok:
        raise Exit(f"invoke ci-lane {rel}: FAILED (see the summary above)", code=1)
