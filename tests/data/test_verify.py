"""Verifying dataset folders: exact bad files, catalog comparison, report, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures.make_datasets import BAD_KINDS, make_dataset, make_folder_dataset

from landlens.cli.data import data
from landlens.data import catalog, folder
from landlens.data import verify as verify_module
from landlens.data.catalog import CATALOG
from landlens.data.verify import VerifyReport, verify_dataset
from landlens.errors import DatasetError

REASON_START = {
    "empty": "empty file",
    "not_image": "not an image",
    "truncated": "truncated image data",
    "corrupt": "corrupt image data",
    "bomb": "image too large: 20000x20000 pixels",
}


@pytest.fixture
def messy_folder(tmp_path: Path, bad_files: dict[str, Path], image_kinds: dict[str, Path]) -> Path:
    """Classes a, b, c: 3 good images each; a also holds the bad files, b the unusual
    (valid) kinds, c a text file."""
    root = make_folder_dataset(tmp_path / "messy", ["a", "b", "c"], per_class=3, size=8)
    for path in bad_files.values():
        shutil.copy(path, root / "a" / path.name)
    for path in image_kinds.values():
        shutil.copy(path, root / "b" / path.name)
    (root / "c" / "readme.txt").write_text("not an image")
    return root


def test_verify_finds_exactly_the_bad_files(messy_folder: Path, bad_files: dict[str, Path]) -> None:
    report = verify_dataset(messy_folder, workers=1)
    found = {b.path: b.reason for b in report.bad_files}
    expected = {f"a/{bad_files[k].name}": k for k in BAD_KINDS}
    assert set(found) == set(expected)
    for rel, kind in expected.items():
        assert found[rel].startswith(REASON_START[kind]), (rel, found[rel])
    assert report.counts == {"a": 3 + len(BAD_KINDS), "b": 3 + 9, "c": 3}
    assert report.n_images == 23 and report.n_readable == 23 - len(BAD_KINDS)
    assert report.non_image_files == ["c/readme.txt"]
    assert report.dataset is None and report.expected is None
    assert not report.ok
    assert report.problems() == [f"unreadable: {b.path}: {b.reason}" for b in report.bad_files]


def test_verify_in_worker_processes(messy_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "_INLINE_BELOW", 0)  # force the process pool
    pooled = verify_dataset(messy_folder, workers=2)
    inline = verify_dataset(messy_folder, workers=1)
    assert pooled.bad_files == inline.bad_files and len(pooled.bad_files) == len(BAD_KINDS)


def test_clean_folder_is_ok(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "clean", ["x", "y"], per_class=2, size=8)
    report = verify_dataset(root)
    assert report.ok and report.problems() == [] and report.bad_files == []
    assert report.counts == {"x": 2, "y": 2}


def test_counts_compared_with_catalog(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "ucmerced", per_class=3, classes=20, size=8)
    extra = root / "Images" / "zzz_extra"
    make_folder_dataset(tmp_path / "tmp", ["q"], per_class=1, size=8)
    shutil.move(tmp_path / "tmp" / "q", extra)
    report = verify_dataset(root, "ucm", workers=1)
    assert report.dataset == "ucmerced"
    assert report.missing_classes == ["tenniscourt"]
    assert report.unexpected_classes == ["zzz_extra"]
    assert len(report.count_mismatches) == 20
    assert report.count_mismatches["agricultural"] == (3, 100)
    assert report.expected_size == (256, 256)
    assert len(report.off_size) == 61 and report.off_size[0][1:] == (8, 8)  # a note only
    assert not report.ok
    problems = report.problems()
    assert "missing class: tenniscourt" in problems and "unexpected class: zzz_extra" in problems
    assert "count mismatch: agricultural: 3 images, expected 100" in problems


def test_matching_counts_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder with the catalog's exact classes and counts verifies ok."""
    small = dataclasses.replace(
        CATALOG["rsscn7"], images_per_class={c: 2 for c in CATALOG["rsscn7"].classes}
    )
    monkeypatch.setattr(folder, "get_spec", lambda name: small)
    root = make_dataset(tmp_path, "rsscn7", per_class=2, size=8)
    report = verify_dataset(root, "rsscn7")
    assert report.ok and report.dataset == "rsscn7" and report.n_images == 14
    assert catalog.get_spec("rsscn7").images_per_class["aGrass"] == 400  # catalog untouched


def test_report_to_dict_is_json(messy_folder: Path) -> None:
    report = verify_dataset(messy_folder, workers=1)
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["ok"] is False and payload["n_images"] == 23
    assert {b["path"] for b in payload["bad_files"]} == {b.path for b in report.bad_files}
    assert payload["non_image_files"] == ["c/readme.txt"]


def test_verify_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        verify_dataset(tmp_path / "absent")


# --------------------------------------------------------------------------- CLI


def test_cli_verify_reports_every_bad_file(
    messy_folder: Path, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        data, ["verify", str(messy_folder), "--workers", "1", "--json", str(out)]
    )
    assert result.exit_code == 1, result.output
    for path in bad_files.values():
        assert f"a/{path.name}: " in result.output
    assert "FAILED: 5 problem(s)" in result.output
    assert "c/readme.txt" in result.output
    payload = json.loads(out.read_text())
    assert len(payload["bad_files"]) == 5 and payload["command"].startswith("landlens")


def test_cli_verify_ok_and_json_stdout(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "clean", ["x", "y"], per_class=2, size=8)
    result = CliRunner().invoke(data, ["verify", str(root)])
    assert result.exit_code == 0 and result.output.strip().endswith("OK")
    result = CliRunner().invoke(data, ["verify", str(root), "--json", "-"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"] is True


def test_cli_verify_max_pixels(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "d", ["x"], per_class=1, size=20)
    result = CliRunner().invoke(data, ["verify", str(root), "--max-pixels", "100"])
    assert result.exit_code == 1
    assert "x/x_1.jpg: image too large: 20x20 pixels exceeds the limit of 100" in result.output


def test_cli_verify_catalog_table(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "whu-rs19", per_class=1, size=8)
    result = CliRunner().invoke(data, ["verify", str(root)])
    assert result.exit_code == 1
    assert "compared with whu-rs19" in result.output
    assert any(
        line.split()[:4] == ["Meadow", "1", "61", "MISMATCH"] for line in result.output.splitlines()
    )


def test_cli_list_and_info() -> None:
    runner = CliRunner()
    result = runner.invoke(data, ["list"])
    assert result.exit_code == 0
    for spec in CATALOG.values():
        assert spec.name in result.output
    aid_row = next(line for line in result.output.splitlines() if line.startswith("aid "))
    assert aid_row.split()[1:5] == ["30", "10,000", "600x600", "0.5-8"]
    listed = json.loads(runner.invoke(data, ["list", "--json"]).output)
    assert [d["name"] for d in listed] == list(CATALOG)
    result = runner.invoke(data, ["info", "SatScene"])
    assert result.exit_code == 0
    assert (
        "WHU-RS19" in result.output and "1,005" in result.output and "Structural" in result.output
    )
    info = json.loads(runner.invoke(data, ["info", "ucm", "--json"]).output)
    assert info["checksum"] == "md5:5b7ec56793786b6dc8a908e8854ac0e4"
    result = runner.invoke(data, ["info", "imagenet"])
    assert isinstance(result.exception, DatasetError)


def test_real_ucmerced_verifies(ucmerced_real: Path) -> None:
    report = verify_dataset(ucmerced_real, workers=2)
    assert isinstance(report, VerifyReport)
    assert report.ok, report.problems()[:5]
    assert report.dataset == "ucmerced" and report.n_readable == 2100
    assert len(report.off_size) == 44


def test_notes_count_the_images_a_network_upsamples(tmp_path: Path) -> None:
    """Short sides come from the decoded images; the note counts those below the input size."""
    from PIL import Image

    from landlens.data.verify import verify_dataset

    root = make_folder_dataset(tmp_path / "small", ["a", "b"], per_class=2, size=(150, 180))
    big = root / "a" / "big.png"
    Image.new("RGB", (300, 240), (10, 20, 30)).save(big)
    report = verify_dataset(root, workers=1)
    sides = sorted(min(Image.open(p).size) for p in root.rglob("*.*"))
    assert sorted(report.short_sides) == sides == [150, 150, 150, 150, 240]
    assert report.upsampled(224) == 4 and report.upsampled(128) == 0
    assert report.notes(224) == ["4 of 5 images have a shorter side below the backbone's 224-px input (smallest "
                                 "150 px) and are upsampled: the network sees no more detail than the image holds"]
    assert report.notes(128) == [] and report.to_dict()["short_side"] == {"min": 150, "median": 150, "max": 240}
    big.unlink()
    assert verify_dataset(root, workers=1).notes(224)[0].startswith("every image has a shorter side below")
