"""The dataset catalog: published facts, name resolution, invariants."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from landlens.data.catalog import CATALOG, DatasetSpec, get_spec, match_spec
from landlens.errors import DatasetError

# Totals and class counts as published by the dataset authors.
PUBLISHED = {
    "ucmerced": (21, 2_100),
    "patternnet": (38, 30_400),
    "nwpu-resisc45": (45, 31_500),
    "aid": (30, 10_000),
    "whu-rs19": (19, 1_005),
    "rsscn7": (7, 2_800),
    "siri-whu": (12, 2_400),
    "eurosat": (10, 27_000),
    "eurosat-ms": (10, 27_000),
}


def test_catalog_has_exactly_the_supported_datasets() -> None:
    assert set(CATALOG) == set(PUBLISHED)
    assert all(name == name.lower() for name in CATALOG)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_totals_match_published(name: str) -> None:
    spec = CATALOG[name]
    n_classes, total = PUBLISHED[name]
    assert spec.num_classes == n_classes
    assert spec.total_images == total
    assert sum(spec.images_per_class.values()) == total


@pytest.mark.parametrize("spec", CATALOG.values(), ids=list(CATALOG))
def test_spec_invariants(spec: DatasetSpec) -> None:
    assert list(spec.classes) == sorted(spec.classes)
    assert len(set(spec.classes)) == len(spec.classes)
    assert list(spec.images_per_class) == list(spec.classes)
    assert all(n > 0 for n in spec.images_per_class.values())
    assert len(spec.rgb_bands) == 3 and all(0 <= b < len(spec.bands) for b in spec.rgb_bands)
    assert spec.citation and spec.homepage.startswith("http")
    if spec.url is not None:
        assert spec.archive and spec.url.endswith(spec.archive)
        assert spec.checksum is not None
    if spec.checksum is not None:
        algo, digest = spec.checksum.split(":")
        assert re.fullmatch({"md5": "[0-9a-f]{32}", "sha256": "[0-9a-f]{64}"}[algo], digest)
    json.dumps(spec.to_dict())  # JSON-ready


def test_per_class_counts_from_the_papers() -> None:
    aid = get_spec("aid")
    assert aid.images_per_class["Pond"] == 420
    assert aid.images_per_class["Viaduct"] == 420
    assert aid.images_per_class["BaseballField"] == 220
    assert aid.images_per_class["Church"] == 240
    assert min(aid.images_per_class.values()) == 220
    assert max(aid.images_per_class.values()) == 420
    eurosat = get_spec("eurosat")
    assert dict(eurosat.images_per_class) == {
        "AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500,
        "Industrial": 2500, "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000,
        "River": 2500, "SeaLake": 3000,
    }  # fmt: skip
    assert dict(get_spec("eurosat-ms").images_per_class) == dict(eurosat.images_per_class)
    whu = get_spec("whu-rs19")
    assert whu.images_per_class["Meadow"] == 61
    assert all(50 <= n <= 61 for n in whu.images_per_class.values())
    assert set(get_spec("nwpu").images_per_class.values()) == {700}
    assert set(get_spec("patternnet").images_per_class.values()) == {800}


def test_layout_and_file_names() -> None:
    ucm = get_spec("ucmerced")
    assert (ucm.root_dir, ucm.subdir) == ("UCMerced_LandUse", "Images")
    assert ucm.filename("agricultural", 0) == "agricultural00.tif"
    assert ucm.filename("tenniscourt", 99) == "tenniscourt99.tif"
    assert get_spec("eurosat").subdir == "2750"
    assert get_spec("eurosat").filename("AnnualCrop", 1) == "AnnualCrop_1.jpg"
    assert get_spec("eurosat-ms").subdir == "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
    assert get_spec("rsscn7").filename("aGrass", 1) == "a001.jpg"
    assert get_spec("nwpu").filename("airplane", 7) == "airplane_007.jpg"
    assert get_spec("aid").filename("BareLand", 3) == "bareland_3.jpg"


def test_eurosat_ms_bands() -> None:
    ms = get_spec("eurosat-ms")
    assert len(ms.bands) == 13 and ms.dtype == "uint16"
    assert ms.bands[:4] == ("B01", "B02", "B03", "B04") and "B08A" in ms.bands
    assert ms.rgb_bands == (3, 2, 1)
    assert [ms.bands[i] for i in ms.rgb_bands] == ["B04", "B03", "B02"]


def test_published_checksums() -> None:
    assert get_spec("ucmerced").checksum == "md5:5b7ec56793786b6dc8a908e8854ac0e4"
    assert get_spec("eurosat").checksum == "md5:c8fa014336c82ac7804f0398fcb19387"
    assert get_spec("eurosat-ms").checksum == "md5:5ac12b3b2557aa56e1826e981e8e200e"
    for name in ("aid", "whu-rs19", "rsscn7", "siri-whu"):
        assert get_spec(name).url is None and get_spec(name).checksum is None


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("UCMerced", "ucmerced"), ("uc-merced", "ucmerced"), ("UCM", "ucmerced"),
        ("landuse", "ucmerced"), ("SatScene", "whu-rs19"), ("WHU-RS19", "whu-rs19"),
        ("resisc45", "nwpu-resisc45"), ("NWPU", "nwpu-resisc45"), ("eurosat-rgb", "eurosat"),
        ("EuroSAT", "eurosat"), ("eurosat-ms", "eurosat-ms"), (" AID ", "aid"),
        ("SIRI-WHU", "siri-whu"), ("PatternNet", "patternnet"), ("RSSCN7", "rsscn7"),
    ],
)  # fmt: skip
def test_get_spec_resolves_aliases(alias: str, name: str) -> None:
    assert get_spec(alias).name == name


def test_get_spec_unknown_lists_known_names() -> None:
    with pytest.raises(DatasetError) as info:
        get_spec("imagenet")
    msg = str(info.value)
    assert "imagenet" in msg and "\n" not in msg
    assert all(name in msg for name in CATALOG)


def test_aliases_are_unique() -> None:
    seen: dict[str, str] = {}
    for spec in CATALOG.values():
        for key in (spec.name, *spec.aliases):
            assert seen.setdefault(key.lower(), spec.name) == spec.name


def test_specs_are_immutable() -> None:
    spec = get_spec("ucmerced")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.images_per_class["beach"] = 1  # type: ignore[index]
    assert len({spec, get_spec("ucm"), get_spec("aid")}) == 2  # hashable
    assert dataclasses.replace(spec, url=None) != spec


def test_spec_validates_classes() -> None:
    with pytest.raises(ValueError, match="sorted"):
        dataclasses.replace(
            get_spec("rsscn7"), classes=("b", "a"), images_per_class={"a": 1, "b": 1}
        )


def test_match_spec() -> None:
    assert match_spec(list(reversed(get_spec("ucmerced").classes))).name == "ucmerced"
    assert match_spec(get_spec("eurosat").classes, ".jpg").name == "eurosat"
    assert match_spec(get_spec("eurosat").classes, ".tif").name == "eurosat-ms"
    assert match_spec(["a", "b"]) is None
