"""CI's JUnit records as evidence (toolkit.controls.ci_record): a real pytest run writes one
with the plugin, and only a record of this very commit, from a clean tree, can vouch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from toolkit.controls import ci_record

SAMPLE = """
import pytest

def test_ok():
    pass

def test_bad():
    assert False

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1

def test_skip():
    pytest.skip("not here")
"""


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ci")
    (tmp / "test_sample.py").write_text(textwrap.dedent(SAMPLE))
    out = tmp / "reports" / "unit.junit.xml"
    env = dict(os.environ, PYTHONPATH=str(ci_record.ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "toolkit.controls.ci_record", f"--junitxml={out}", "--rootdir", str(tmp),
         str(tmp / "test_sample.py")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1, r.stdout + r.stderr  # test_bad fails, as written
    return out


def test_the_plugin_stamps_the_commit_and_each_outcome_is_read(record: Path) -> None:
    stamp, outcomes = ci_record.read(record)
    commit, dirty = ci_record.toolkit_state()
    assert commit and stamp["commit"] == commit
    assert stamp["dirty"] is dirty
    assert (stamp["tests"], stamp["failed"]) == (5, 2)
    assert outcomes == {
        "test_sample.py::test_ok": "passed",
        "test_sample.py::test_bad": "failed",
        "test_sample.py::test_param": "failed",  # one parameter failed: the test failed
        "test_sample.py::test_skip": "skipped",
    }


def test_only_a_record_of_this_clean_commit_vouches(record: Path) -> None:
    commit, _ = ci_record.toolkit_state()
    assert commit
    stamp, _ = ci_record.read(record)
    if stamp["dirty"] is False:
        assert ci_record.load([record], commit, False).usable
    other = ci_record.load([record], "f" * 40, False)
    assert not other.usable and f"not this toolkit's {'f' * 12}" in other.why
    mine_dirty = ci_record.load([record], commit, True)
    assert not mine_dirty.usable and "uncommitted changes" in mine_dirty.why
    assert not ci_record.load([], commit, False).usable


def test_a_file_that_is_not_a_stamped_record_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.xml"
    plain.write_text('<testsuites><testsuite name="pytest" tests="1">'
                     '<testcase classname="t" name="x"/></testsuite></testsuites>')
    with pytest.raises(ci_record.RecordError, match="not stamped with the toolkit commit"):
        ci_record.read(plain)
    with pytest.raises(ci_record.RecordError, match="not a readable JUnit XML"):
        ci_record.read(tmp_path / "missing.xml")
    (tmp_path / "junk.xml").write_text("<testsuites><")
    with pytest.raises(ci_record.RecordError, match="not a readable JUnit XML"):
        ci_record.read(tmp_path / "junk.xml")


def test_ci_passes_its_record_to_verify() -> None:
    from toolkit import pipeline

    unit = pipeline.test_stages()[0]
    assert f"--junitxml={pipeline.UNIT_RECORD}" in unit.argv
    assert "toolkit.controls.ci_record" in unit.argv
    verify = {s.name: s for s in pipeline.lab_stages("lab9", [pipeline.UNIT_RECORD])}["verify"]
    assert verify.argv[-2:] == ["--ci-evidence", pipeline.UNIT_RECORD]
