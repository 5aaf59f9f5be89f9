"""Captions files: the JSON and CSV layouts, their errors, and matching images to feature rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from landlens.data.captions import CaptionsError, match_captions, read_captions


def test_json_layouts(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"images": [
        {"image": "Images/a/a00.jpg", "split": "test", "sentences": ["x", " y "]},
        {"filename": "b.jpg", "sentences": [{"raw": "z"}, ""]},  # Karpathy-style, default split
    ]}))
    a, b = read_captions(f)
    assert (a.image, a.split, a.sentences) == ("Images/a/a00.jpg", "test", ("x", "y"))
    assert (b.image, b.split, b.sentences) == ("b.jpg", "train", ("z",))


def test_csv_layout_gathers_rows(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text('image,split,sentence\na.jpg,val,one\nb.jpg,train,"two, with comma"\na.jpg,val,three\n')
    a, b = read_captions(f)
    assert (a.image, a.split, a.sentences) == ("a.jpg", "val", ("one", "three"))
    assert b.sentences == ("two, with comma",)
    g = tmp_path / "d.csv"
    g.write_text("image,sentence\na.jpg,one\n")
    assert read_captions(g)[0].split == "train"


@pytest.mark.parametrize(("body", "suffix", "message"), [
    ({"images": [{"image": "a.jpg"}]}, ".json", "entry 0 lacks"),
    ({"images": []}, ".json", "expected"),
    ({"images": [{"image": "a.jpg", "sentences": []}]}, ".json", "has no sentence"),
    ({"images": [{"image": "a.jpg", "split": "dev", "sentences": ["x"]}]}, ".json", "split 'dev'"),
    ({"images": [{"image": "a.jpg", "sentences": ["x"]}, {"image": "a.jpg", "sentences": ["y"]}]}, ".json", "twice"),
    ("image,caption\na.jpg,x\n", ".csv", "'image' and 'sentence'"),
    ("image,split,sentence\na.jpg,train,x\na.jpg,test,y\n", ".csv", "two splits"),
    ("{not json", ".json", "cannot read captions file"),
])
def test_errors_name_the_problem(tmp_path: Path, body: object, suffix: str, message: str) -> None:
    f = tmp_path / f"c{suffix}"
    f.write_text(body if isinstance(body, str) else json.dumps(body))
    with pytest.raises(CaptionsError, match=message):
        read_captions(f)
    with pytest.raises(CaptionsError, match="not found"):
        read_captions(tmp_path / "none.json")


def test_match_captions_resolves_against_the_captions_folder(tmp_path: Path) -> None:
    root = tmp_path / "data" / "Images"
    f = tmp_path / "data" / "captions.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"images": [{"image": "Images/b/b1.jpg", "sentences": ["x"]},
                                        {"image": "./Images/a/a0.jpg", "sentences": ["y"]}]}))
    items = read_captions(f)
    assert match_captions(f, items, root, ["a/a0.jpg", "b/b1.jpg"]) == [1, 0]
    with pytest.raises(CaptionsError, match="'Images/b/b1.jpg' is not among the 1 images"):
        match_captions(f, items, root, ["a/a0.jpg"])
