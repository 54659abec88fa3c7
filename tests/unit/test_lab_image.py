"""The lab's base images per release (lab/image.py): which release, which packages, which
cache key, what a failed build leaves, what pruning may delete. No debootstrap runs here; the
CI pipeline builds both images for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import image


def test_the_default_release_is_debian_13_and_the_environment_chooses_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGNLAB_RELEASE", raising=False)
    assert image.release() == "trixie" and image.RELEASES["trixie"] == "13"
    monkeypatch.setenv("SIGNLAB_RELEASE", "bookworm")
    assert image.release() == "bookworm"
    assert image.release("trixie") == "trixie"  # an explicit choice wins


def test_an_unknown_release_is_refused_with_the_supported_ones_named() -> None:
    with pytest.raises(image.ImageError, match=r"sid.*trixie \(Debian 13\).*bookworm"):
        image.release("sid")


def test_each_release_has_its_own_cached_image() -> None:
    t, b = image.image_dir("trixie"), image.image_dir("bookworm")
    assert t != b
    assert t.name.startswith("debian13-") and b.name.startswith("debian12-")
    assert image.recipe_key("trixie") != image.recipe_key("bookworm")
    assert image.recipe_key("trixie") == image.recipe_key("trixie")


def test_a_package_line_restricted_to_a_release_is_only_in_that_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkgs = tmp_path / "packages.txt"
    pkgs.write_text("# comment\nopenssh-server\nnewthing  # only: trixie\nold # only: bookworm\n")
    monkeypatch.setattr(image, "PACKAGES_FILE", pkgs)
    assert image.packages("trixie") == ["openssh-server", "newthing"]
    assert image.packages("bookworm") == ["openssh-server", "old"]


def test_debian_13s_image_has_logind_for_polkit_and_pcscd() -> None:
    """Without libpam-systemd debootstrap stops on trixie: pcscd needs polkitd, which needs
    logind."""
    assert {"pcscd", "libpam-systemd"} <= set(image.packages("trixie"))


def test_a_failed_build_keeps_both_logs_and_removes_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work, failed = tmp_path / "img.work", tmp_path / "img.failed"
    root = work / "rootfs"
    (root / "debootstrap").mkdir(parents=True)
    (root / "debootstrap" / "debootstrap.log").write_text("E: polkitd needs logind\n")
    (root / "usr").mkdir()
    (work / "build.log").write_text("$ debootstrap ...\n")
    image._keep_failed_build(work, root, failed)
    assert not work.exists()
    assert (failed / "debootstrap.log").read_text() == "E: polkitd needs logind\n"
    assert (failed / "build.log").exists()
    assert str(failed / "debootstrap.log") in capsys.readouterr().err


def test_pruning_keeps_current_images_and_any_an_instance_stands_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, state = tmp_path / "cache", tmp_path / "state"
    monkeypatch.setattr(image, "CACHE_ROOT", cache)
    monkeypatch.setattr(image, "STATE_ROOT", state)
    images = cache / "images"
    current = image.image_dir("trixie")
    old_used, old_unused = images / "debian12-0000000000000001", images / "debian13-00000000000002"
    for d in (current, image.image_dir("bookworm"), old_used, old_unused):
        d.mkdir(parents=True)
    (state / "lab3").mkdir(parents=True)
    (state / "lab3" / "base-image.json").write_text(
        json.dumps({"release": "bookworm", "image": str(old_used)}))
    image.prune_old(keep=current)
    assert current.exists() and image.image_dir("bookworm").exists()
    assert old_used.exists(), "an image a running instance's overlay stands on was deleted"
    assert not old_unused.exists()
