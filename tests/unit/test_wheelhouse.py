"""The signing hosts' wheelhouses: built from the hash locks with real pip, refused when they drift.

The build downloads the locked wheels for every supported host (Debian 12's CPython 3.11, Debian
13's 3.13) from PyPI (pip's cache makes later runs quick) and builds the signer's wheel from this
checkout; each test tampers with its own copy. The signer role's choice of a wheelhouse from the
host's Python runs for real in a local ansible-playbook.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from invoke.context import Context
from invoke.exceptions import Exit

from toolkit.runner import playbook, wheelhouse
from toolkit.runner.wheelhouse import ROOT, Target, WheelhouseError
from toolkit.tasks import plays

pytestmark = pytest.mark.slow

PY311 = wheelhouse.target_for("3.11")
PY313 = wheelhouse.target_for("3.13")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding every target's wheelhouse."""
    return wheelhouse.build(force=True, wheelhouse=tmp_path_factory.mktemp("wh") / "wheelhouse")


@pytest.fixture
def whs(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "wheelhouse"
    shutil.copytree(built, copy)
    return copy


@pytest.fixture
def wh(whs: Path) -> Path:
    """A copy of the Debian 12 (CPython 3.11) wheelhouse."""
    return whs / PY311.name


def _wheel(wh: Path, project: str) -> Path:
    (found,) = [p for p in wh.glob("*.whl") if p.name.startswith(project + "-")]
    return found


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_the_targets_are_debian_12_and_13() -> None:
    assert [(t.name, t.python, t.abi, t.glibc) for t in wheelhouse.TARGETS] == [
        ("cp311-manylinux_2_36", "3.11", "cp311", (2, 36)),
        ("cp313-manylinux_2_41", "3.13", "cp313", (2, 41)),
    ]
    assert [t.lock.relative_to(ROOT).as_posix() for t in wheelhouse.TARGETS] == [
        "requirements/signer-host-py311.lock", "requirements/signer-host-py313.lock"]


@pytest.mark.parametrize("target", wheelhouse.TARGETS, ids=lambda t: t.name)
def test_each_target_gets_its_locked_wheels_and_the_signer_pinned_by_hash(
    built: Path, target: Target
) -> None:
    wh = built / target.name
    locked = wheelhouse.read_lock(target.lock)
    assert set(locked) == {"asn1crypto", "cffi", "cryptography", "pycparser", "pycryptodome",
                           "python-pkcs11"}
    shipped = wheelhouse.parse_requirements((wh / "requirements.txt").read_text(), "shipped")
    signer = shipped.pop("signing-host")
    assert shipped == locked
    assert signer.hashes == {_sha256(_wheel(wh, "signing_host"))}
    cp = target.abi
    for name, pin in locked.items():
        wheel = _wheel(wh, name.replace("-", "_"))
        assert f"-{pin.version}-" in wheel.name
        assert _sha256(wheel) in pin.hashes
        # Binary wheels for the host: its CPython (or the stable ABI) on manylinux x86_64.
        assert wheel.name.endswith("-none-any.whl") or (
            (f"{cp}-{cp}" in wheel.name or "abi3" in wheel.name) and "x86_64" in wheel.name
        ), wheel.name
    # cffi has no stable-ABI wheel: the one shipped is the target's own.
    assert f"-{cp}-{cp}-" in _wheel(wh, "cffi").name
    wheelhouse.verify(wh, target)
    assert sorted(p.name for p in built.iterdir()) == [
        ".build.lock", *sorted(t.name for t in wheelhouse.TARGETS)]


@pytest.fixture(scope="module")
def host_venv(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same command the signer role runs, with Debian 12's own python3 and pip.
    venv = tmp_path_factory.mktemp("host") / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [venv / "bin" / "pip", "install", "--quiet", "--no-index", "--find-links",
         built / PY311.name, "--require-hashes", "-r", built / PY311.name / "requirements.txt"],
        check=True,
    )
    return venv


def test_the_host_installs_it_offline_with_hashes_required(host_venv: Path) -> None:
    out = subprocess.run(
        [host_venv / "bin" / "python", "-c",
         "import signer, pkcs11, cryptography, asn1crypto; print(cryptography.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert out == wheelhouse.read_lock(PY311.lock)["cryptography"].version


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
    text = (built / PY311.name / "requirements.txt").read_text()
    for name in dropped:
        text = re.sub(rf"(?ms)^{name}==.*?(?=^[a-z])", "", text)
    req = tmp_path / "requirements.txt"
    req.write_text(text)
    assert set(wheelhouse.parse_requirements(text, "r")) | set(dropped) == {
        "signing-host", *wheelhouse.read_lock(PY311.lock)}
    out = subprocess.run([host_venv / "bin" / "python", "-c", _role_probe(), req],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out == dropped


def test_an_unchanged_checkout_reuses_the_wheelhouse(whs: Path) -> None:
    def mtimes() -> dict[str, int]:
        return {str(p.relative_to(whs)): p.stat().st_mtime_ns for p in whs.rglob("*")
                if p.name != ".build.lock"}

    before = mtimes()
    assert len(before) == 2 * 10
    assert wheelhouse.build(wheelhouse=whs) == whs
    assert mtimes() == before


def test_a_second_build_waits_for_the_first(whs: Path) -> None:
    # Another deploy on this controller holds the build lock, half-way through writing the
    # Debian 13 wheelhouse: this build neither reads nor writes until the lock is released,
    # then finds the finished wheelhouse (it would refuse the half-written one).
    done: list[object] = []

    def second() -> None:
        try:
            done.append(wheelhouse.build(wheelhouse=whs))
        except WheelhouseError as e:
            done.append(e)

    req = whs / PY313.name / "requirements.txt"
    written = req.read_bytes()
    with (whs / ".build.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        req.unlink()
        t = threading.Thread(target=second)
        t.start()
        t.join(timeout=3)
        assert t.is_alive()
        assert done == []
        req.write_bytes(written)
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(timeout=120)
    assert done == [whs]


def test_a_tampered_wheel_is_refused(wh: Path) -> None:
    wheel = _wheel(wh, "cryptography")
    blob = bytearray(wheel.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    wheel.write_bytes(bytes(blob))
    with pytest.raises(WheelhouseError, match=f"{wheel.name} does not match its hash in the lock"):
        wheelhouse.verify(wh, PY311)
    # build() does not repair it behind the operator's back: sources and lock are unchanged.
    with pytest.raises(WheelhouseError, match="does not match its hash"):
        wheelhouse.build(wheelhouse=wh.parent)


def test_a_wheel_swapped_together_with_its_hash_is_refused(wh: Path) -> None:
    wheel = _wheel(wh, "asn1crypto")
    old = _sha256(wheel)
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    req = wh / "requirements.txt"
    req.write_text(req.read_text().replace(old, _sha256(wheel)))
    with pytest.raises(WheelhouseError, match=r"does not match requirements/signer-host-py311\.lock "
                                              r"\(asn1crypto\)"):
        wheelhouse.verify(wh, PY311)


def test_a_wheelhouse_built_from_another_lock_is_refused(wh: Path, tmp_path: Path) -> None:
    # The committed lock moved on (another pycparser hash set) but the wheelhouse did not.
    lock = tmp_path / "signer-host.lock"
    text = PY311.lock.read_text()
    pin = wheelhouse.read_lock(PY311.lock)["pycparser"]
    for h in pin.hashes:
        text = text.replace(h, hashlib.sha256(h.encode()).hexdigest())
    lock.write_text(text)
    with pytest.raises(WheelhouseError, match=r"does not match .*signer-host\.lock \(pycparser\)"):
        wheelhouse.verify(wh, PY311, lock_file=lock)


def test_a_wheel_outside_the_lock_is_refused(wh: Path) -> None:
    shutil.copy(_wheel(wh, "asn1crypto"), wh / "six-1.17.0-py2.py3-none-any.whl")
    with pytest.raises(WheelhouseError, match=r"six-1\.17\.0-py2\.py3-none-any\.whl is not in "
                                              r"the lock"):
        wheelhouse.verify(wh, PY311)


@pytest.mark.parametrize(
    ("target", "project", "taken_from", "renamed"),
    [
        # Same bytes, same lock hash (the lock hashes every platform's file): only the tags say
        # the wheel is for another host.
        (PY313, "cffi", PY311, None),
        (PY311, "cffi", PY313, None),
        (PY311, "python_pkcs11", PY313, None),
        # A wheel that needs a newer glibc than Debian 12's 2.36.
        (PY311, "cryptography", PY311, ("manylinux_2_34_x86_64", "manylinux_2_38_x86_64")),
    ],
    ids=["cp311-cffi-in-cp313", "cp313-cffi-in-cp311", "cp313-pkcs11-in-cp311", "glibc-2.38"],
)
def test_a_wheel_for_another_target_is_refused(
    whs: Path, target: Target, project: str, taken_from: Target,
    renamed: tuple[str, str] | None,
) -> None:
    wh = whs / target.name
    own = _wheel(wh, project)
    other = _wheel(whs / taken_from.name, project)
    name = other.name.replace(*renamed) if renamed else other.name
    assert name != own.name
    data = other.read_bytes()
    own.unlink()
    (wh / name).write_bytes(data)
    with pytest.raises(WheelhouseError, match=re.escape(f"{name} is not a wheel for {target.name}")):
        wheelhouse.verify(wh, target)


def test_a_second_version_of_a_locked_project_is_refused(wh: Path) -> None:
    shutil.copy(_wheel(wh, "asn1crypto"), wh / "asn1crypto-1.5.0-py2.py3-none-any.whl")
    with pytest.raises(WheelhouseError, match=r"asn1crypto-1\.5\.0-py2\.py3-none-any\.whl is not"):
        wheelhouse.verify(wh, PY311)


def test_a_missing_wheel_is_refused(wh: Path) -> None:
    _wheel(wh, "pycparser").unlink()
    with pytest.raises(WheelhouseError, match="no wheel for pycparser of the lock"):
        wheelhouse.verify(wh, PY311)


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
        wheelhouse.verify(wh, PY311)


def test_no_requirements_file_is_refused(wh: Path) -> None:
    (wh / "requirements.txt").unlink()
    with pytest.raises(WheelhouseError, match=r"has no requirements\.txt"):
        wheelhouse.verify(wh, PY311)


def test_deploy_refuses_a_tampered_wheelhouse_before_touching_a_host(
    wh: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = _wheel(wh, "cffi")
    wheel.write_bytes(wheel.read_bytes()[:-1])
    monkeypatch.setattr(wheelhouse, "WHEELHOUSE", wh.parent)
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


@pytest.mark.parametrize("target", wheelhouse.TARGETS, ids=lambda t: t.name)
def test_each_committed_lock_is_what_lock_deps_writes(tmp_path: Path, target: Target) -> None:
    # uv keeps the pins of an existing output file: recompiling the committed lock must give it
    # back unchanged, so it agrees with pyproject.toml and was written by the documented command.
    lock = tmp_path / target.lock.name
    shutil.copy(target.lock, lock)
    wheelhouse.lock_target(target, lock_file=lock)
    assert lock.read_text() == target.lock.read_text()


@pytest.mark.parametrize(
    ("deps", "message"),
    [
        (["cryptography>=99"], r"wants cryptography>=99, the lock pins cryptography==46"),
        (["requests"], r"wants requests, the lock pins nothing"),
    ],
)
def test_a_lock_behind_pyproject_is_refused(deps: list[str], message: str) -> None:
    pins = wheelhouse.read_lock(PY311.lock)
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


@pytest.mark.parametrize(("python", "target"), [("3.11", "cp311-manylinux_2_36"),
                                               ("3.13", "cp313-manylinux_2_41")])
def test_the_target_is_chosen_from_the_host_python(python: str, target: str) -> None:
    assert wheelhouse.target_for(python).name == target


@pytest.mark.parametrize("python", ["3.12", "3.14", "3.9", "3", "3.11.2", ""])
def test_an_unsupported_python_is_refused(python: str) -> None:
    with pytest.raises(WheelhouseError, match=re.escape(
            f"no wheelhouse for Python {python}: supported are Python 3.11 (cp311-manylinux_2_36),"
            " Python 3.13 (cp313-manylinux_2_41)")):
        wheelhouse.target_for(python)


def test_the_role_has_the_same_targets() -> None:
    role_vars = yaml.safe_load((ROOT / "roles/signer/vars/main.yml").read_text())
    assert role_vars["signer_wheelhouse_targets"] == {t.python: t.name for t in wheelhouse.TARGETS}


# The deploy play's facts, then the signer role's choice, for real on this controller:
# case -> (signer_host_python forced, or None for the facts; outcome)
ROLE_CASES: dict[str, tuple[str | None, str]] = {
    "facts": (None, "ok"),
    "3.11": ("3.11", "ok"),
    "3.13": ("3.13", "ok"),
    "3.12": ("3.12", "failed"),
    "3.14": ("3.14", "failed"),
}


@pytest.fixture(scope="module")
def role_choice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    d = tmp_path_factory.mktemp("choose")
    [deploy] = yaml.safe_load((ROOT / "playbooks/deploy.yml").read_text())
    tasks: list[dict[str, object]] = []
    for case, (python, _) in ROLE_CASES.items():
        record = "{{ outcome | combine({%s: {'result': %s, 'dir': %s, 'python': %s}}) }}"
        forced = {"signer_host_python": python} if python else {}
        tasks.append({
            "name": case,
            "vars": {"signer_wheelhouse": "/wh", **forced},
            "block": [
                {"ansible.builtin.include_role": {"name": "signer", "tasks_from": "wheelhouse",
                                                  "public": True}},
                {"ansible.builtin.set_fact": {"outcome": record % (
                    json.dumps(case), "'ok'", "signer_wheelhouse_dir", "signer_host_python")}},
            ],
            "rescue": [
                {"ansible.builtin.set_fact": {"outcome": record % (
                    json.dumps(case), "'failed'", "ansible_failed_result.msg", "''")}},
            ],
        })
    tasks.append({"ansible.builtin.copy": {"content": "{{ outcome | to_json }}",
                                           "dest": str(d / "out.json"), "mode": "0600"}})
    # The facts as the deploy play has them: its first pre-task (preflight's platform check).
    first = deploy["pre_tasks"][0]["ansible.builtin.include_role"]
    facts = {"ansible.builtin.include_role": {"name": first["name"],
                                              "tasks_from": first["tasks_from"]}}
    play = {"hosts": "localhost", "connection": "local", "gather_facts": deploy["gather_facts"],
            "vars": {"outcome": {}}, "tasks": [facts, *tasks]}
    (d / "play.yml").write_text(yaml.safe_dump([play], width=1000))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROOT / "roles"))
    run = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,",
                          str(d / "play.yml")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    result: dict[str, dict[str, str]] = json.loads((d / "out.json").read_text())
    return result


def test_the_deploy_play_reads_the_python_facts_first_in_the_platform_check() -> None:
    [deploy] = yaml.safe_load((ROOT / "playbooks/deploy.yml").read_text())
    assert deploy["gather_facts"] is False
    first = deploy["pre_tasks"][0]["ansible.builtin.include_role"]
    assert (first["name"], first["tasks_from"]) == ("preflight", "platform")
    platform = yaml.safe_load((ROOT / "roles/preflight/tasks/platform.yml").read_text())
    assert "python" in platform[0]["ansible.builtin.setup"]["gather_subset"]


def test_the_role_chooses_the_wheelhouse_of_the_hosts_python(
    role_choice: dict[str, dict[str, str]]
) -> None:
    # This controller is Debian 12: /usr/bin/python3 (ansible.cfg interpreter_python) is 3.11.
    assert role_choice["facts"] == {"result": "ok", "python": "3.11",
                                    "dir": "/wh/cp311-manylinux_2_36"}
    assert role_choice["3.11"]["dir"] == "/wh/cp311-manylinux_2_36"
    assert role_choice["3.13"]["dir"] == "/wh/cp313-manylinux_2_41"


@pytest.mark.parametrize("python", ["3.12", "3.14"])
def test_the_role_refuses_an_unsupported_python_before_copying(
    role_choice: dict[str, dict[str, str]], python: str
) -> None:
    got = role_choice[python]
    assert got["result"] == "failed"
    assert got["dir"].startswith(f"signer: the host runs Python {python} ("), got
    assert got["dir"].endswith("); the wheelhouse is built for 3.11 -> cp311-manylinux_2_36, "
                               "3.13 -> cp313-manylinux_2_41 only (toolkit/runner/wheelhouse.py "
                               "TARGETS)"), got
    # First in install.yml: nothing is created or copied before the choice.
    install = yaml.safe_load((ROOT / "roles/signer/tasks/install.yml").read_text())
    assert install[0]["ansible.builtin.import_tasks"] == "wheelhouse.yml"
