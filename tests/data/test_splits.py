"""Tests for landlens.data.splits and the ``split`` command."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from landlens.data.splits import (
    RATIO_PRESETS,
    SplitManifest,
    allocate_counts,
    make_kfold,
    make_split,
    parse_ratios,
    source_digest,
)
from landlens.errors import DatasetError

CLASSES3 = ["forest", "river", "urban"]


def synthetic(sizes: dict[str, int]) -> tuple[list[str], np.ndarray, list[str]]:
    """paths ``cls/cls_NN.png``, labels and classes for the given per-class sizes."""
    classes = list(sizes)
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for i in range(sizes[cls]):
            paths.append(f"{cls}/{cls}_{i:02d}.png")
            labels.append(label)
    return paths, np.array(labels, dtype=np.int64), classes


def reference_counts(n: int, percents: list[int]) -> list[int]:
    """Largest remainder with integer arithmetic, plus the at-least-one-per-part rule."""
    floors = [n * p // 100 for p in percents]
    rems = [n * p % 100 for p in percents]
    order = sorted(range(len(percents)), key=lambda i: (-rems[i], i))
    for i in order[: n - sum(floors)]:
        floors[i] += 1
    if n >= len(percents):
        for i in range(len(percents)):
            if floors[i] == 0:
                donor = max(range(len(percents)), key=lambda j: (floors[j], -j))
                floors[donor] -= 1
                floors[i] = 1
    return floors


def per_class_counts(manifest: SplitManifest) -> dict[str, dict[str, int]]:
    return manifest.summary()


# ---------------------------------------------------------------------------- ratios


@pytest.mark.parametrize("preset", RATIO_PRESETS)
def test_every_preset_parses(preset: str) -> None:
    values = [int(v) for v in preset.split("/")]
    parsed = parse_ratios(preset)
    names = ["train", "test"] if len(values) == 2 else ["train", "val", "test"]
    assert list(parsed) == names
    assert list(parsed.values()) == pytest.approx([v / 100 for v in values])


@pytest.mark.parametrize(
    "preset",
    ["80/20", "70/30", "60/40", "50/50", "40/60", "30/70", "20/80", "10/90", "70/10/20", "70/20/10", "60/20/20"],
)
def test_required_presets_listed(preset: str) -> None:
    assert preset in RATIO_PRESETS


@pytest.mark.parametrize(
    "spec",
    [
        "70/10/20",
        "0.7,0.1,0.2",
        "0.7/0.1/0.2",
        "70:10:20",
        " 70 / 10 / 20 ",
        "70%/10%/20%",
        "train=0.7,val=0.1,test=0.2",
        "test=0.2, train=0.7, val=0.1",
        [0.7, 0.1, 0.2],
        (70, 10, 20),
        {"train": 0.7, "val": 0.1, "test": 0.2},
    ],
)
def test_equivalent_ratio_spellings(spec: object) -> None:
    assert parse_ratios(spec) == {"train": 0.7, "val": 0.1, "test": 0.2}  # type: ignore[arg-type]


def test_two_named_parts() -> None:
    assert parse_ratios("train=0.9,val=0.1") == {"train": 0.9, "val": 0.1}


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("80/30", "80/30"),  # sums to 110
        ("0.5,0.4", "0.5,0.4"),  # sums to 0.9
        ("100", "100"),  # one part
        ("50/20/20/10", "50/20/20/10"),  # four parts
        ("80/abc", "abc"),
        ("110/-10", "-10"),
        ("100/0", "0"),
        ("", "''"),
        ("train=0.8,tset=0.2", "tset"),
        ("val=0.5,test=0.5", "train"),
        ("train=0.8,train=0.2", "train"),
        ("train0.8,test=0.2", "train0.8"),
        ("nan/50", "nan"),
    ],
)
def test_bad_ratios_raise_naming_value(bad: str, fragment: str) -> None:
    with pytest.raises(DatasetError) as info:
        parse_ratios(bad)
    assert fragment in str(info.value)
    assert repr(bad) in str(info.value)


def test_bad_ratios_rejected_by_make_split() -> None:
    paths, labels, classes = synthetic({"a": 5})
    with pytest.raises(DatasetError, match="80/30"):
        make_split(paths, labels, classes, ratios="80/30")


# ---------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, [1, 0, 0]),
        (2, [2, 0, 0]),  # 1,0,0 + remainder tie .4/.4 -> train; fewer images than parts
        (3, [1, 1, 1]),  # 2,0,1 by remainder; val takes one from train
        (5, [3, 1, 1]),  # 4,0,1 by remainder (tie .5/.5 -> train); val takes one from train
        (10, [7, 1, 2]),
        (11, [8, 1, 2]),
        (17, [12, 2, 3]),
        (100, [70, 10, 20]),
    ],
)
def test_allocate_counts_hand_values(n: int, expected: list[int]) -> None:
    assert list(allocate_counts(n, "70/10/20").values()) == expected
    assert reference_counts(n, [70, 10, 20]) == expected


def test_stratified_80_20_exact() -> None:
    paths, labels, classes = synthetic({c: 100 for c in CLASSES3})
    m = make_split(paths, labels, classes, ratios="80/20", seed=0)
    assert m.summary() == {
        "train": {c: 80 for c in CLASSES3},
        "test": {c: 20 for c in CLASSES3},
    }


def test_stratified_70_10_20_uneven_classes() -> None:
    sizes = {"c0": 1, "c1": 2, "c2": 3, "c3": 5, "c4": 11, "c5": 17, "c6": 94}
    paths, labels, classes = synthetic(sizes)
    m = make_split(paths, labels, classes, ratios="70/10/20", seed=3)
    summary = m.summary()
    for cls, n in sizes.items():
        expected = reference_counts(n, [70, 10, 20])
        got = [summary[p][cls] for p in ("train", "val", "test")]
        assert got == expected, cls
        if n >= 3:
            assert min(got) >= 1, cls
    # spot-check real values, not only agreement with the reference
    assert [summary[p]["c6"] for p in ("train", "val", "test")] == [66, 9, 19]
    assert [summary[p]["c3"] for p in ("train", "val", "test")] == [3, 1, 1]


@pytest.mark.parametrize("ratios", ["80/20", "70/10/20", "10/90", "60/20/20"])
def test_disjoint_and_complete(ratios: str) -> None:
    paths, labels, classes = synthetic({"a": 23, "b": 7, "c": 41, "d": 2})
    m = make_split(paths, labels, classes, ratios=ratios, seed=11)
    seen: list[str] = []
    for name in m.parts:
        part_paths, part_labels = m.part(name)
        seen += part_paths
        lookup = dict(zip(paths, labels.tolist()))
        assert part_labels.dtype == np.int64
        assert [lookup[p] for p in part_paths] == part_labels.tolist()
    assert len(seen) == len(set(seen)) == len(paths)
    assert set(seen) == set(paths)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_manifest() -> None:
    paths, labels, classes = synthetic({"a": 30, "b": 13, "c": 8})
    m1 = make_split(paths, labels, classes, ratios="70/10/20", seed=5)
    m2 = make_split(paths, labels, classes, ratios="70/10/20", seed=5)
    assert m1 == m2
    assert m1.to_dict() == m2.to_dict()


def test_different_seed_different_manifest() -> None:
    paths, labels, classes = synthetic({"a": 30, "b": 13, "c": 8})
    m1 = make_split(paths, labels, classes, ratios="80/20", seed=0)
    m2 = make_split(paths, labels, classes, ratios="80/20", seed=1)
    assert m1.parts != m2.parts
    assert m1.summary() == m2.summary()  # same counts, other images


def test_input_order_does_not_matter() -> None:
    paths, labels, classes = synthetic({"a": 30, "b": 13, "c": 8})
    m1 = make_split(paths, labels, classes, ratios="70/10/20", seed=2)
    order = list(range(len(paths)))
    random.Random(123).shuffle(order)
    m2 = make_split([paths[i] for i in order], labels[order], classes, ratios="70/10/20", seed=2)
    assert m1.parts == m2.parts
    assert m1.source_digest == m2.source_digest
    k1 = make_kfold(paths, labels, classes, k=4, seed=2)
    k2 = make_kfold([paths[i] for i in order], labels[order], classes, k=4, seed=2)
    assert k1.parts == k2.parts


def test_adding_a_class_does_not_reshuffle_others() -> None:
    paths, labels, classes = synthetic({"b": 20, "c": 15})
    m1 = make_split(paths, labels, classes, ratios="80/20", seed=0)
    paths2, labels2, classes2 = synthetic({"a": 9, "b": 20, "c": 15})  # new class shifts labels
    m2 = make_split(paths2, labels2, classes2, ratios="80/20", seed=0)
    for part in ("train", "test"):
        old = [p for p in m1.part(part)[0]]
        new = [p for p in m2.part(part)[0] if not p.startswith("a/")]
        assert old == new


def test_golden_split_seed0() -> None:
    """Pinned output: if this changes, every user's saved splits would silently change."""
    paths, labels, classes = synthetic({c: 20 for c in CLASSES3})
    m = make_split(paths, labels, classes, ratios="80/20", seed=0)
    test_paths = m.part("test")[0]
    assert test_paths[:5] == [
        "forest/forest_04.png",
        "forest/forest_05.png",
        "forest/forest_06.png",
        "forest/forest_19.png",
        "river/river_03.png",
    ]
    assert test_paths == [
        "forest/forest_04.png", "forest/forest_05.png", "forest/forest_06.png", "forest/forest_19.png",
        "river/river_03.png", "river/river_08.png", "river/river_11.png", "river/river_14.png",
        "urban/urban_00.png", "urban/urban_01.png", "urban/urban_12.png", "urban/urban_18.png",
    ]  # fmt: skip
    assert m.source_digest == "8c234e2a7379a241e2cf3e80d83bd4ec8cc17ff9cc383485df273bf12e649223"
    k = make_kfold(paths, labels, classes, k=5, seed=0)
    assert k.part("fold0")[0] == [
        "forest/forest_00.png", "forest/forest_04.png", "forest/forest_07.png", "forest/forest_13.png",
        "river/river_00.png", "river/river_04.png", "river/river_05.png", "river/river_08.png",
        "urban/urban_09.png", "urban/urban_15.png", "urban/urban_17.png", "urban/urban_18.png",
    ]  # fmt: skip


# ---------------------------------------------------------------------------- k-fold


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_kfold_properties(k: int) -> None:
    sizes = {"a": 23, "b": 7, "c": 41, "d": 10, "e": 3}
    paths, labels, classes = synthetic(sizes)
    m = make_kfold(paths, labels, classes, k=k, seed=4)
    assert m.kind == "kfold"
    assert list(m.parts) == [f"fold{i}" for i in range(k)]
    everything = [p for name in m.parts for p in m.part(name)[0]]
    assert sorted(everything) == sorted(paths)  # each item in exactly one fold
    summary = m.summary()
    for cls, n in sizes.items():
        counts = [summary[f"fold{i}"][cls] for i in range(k)]
        assert sum(counts) == n
        assert max(counts) - min(counts) <= 1, (cls, counts)
    rounds = m.folds(k)
    assert len(rounds) == k
    for i, ((train_p, train_l), (test_p, test_l)) in enumerate(rounds):
        assert test_p == m.part(f"fold{i}")[0]
        assert not set(train_p) & set(test_p)
        assert len(train_p) + len(test_p) == len(paths)
        assert len(train_l) == len(train_p) and len(test_l) == len(test_p)


def test_kfold_errors() -> None:
    paths, labels, classes = synthetic({"a": 3})
    with pytest.raises(DatasetError, match="k >= 2"):
        make_kfold(paths, labels, classes, k=1)
    with pytest.raises(DatasetError, match="4 folds from 3"):
        make_kfold(paths, labels, classes, k=4)
    m = make_kfold(paths, labels, classes, k=3)
    with pytest.raises(DatasetError, match="3 folds, not 5"):
        m.folds(5)
    holdout = make_split(paths, labels, classes, ratios="70/30")
    with pytest.raises(DatasetError, match="not k-fold"):
        holdout.folds()


# ---------------------------------------------------------------------------- manifest


def test_save_load_round_trip(tmp_path: Path) -> None:
    paths, labels, classes = synthetic({"a": 12, "b": 9, "c": 4})
    for m in (
        make_split(paths, labels, classes, ratios="70/10/20", seed=9, dataset="toy"),
        make_kfold(paths, labels, classes, k=3, seed=9, dataset="toy"),
    ):
        out = m.save(tmp_path / "sub" / f"{m.kind}.json")
        assert out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
        loaded = SplitManifest.load(out)
        assert loaded == m
        assert loaded.dataset == "toy" and loaded.seed == 9 and loaded.kind == m.kind
        # stable: saving again gives byte-identical JSON
        again = loaded.save(tmp_path / "again.json")
        assert again.read_bytes() == out.read_bytes()
        data = json.loads(out.read_text())
        assert data["source_digest"] == source_digest(paths, labels)


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetError, match="not found.*nope.json"):
        SplitManifest.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json.*not valid JSON"):
        SplitManifest.load(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DatasetError, match="other.json.*format"):
        SplitManifest.load(other)

    paths, labels, classes = synthetic({"a": 5, "b": 5})
    good = make_split(paths, labels, classes, ratios="80/20").save(tmp_path / "good.json")
    data = json.loads(good.read_text())
    data["parts"]["test"]["a"].append("a/extra.png")
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="edited.json"):
        SplitManifest.load(edited)
    data = json.loads(good.read_text())
    data["parts"]["test"]["zebra"] = ["zebra/1.png"]
    (tmp_path / "unknown.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="unknown class 'zebra'"):
        SplitManifest.load(tmp_path / "unknown.json")


def test_part_and_indices() -> None:
    paths, labels, classes = synthetic({"a": 10, "b": 10})
    m = make_split(paths, labels, classes, ratios="70/30", seed=1)
    test_paths, test_labels = m.part("test")
    idx = m.indices("test", paths)
    assert idx.dtype == np.int64
    assert [paths[i] for i in idx] == test_paths
    assert labels[idx].tolist() == test_labels.tolist()
    with pytest.raises(DatasetError, match="no part 'val'.*train, test"):
        m.part("val")
    short = [p for p in paths if p != test_paths[0]]
    with pytest.raises(DatasetError, match=test_paths[0]):
        m.indices("test", short)


def test_check_against() -> None:
    paths, labels, classes = synthetic({"a": 10, "b": 10})
    m = make_split(paths, labels, classes, ratios="80/20", seed=0)
    m.check_against(paths, labels, classes)  # matches
    shuffled = list(range(len(paths)))[::-1]
    m.check_against([paths[i] for i in shuffled], labels[shuffled])  # order does not matter

    with pytest.raises(DatasetError, match="missing.*a/a_03.png"):
        m.check_against(paths[:3] + paths[4:], np.delete(labels, 3))

    changed = labels.copy()
    changed[paths.index("b/b_07.png")] = 0
    with pytest.raises(DatasetError, match=r"changed label.*b/b_07.png \(b -> a\)"):
        m.check_against(paths, changed)

    with pytest.raises(DatasetError, match="no part.*a/new.png"):
        m.check_against([*paths, "a/new.png"], [*labels.tolist(), 0])
    m.check_against([*paths, "a/new.png"], [*labels.tolist(), 0], allow_extra=True)

    with pytest.raises(DatasetError, match="classes"):
        m.check_against(paths, labels, ["a", "b", "c"])


def test_input_validation() -> None:
    with pytest.raises(DatasetError, match="duplicate paths.*a/x.png"):
        make_split(["a/x.png", "a/x.png", "a/y.png"], [0, 0, 0], ["a"], ratios="50/50")
    with pytest.raises(DatasetError, match="label 3"):
        make_split(["a/x.png", "a/y.png"], [0, 3], ["a"], ratios="50/50")


def test_format_summary() -> None:
    paths, labels, classes = synthetic({"a": 10, "b": 5})
    text = make_split(paths, labels, classes, ratios="80/20").format_summary()
    lines = text.splitlines()
    assert lines[0].split() == ["class", "train", "test", "total"]
    assert lines[1].split() == ["a", "8", "2", "10"]
    assert lines[2].split() == ["b", "4", "1", "5"]
    assert lines[3].split() == ["total", "12", "3", "15"]


# ---------------------------------------------------------------------------- CLI


def make_png_folder(root: Path, classes: tuple[str, ...] = ("forest", "river", "urban"), n: int = 10) -> Path:
    from PIL import Image
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 100)).save(root / cls / f"{cls}_{i:02d}.png")
    return root


def _stub_folder_module() -> types.ModuleType:
    """A minimal ``landlens.data.folder`` so the command logic is tested without the real one."""

    def scan_folder(path, dataset=None):  # type: ignore[no-untyped-def]
        root = Path(path)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        paths, labels = [], []
        for label, cls in enumerate(classes):
            for f in sorted((root / cls).iterdir()):
                paths.append(f.relative_to(root).as_posix())
                labels.append(label)
        return types.SimpleNamespace(
            root=root, classes=classes, paths=paths, labels=np.array(labels, dtype=np.int64),
            name=dataset or root.name,
        )

    module = types.ModuleType("landlens.data.folder")
    module.scan_folder = scan_folder  # type: ignore[attr-defined]
    return module


def _run_cli(tmp_path: Path) -> None:
    from landlens.cli.split import split

    data = make_png_folder(tmp_path / "scenes")
    out = tmp_path / "split.json"
    runner = CliRunner()
    result = runner.invoke(split, [str(data), "--ratios", "70/10/20", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "wrote" in result.output
    m = SplitManifest.load(out)
    assert m.kind == "holdout"
    assert m.summary() == {
        "train": {c: 7 for c in ("forest", "river", "urban")},
        "val": {c: 1 for c in ("forest", "river", "urban")},
        "test": {c: 2 for c in ("forest", "river", "urban")},
    }
    assert m.dataset == "scenes"
    assert len(m) == 30

    out_k = tmp_path / "folds.json"
    result = runner.invoke(split, [str(data), "--kfold", "5", "--out", str(out_k)])
    assert result.exit_code == 0, result.output
    mk = SplitManifest.load(out_k)
    assert mk.kind == "kfold" and mk.dataset == "scenes"
    assert all(len(mk.parts[f"fold{i}"]) == 6 for i in range(5))

    result = runner.invoke(split, [str(data), "--ratios", "80/30", "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0
    assert "80/30" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.json").exists()

    result = runner.invoke(split, [str(data), "--ratios", "80/20", "--kfold", "3"])
    assert result.exit_code == 2


def test_cli_split_with_stub_scanner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "landlens.data.folder", _stub_folder_module())
    _run_cli(tmp_path)


def test_cli_split_with_real_scanner(tmp_path: Path) -> None:
    _run_cli(tmp_path)
