"""The operator's signature over a verify run, with the real ssh-keygen and keys made here:
who signed it is named, and any change to the run after signing is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from invoke.context import Context
from invoke.exceptions import Exit

from toolkit import exitcodes
from toolkit.assurance import report_signing
from toolkit.tasks import verify as tasks_verify

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="needs OpenSSH's ssh-keygen")

ROOT = Path(__file__).resolve().parents[2]


def _key(where: Path, name: str) -> Path:
    key = where / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True)
    return key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    out = {name: _key(d, name) for name in ("ops", "mallory")}
    allowed = d / "allowed_signers"
    allowed.write_text(f"ops@example.org {(d / 'ops.pub').read_text()}")
    out["allowed"] = allowed
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "reports" / "h1" / "20261201T170000Z"
    d.mkdir(parents=True)
    for name, text in (("h1.json", "{}\n"), ("h1.md", "# PASS\n"), ("h1.html", "<p>PASS\n"),
                       ("h1.junit.xml", "<testsuites/>\n")):
        (d / name).write_text(text)
    (d.parent / "latest").symlink_to(d.name)
    return d


def test_a_signed_run_names_its_signer(run_dir: Path, keys: dict[str, Path]) -> None:
    sig = report_signing.sign(run_dir, keys["ops"])
    assert sig == run_dir / "SHA256SUMS.sig"
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    ok = report_signing.check(run_dir, keys["allowed"])
    assert ok.principals == ("ops@example.org",)
    assert ok.key == f"ED25519 key {report_signing.fingerprint(keys['ops']).split()[0]}"
    assert ok.files == ("h1.html", "h1.json", "h1.junit.xml", "h1.md")
    # The manifest is sha256sum's format: checkable by hand too.
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=run_dir, capture_output=True,
                          text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    # A file in the run, the run's directory and the host's directory (latest) all name it.
    for path in (run_dir / "h1.md", run_dir, run_dir.parent):
        assert report_signing.check(path, keys["allowed"]).directory == run_dir.resolve()


@pytest.mark.parametrize(("change", "why"), [
    (lambda d: (d / "h1.html").write_text("<p>PASS, honestly\n"), "h1.html was changed"),
    (lambda d: (d / "h1.json").unlink(), "h1.json is signed but missing"),
    (lambda d: (d / "extra.md").write_text("# PASS\n"), "not covered by the signature: extra.md"),
    (lambda d: (d / "SHA256SUMS").write_text(
        (d / "SHA256SUMS").read_text().replace("h1.md", "h1.mdx")), "bad signature"),
], ids=["edited", "removed", "added", "manifest edited"])
def test_a_changed_run_is_not_verified(
    run_dir: Path, keys: dict[str, Path], change: object, why: str
) -> None:
    report_signing.sign(run_dir, keys["ops"])
    assert callable(change)
    change(run_dir)
    with pytest.raises(report_signing.NotVerified, match=why):
        report_signing.check(run_dir, keys["allowed"])


def test_a_signature_by_someone_not_allowed_is_refused(
    run_dir: Path, keys: dict[str, Path]
) -> None:
    report_signing.sign(run_dir, keys["mallory"])
    with pytest.raises(report_signing.NotVerified, match="does not allow"):
        report_signing.check(run_dir, keys["allowed"])


def test_a_signature_made_for_another_purpose_is_refused(
    run_dir: Path, keys: dict[str, Path]
) -> None:
    """An SSH signature over the same bytes in another namespace (a git commit, a file) is not
    a report signature."""
    manifest = report_signing.write_manifest(run_dir)
    subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(keys["ops"]),
                    str(manifest)], check=True, capture_output=True)
    with pytest.raises(report_signing.NotVerified, match="bad signature"):
        report_signing.check(run_dir, keys["allowed"])


def test_unsigned_and_unusable_input(run_dir: Path, keys: dict[str, Path]) -> None:
    report_signing.write_manifest(run_dir)
    with pytest.raises(report_signing.NotVerified, match="not signed"):
        report_signing.check(run_dir, keys["allowed"])
    with pytest.raises(report_signing.BadInput, match="no such report"):
        report_signing.check(run_dir / "nope", keys["allowed"])
    with pytest.raises(report_signing.BadInput, match=r"allowed signers .*: no such file"):
        report_signing.check(run_dir, run_dir / "nope")


def test_signing_with_something_that_is_not_a_key_says_so(run_dir: Path) -> None:
    (run_dir.parent / "key").write_text("not a key\n")
    with pytest.raises(report_signing.SigningError, match="ssh-keygen -Y sign with"):
        report_signing.sign(run_dir, run_dir.parent / "key")


def test_check_signature_task_exit_codes(run_dir: Path, keys: dict[str, Path]) -> None:
    """Through the real command line: 0 good, 1 not verified; 2 bad input (README)."""
    invoke = str(Path(sys.executable).parent / "invoke")
    report_signing.sign(run_dir, keys["ops"])

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([invoke, "verify.check-signature", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stdout + proc.stderr
        return proc

    good = check(str(run_dir.parent), "--allowed-signers", str(keys["allowed"]))
    assert good.returncode == exitcodes.OK, good.stderr
    assert "good signature by ops@example.org (ED25519 key SHA256:" in good.stdout
    (run_dir / "h1.md").write_text("# PASS (edited)\n")
    bad = check(str(run_dir), "--allowed-signers", str(keys["allowed"]))
    assert bad.returncode == exitcodes.FAILED
    assert bad.stderr.strip().endswith("NOT VERIFIED: "
                                       f"{run_dir.resolve()}: h1.md was changed after it was signed")
    with pytest.raises(Exit) as missing:  # the task itself: no third process
        tasks_verify.check_signature(Context(), str(run_dir))
    assert missing.value.code == exitcodes.BAD_INPUT
    assert missing.value.message == "verify.check-signature: --allowed-signers FILE is required"
