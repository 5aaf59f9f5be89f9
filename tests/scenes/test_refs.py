"""Chip references: parsed, written in one canonical form, told apart from file names."""

from __future__ import annotations

from pathlib import Path

import pytest

from landlens.errors import ImageReadError
from landlens.scenes.refs import ChipRef, parse_chip_ref


def test_a_reference_reads_back_as_itself() -> None:
    text = "/d/scene.tif#window=64,0,256,128&bands=3,2,1&gsd=0.3&resampling=average&stretch=7:3364.54,0:255,1e-05:2&nodata=0"
    ref = parse_chip_ref(text)
    assert ref == ChipRef("/d/scene.tif", (64, 0, 256, 128), (3, 2, 1), 0.3, "average",
                          ((7.0, 3364.54), (0.0, 255.0), (1e-05, 2.0)), 0.0)
    assert str(ref) == text
    assert parse_chip_ref(str(ref)) == ref
    assert ref.short == "scene.tif#window=64,0,256,128"


def test_defaults_and_no_stretch() -> None:
    ref = parse_chip_ref("a.tif#window=0,0,8,8&stretch=none")
    assert ref is not None and ref.bands is None and ref.gsd is None and ref.stretch == ()
    assert str(ref) == "a.tif#window=0,0,8,8&stretch=none"
    assert parse_chip_ref("a.tif#window=0,0,8,8").stretch is None  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["a.tif", "a#b.tif", "/x/y.png", "dir#window=1/b.tif"])
def test_ordinary_paths_are_not_references(path: str) -> None:
    assert parse_chip_ref(path) is None
    assert parse_chip_ref(Path(path)) is None


def test_a_file_with_such_a_name_is_a_file(tmp_path: Path) -> None:
    odd = tmp_path / "x.tif#window=0,0,4,4"
    odd.write_bytes(b"x")
    assert parse_chip_ref(odd) is None


@pytest.mark.parametrize("fragment, words", [
    ("window=0,0,8", "four integers"),
    ("window=0,0,8,x", "integers"),
    ("window=0,0,8,8&colour=red", "unknown chip setting"),
    ("window=0,0,8,8&gsd=-1", "gsd"),
    ("window=0,0,0,8", "sizes > 0"),
    ("window=0,0,8,8&bands=1,2", "one or three"),
    ("window=0,0,8,8&bands=0,1,2", "counted from 1"),
    ("window=0,0,8,8&resampling=magic", "unknown resampling"),
    ("window=0,0,8,8&stretch=1-2", "LO:HI"),
    ("window=0,0,8,8&bands=1,2,3&stretch=0:1", "stretch gives 1 bands for 3"),
    ("window=0,0,8,8&gsd=1&gsd=2", "twice"),
    ("window=0,0,8,8&gsd=nan", "finite"),
])
def test_malformed_references_are_one_line_naming_the_problem(fragment: str, words: str) -> None:
    with pytest.raises(ImageReadError) as err:
        parse_chip_ref(f"s.tif#{fragment}")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"s.tif#{fragment}: bad chip reference")
