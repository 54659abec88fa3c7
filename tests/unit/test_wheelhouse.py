"""The signing host's wheelhouse: built from the hash lock with real pip, refused when it drifts.

The build downloads the locked wheels from PyPI (pip's cache makes later runs quick) and builds
the signer's wheel from this checkout; each test tampers with its own copy.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from invoke.context import Context
from invoke.exceptions import Exit

from toolkit.runner import playbook, wheelhouse
from toolkit.runner.wheelhouse import ROOT, WheelhouseError
from toolkit.tasks import plays

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheelhouse.build(force=True, wheelhouse=tmp_path_factory.mktemp("wh") / "wheelhouse")


@pytest.fixture
def wh(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "wheelhouse"
    shutil.copytree(built, copy)
    return copy


def _wheel(wh: Path, project: str) -> Path:
    (found,) = [p for p in wh.glob("*.whl") if p.name.startswith(project + "-")]
    return found


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_the_wheelhouse_holds_the_locked_wheels_and_the_signer_pinned_by_hash(built: Path) -> None:
    locked = wheelhouse.read_lock()
    assert set(locked) == {"asn1crypto", "cffi", "cryptography", "pycparser", "python-pkcs11"}
    shipped = wheelhouse.parse_requirements((built / "requirements.txt").read_text(), "shipped")
    signer = shipped.pop("signing-host")
    assert shipped == locked
    assert signer.hashes == {_sha256(_wheel(built, "signing_host"))}
    for name, pin in locked.items():
        wheel = _wheel(built, name.replace("-", "_"))
        assert f"-{pin.version}-" in wheel.name
        assert _sha256(wheel) in pin.hashes
        # Binary wheels for the host: CPython 3.11 (or the stable ABI) on manylinux x86_64.
        assert wheel.name.endswith("-none-any.whl") or (
            ("cp311-cp311" in wheel.name or "abi3" in wheel.name) and "x86_64" in wheel.name
        )
    wheelhouse.verify(built)


@pytest.fixture(scope="module")
def host_venv(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same command the signer role runs, with Debian 12's own python3 and pip.
    venv = tmp_path_factory.mktemp("host") / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [venv / "bin" / "pip", "install", "--quiet", "--no-index", "--find-links", built,
         "--require-hashes", "-r", built / "requirements.txt"],
        check=True,
    )
    return venv


def test_the_host_installs_it_offline_with_hashes_required(host_venv: Path) -> None:
    out = subprocess.run(
        [host_venv / "bin" / "python", "-c",
         "import signer, pkcs11, cryptography, asn1crypto; print(cryptography.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert out == wheelhouse.read_lock()["cryptography"].version


def _role_probe() -> str:
    tasks = yaml.safe_load((ROOT / "roles/signer/tasks/install.yml").read_text())
    (task,) = [t for t in tasks if t["name"].startswith("Find installed distributions")]
    script: str = task["ansible.builtin.command"]["argv"][2]
    return script


@pytest.mark.parametrize("dropped", [[], ["asn1crypto"], ["cffi", "pycparser"]])
def test_the_role_finds_what_an_earlier_lock_left_in_the_venv(
    host_venv: Path, built: Path, tmp_path: Path, dropped: list[str]
) -> None:
    # The signer role's own probe, run by the host's python against a lock that no longer
    # lists `dropped`: exactly those are reported (and nothing when the venv matches).
    text = (built / "requirements.txt").read_text()
    for name in dropped:
        text = re.sub(rf"(?ms)^{name}==.*?(?=^[a-z])", "", text)
    req = tmp_path / "requirements.txt"
    req.write_text(text)
    assert set(wheelhouse.parse_requirements(text, "r")) | set(dropped) == {
        "signing-host", *wheelhouse.read_lock()}
    out = subprocess.run([host_venv / "bin" / "python", "-c", _role_probe(), req],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out == dropped


def test_an_unchanged_checkout_reuses_the_wheelhouse(wh: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in wh.iterdir()}
    assert wheelhouse.build(wheelhouse=wh) == wh
    assert {p.name: p.stat().st_mtime_ns for p in wh.iterdir()} == before


def test_a_tampered_wheel_is_refused(wh: Path) -> None:
    wheel = _wheel(wh, "cryptography")
    blob = bytearray(wheel.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    wheel.write_bytes(bytes(blob))
    with pytest.raises(WheelhouseError, match=f"{wheel.name} does not match its hash in the lock"):
        wheelhouse.verify(wh)
    # build() does not repair it behind the operator's back: sources and lock are unchanged.
    with pytest.raises(WheelhouseError, match="does not match its hash"):
        wheelhouse.build(wheelhouse=wh)


def test_a_wheel_swapped_together_with_its_hash_is_refused(wh: Path) -> None:
    wheel = _wheel(wh, "asn1crypto")
    old = _sha256(wheel)
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    req = wh / "requirements.txt"
    req.write_text(req.read_text().replace(old, _sha256(wheel)))
    with pytest.raises(WheelhouseError, match=r"does not match requirements/signer-host\.lock "
                                              r"\(asn1crypto\)"):
        wheelhouse.verify(wh)


def test_a_wheelhouse_built_from_another_lock_is_refused(wh: Path, tmp_path: Path) -> None:
    # The committed lock moved on (another pycparser hash set) but the wheelhouse did not.
    lock = tmp_path / "signer-host.lock"
    text = wheelhouse.LOCK.read_text()
    pin = wheelhouse.read_lock()["pycparser"]
    for h in pin.hashes:
        text = text.replace(h, hashlib.sha256(h.encode()).hexdigest())
    lock.write_text(text)
    with pytest.raises(WheelhouseError, match=r"does not match .*signer-host\.lock \(pycparser\)"):
        wheelhouse.verify(wh, lock_file=lock)


def test_a_wheel_outside_the_lock_is_refused(wh: Path) -> None:
    shutil.copy(_wheel(wh, "asn1crypto"), wh / "six-1.17.0-py2.py3-none-any.whl")
    with pytest.raises(WheelhouseError, match=r"six-1\.17\.0-py2\.py3-none-any\.whl is not in "
                                              r"the lock"):
        wheelhouse.verify(wh)


def test_a_second_version_of_a_locked_project_is_refused(wh: Path) -> None:
    shutil.copy(_wheel(wh, "asn1crypto"), wh / "asn1crypto-1.5.0-py2.py3-none-any.whl")
    with pytest.raises(WheelhouseError, match=r"asn1crypto-1\.5\.0-py2\.py3-none-any\.whl is not"):
        wheelhouse.verify(wh)


def test_a_missing_wheel_is_refused(wh: Path) -> None:
    _wheel(wh, "pycparser").unlink()
    with pytest.raises(WheelhouseError, match="no wheel for pycparser of the lock"):
        wheelhouse.verify(wh)


def test_a_signer_wheel_that_is_not_this_checkout_is_refused(wh: Path) -> None:
    wheel = _wheel(wh, "signing_host")
    old = _sha256(wheel)
    src = wheel.with_suffix(".orig")
    wheel.rename(src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(wheel, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "signer/__init__.py":
                data += b"\nimport os  # planted\n"
            zout.writestr(info, data)
    src.unlink()
    req = wh / "requirements.txt"
    req.write_text(req.read_text().replace(old, _sha256(wheel)))
    with pytest.raises(WheelhouseError, match="is not the signer of this checkout"):
        wheelhouse.verify(wh)


def test_no_requirements_file_is_refused(wh: Path) -> None:
    (wh / "requirements.txt").unlink()
    with pytest.raises(WheelhouseError, match=r"has no requirements\.txt"):
        wheelhouse.verify(wh)


def test_deploy_refuses_a_tampered_wheelhouse_before_touching_a_host(
    wh: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = _wheel(wh, "cffi")
    wheel.write_bytes(wheel.read_bytes()[:-1])
    monkeypatch.setattr(wheelhouse, "WHEELHOUSE", wh)
    touched: list[str] = []
    monkeypatch.setattr(playbook, "play", lambda *a, **k: touched.append("play"))

    def reached_the_host(*a: object, **k: object) -> dict[str, str]:
        touched.append("ssh")
        return {}

    monkeypatch.setattr(playbook, "daemon_invocations", reached_the_host)
    with pytest.raises(Exit) as exc:
        plays.deploy(Context(), inventory="inventory/production.example",
                               expect_unchanged=True)
    assert exc.value.code == 1
    message = str(exc.value.message)
    assert message.startswith(f"deploy: {wh}: {wheel.name} does not match its hash in the lock")
    assert "\n" not in message
    assert touched == []


def test_the_committed_lock_is_what_lock_deps_writes(tmp_path: Path) -> None:
    # uv keeps the pins of an existing output file: recompiling the committed lock must give it
    # back unchanged, so it agrees with pyproject.toml and was written by the documented command.
    lock = tmp_path / "signer-host.lock"
    shutil.copy(wheelhouse.LOCK, lock)
    wheelhouse.lock(lock_file=lock)
    assert lock.read_text() == wheelhouse.LOCK.read_text()


@pytest.mark.parametrize(
    ("deps", "message"),
    [
        (["cryptography>=99"], r"wants cryptography>=99, the lock pins cryptography==46"),
        (["requests"], r"wants requests, the lock pins nothing"),
    ],
)
def test_a_lock_behind_pyproject_is_refused(deps: list[str], message: str) -> None:
    pins = wheelhouse.read_lock()
    wheelhouse.check_lock_covers(wheelhouse.project_dependencies(), pins, "lock")
    with pytest.raises(WheelhouseError, match=message + r".*run `invoke lock-deps`"):
        wheelhouse.check_lock_covers(deps, pins, "lock")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("asn1crypto==1.5.1\n", "has no --hash"),
        ("asn1crypto>=1.5 --hash=sha256:aa\n", "is not pinned with == alone"),
        ("asn1crypto==1.5.1; python_version<'3' --hash=sha256:aa\n", "not a hash-locked"),
        ("--index-url https://example.org/simple\n", "not a hash-locked requirement"),
        ("-e .\n", "not a hash-locked requirement"),
        ("asn1crypto==1.5.1 --hash=md5:aa\n", "not a hash-locked requirement"),
        ("a==1 --hash=sha256:aa\nA==1 --hash=sha256:bb\n", "a is pinned twice"),
    ],
)
def test_a_requirements_file_that_is_not_a_hash_lock_is_refused(text: str, message: str) -> None:
    with pytest.raises(WheelhouseError, match=message):
        wheelhouse.parse_requirements(text, "x.lock")


def test_continuation_lines_and_comments_are_read() -> None:
    text = "# header\nfoo-Bar==2.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via x\n"
    assert wheelhouse.parse_requirements(text, "x") == {
        "foo-bar": wheelhouse.Pin("foo-bar", "2.0", frozenset({"aa", "bb"}))
    }
