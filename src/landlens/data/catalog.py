"""The catalog of remote-sensing scene datasets landlens knows by name.

Each entry is a :class:`DatasetSpec`: the facts a user would otherwise look up in the
dataset's paper and release (classes exactly as the folders are named, images per class,
image size, ground sample distance, bands), where the archive comes from and its published
checksum, and how the extracted folder is laid out. :func:`get_spec` resolves a name or one
of its aliases case-insensitively.

Layout vocabulary used throughout ``landlens.data``:

* *dataset root*: the folder a user points landlens at, as extracted from the archive
  (``UCMerced_LandUse``); :attr:`DatasetSpec.root_dir` names it.
* *class root*: the folder whose sub-folders are the classes. It is
  ``dataset root / subdir`` (``UCMerced_LandUse/Images``); ``subdir`` is ``""`` when the
  class folders sit directly in the dataset root.

Checksums are written ``"md5:<hex>"`` or ``"sha256:<hex>"`` and are only given where the
value is published for exactly the archive at :attr:`DatasetSpec.url` (by the authors, by
torchvision or by TorchGeo). Datasets distributed only through cloud drives (AID,
WHU-RS19, RSSCN7, SIRI-WHU) have ``url=None``: download them by hand from
:attr:`DatasetSpec.homepage` and point landlens at the extracted folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from landlens.errors import DatasetError

__all__ = [
    "CATALOG",
    "DatasetSpec",
    "get_spec",
    "match_spec",
    "AID",
    "EUROSAT",
    "EUROSAT_MS",
    "NWPU_RESISC45",
    "PATTERNNET",
    "RSSCN7",
    "SIRI_WHU",
    "UCMERCED",
    "WHU_RS19",
]

GSD = float | tuple[float, float]


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one published scene-classification dataset.

    Attributes:
        name: canonical lowercase name, the key in :data:`CATALOG`.
        title: the dataset's name as its authors write it.
        classes: class folder names exactly as released, in ``sorted()`` order (the label
            order landlens and ``torchvision.datasets.ImageFolder`` both use).
        images_per_class: number of images in each class folder of the release.
        image_size: ``(width, height)`` of the images in pixels (the nominal size; see
            :attr:`notes` for releases that contain other sizes).
        gsd_m: ground sample distance in metres, one value or a ``(finest, coarsest)`` range;
            ``None`` where the authors do not state it.
        bands: band names in file order.
        dtype: sample type of the released files (``"uint8"`` or ``"uint16"``).
        rgb_bands: 0-based indices of the red, green and blue bands in :attr:`bands`.
        citation: the reference to cite, as a full string.
        homepage: the authors' page for the dataset.
        url: direct download location of :attr:`archive`, or ``None`` when the release is
            only reachable through a cloud drive (download by hand).
        mirrors: further locations serving the byte-identical archive (same checksum).
        archive: file name of the released archive.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"`` of :attr:`archive`, or ``None``.
        root_dir: the top folder the archive extracts to (the dataset root), or ``None`` when
            the archive extracts ``subdir`` directly.
        subdir: path from the dataset root to the class folders (``""``: the root itself).
        alt_subdirs: other known layouts of the same data (re-releases, mirrors).
        filename_pattern: how the release names its files, a :meth:`str.format` pattern over
            ``cls`` (class folder name), ``cls_lower`` and ``i`` (the image number); used to
            generate faithful test fixtures.
        first_index: the number of the first image in each class (0 or 1).
        aliases: other names accepted by :func:`get_spec` (case-insensitive).
        notes: anything about the release a user should know (irregular sizes, layouts).
    """

    name: str
    title: str
    classes: tuple[str, ...]
    images_per_class: Mapping[str, int]
    image_size: tuple[int, int]
    gsd_m: GSD | None
    bands: tuple[str, ...]
    dtype: str
    rgb_bands: tuple[int, int, int]
    citation: str
    homepage: str
    url: str | None
    archive: str | None
    checksum: str | None
    root_dir: str | None
    subdir: str
    filename_pattern: str
    first_index: int = 1
    mirrors: tuple[str, ...] = ()
    alt_subdirs: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if list(self.classes) != sorted(self.classes):
            raise ValueError(f"{self.name}: classes must be listed in sorted() order")
        if set(self.images_per_class) != set(self.classes):
            raise ValueError(f"{self.name}: images_per_class must name exactly the classes")
        if self.checksum is not None and self.checksum.split(":", 1)[0] not in ("md5", "sha256"):
            raise ValueError(f"{self.name}: checksum must start with 'md5:' or 'sha256:'")
        counts = {c: int(self.images_per_class[c]) for c in self.classes}
        object.__setattr__(self, "images_per_class", MappingProxyType(counts))

    def __hash__(self) -> int:
        # images_per_class is a read-only mapping (unhashable); the rest identifies a spec.
        return hash((self.name, self.title, self.classes, self.archive, self.checksum))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def total_images(self) -> int:
        """Number of images in the release."""
        return sum(self.images_per_class.values())

    @property
    def checksum_algorithm(self) -> str | None:
        """``"md5"`` or ``"sha256"``, or ``None`` without a checksum."""
        return None if self.checksum is None else self.checksum.split(":", 1)[0]

    @property
    def checksum_value(self) -> str | None:
        """The hex digest of :attr:`archive`, or ``None``."""
        return None if self.checksum is None else self.checksum.split(":", 1)[1]

    def gsd_text(self) -> str:
        """The ground sample distance for display: ``"0.3 m"``, ``"0.2-30 m"`` or ``"-"``."""
        if self.gsd_m is None:
            return "-"
        if isinstance(self.gsd_m, tuple):
            return f"{self.gsd_m[0]:g}-{self.gsd_m[1]:g} m"
        return f"{self.gsd_m:g} m"

    def filename(self, cls: str, i: int) -> str:
        """The file name the release gives image number ``i`` of class ``cls``."""
        return self.filename_pattern.format(cls=cls, cls_lower=cls.lower(), i=i)

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values."""
        return {
            "name": self.name,
            "title": self.title,
            "num_classes": self.num_classes,
            "total_images": self.total_images,
            "classes": list(self.classes),
            "images_per_class": dict(self.images_per_class),
            "image_size": list(self.image_size),
            "gsd_m": list(self.gsd_m) if isinstance(self.gsd_m, tuple) else self.gsd_m,
            "bands": list(self.bands),
            "dtype": self.dtype,
            "rgb_bands": list(self.rgb_bands),
            "citation": self.citation,
            "homepage": self.homepage,
            "url": self.url,
            "mirrors": list(self.mirrors),
            "archive": self.archive,
            "checksum": self.checksum,
            "root_dir": self.root_dir,
            "subdir": self.subdir,
            "alt_subdirs": list(self.alt_subdirs),
            "filename_pattern": self.filename_pattern,
            "first_index": self.first_index,
            "aliases": list(self.aliases),
            "notes": self.notes,
        }


def _uniform(classes: tuple[str, ...], n: int) -> dict[str, int]:
    return {c: n for c in classes}


_RGB = ("R", "G", "B")

_UCM_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)  # fmt: skip

UCMERCED = DatasetSpec(
    name="ucmerced",
    title="UC Merced Land Use",
    classes=_UCM_CLASSES,
    images_per_class=_uniform(_UCM_CLASSES, 100),
    image_size=(256, 256),
    gsd_m=0.3,
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Yi Yang and Shawn Newsam. Bag-of-visual-words and spatial extensions for land-use "
        "classification. In Proceedings of the 18th SIGSPATIAL International Conference on "
        "Advances in Geographic Information Systems (GIS '10), pages 270-279, San Jose, CA, "
        "2010. ACM. doi:10.1145/1869790.1869829"
    ),
    homepage="http://weegee.vision.ucmerced.edu/datasets/landuse.html",
    url="http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip",
    # TorchGeo's mirror of the same archive (same MD5, as listed by TorchGeo).
    mirrors=(
        "https://hf.co/datasets/torchgeo/ucmerced/resolve/"
        "7c5ef3454d9b1cccfa7ccde0c01fc8f00a45909a/UCMerced_LandUse.zip",
    ),
    archive="UCMerced_LandUse.zip",
    checksum="md5:5b7ec56793786b6dc8a908e8854ac0e4",  # as listed by TorchGeo
    root_dir="UCMerced_LandUse",
    subdir="Images",
    filename_pattern="{cls}{i:02d}.tif",
    first_index=0,
    aliases=("uc-merced", "uc_merced", "ucm", "ucmd", "landuse", "ucmerced_landuse"),
    notes=(
        "Original files are 8-bit RGB TIFF named <class>00.tif-<class>99.tif. 44 of the 2,100 "
        "images are not 256x256 (247-256 px on a side), as released."
    ),
)
"""UC Merced Land Use dataset.

The `UC Merced Land Use <http://weegee.vision.ucmerced.edu/datasets/landuse.html>`__
dataset holds 256x256 RGB aerial orthophotos at 1 ft (0.3 m) from the USGS National Map
Urban Area Imagery, of 21 land-use classes around US cities.

Dataset features:

* 2,100 images, 21 classes, 100 images per class
* 256x256 px nominal (44 images are 247-256 px on a side), 0.3 m per pixel
* three spectral bands: RGB, 8-bit TIFF

If you use this dataset in your research, please cite:

* Yang & Newsam, GIS '10, https://doi.org/10.1145/1869790.1869829
"""

_PATTERNNET_CLASSES = (
    "airplane", "baseball_field", "basketball_court", "beach", "bridge", "cemetery",
    "chaparral", "christmas_tree_farm", "closed_road", "coastal_mansion", "crosswalk",
    "dense_residential", "ferry_terminal", "football_field", "forest", "freeway",
    "golf_course", "harbor", "intersection", "mobile_home_park", "nursing_home",
    "oil_gas_field", "oil_well", "overpass", "parking_lot", "parking_space", "railway",
    "river", "runway", "runway_marking", "shipping_yard", "solar_panel",
    "sparse_residential", "storage_tank", "swimming_pool", "tennis_court",
    "transformer_station", "wastewater_treatment_plant",
)  # fmt: skip

PATTERNNET = DatasetSpec(
    name="patternnet",
    title="PatternNet",
    classes=_PATTERNNET_CLASSES,
    images_per_class=_uniform(_PATTERNNET_CLASSES, 800),
    image_size=(256, 256),
    gsd_m=(0.062, 4.693),
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Weixun Zhou, Shawn Newsam, Congmin Li and Zhenfeng Shao. PatternNet: A benchmark "
        "dataset for performance evaluation of remote sensing image retrieval. ISPRS Journal "
        "of Photogrammetry and Remote Sensing, 145:197-209, 2018. "
        "doi:10.1016/j.isprsjprs.2018.01.004"
    ),
    homepage="https://sites.google.com/view/zhouwx/dataset",
    # The authors distribute PatternNet.zip through Google Drive, which cannot be streamed
    # by a plain HTTP client; TorchGeo's mirror and its published SHA-256 are used instead.
    url=(
        "https://hf.co/datasets/torchgeo/PatternNet/resolve/"
        "2dbd901b00e301967a5c5146b25454f5d3455ad0/PatternNet.zip"
    ),
    archive="PatternNet.zip",
    checksum="sha256:456dd031950b0429518b8ec7d30a5c4b3f6456261ee1dd573a3eee43efb29958",
    root_dir="PatternNet",
    subdir="images",
    filename_pattern="{cls}{i:03d}.jpg",
    aliases=("pattern-net", "pattern_net"),
    notes="Collected from Google Earth imagery and the Google Map API for US cities.",
)
"""PatternNet dataset.

The `PatternNet <https://sites.google.com/view/zhouwx/dataset>`__ dataset was built for
remote-sensing image retrieval: 38 classes of 800 RGB images each, 256x256 px, with a
ground sample distance from 0.062 m to 4.693 m.

Dataset features:

* 30,400 images, 38 classes, 800 images per class
* 256x256 px, 0.062-4.693 m per pixel
* three spectral bands: RGB, JPEG

If you use this dataset in your research, please cite:

* Zhou et al., ISPRS J. 2018, https://doi.org/10.1016/j.isprsjprs.2018.01.004
"""

_RESISC45_CLASSES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge",
    "chaparral", "church", "circular_farmland", "cloud", "commercial_area",
    "dense_residential", "desert", "forest", "freeway", "golf_course", "ground_track_field",
    "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace",
    "parking_lot", "railway", "railway_station", "rectangular_farmland", "river",
    "roundabout", "runway", "sea_ice", "ship", "snowberg", "sparse_residential", "stadium",
    "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
)  # fmt: skip

NWPU_RESISC45 = DatasetSpec(
    name="nwpu-resisc45",
    title="NWPU-RESISC45",
    classes=_RESISC45_CLASSES,
    images_per_class=_uniform(_RESISC45_CLASSES, 700),
    image_size=(256, 256),
    gsd_m=(0.2, 30.0),
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Gong Cheng, Junwei Han and Xiaoqiang Lu. Remote Sensing Image Scene Classification: "
        "Benchmark and State of the Art. Proceedings of the IEEE, 105(10):1865-1883, 2017. "
        "doi:10.1109/JPROC.2017.2675998"
    ),
    homepage="https://gcheng-nwpu.github.io/#Datasets",
    # The authors release NWPU-RESISC45.rar (MD5 d824acb73957502b00efd559fc6cfbbb as listed
    # by TorchGeo) through OneDrive/Baidu; RAR is not readable with the standard library, so
    # the catalog points at TorchGeo's ZIP repack of the same files and its published MD5.
    url=(
        "https://hf.co/datasets/torchgeo/resisc45/resolve/"
        "a826b44d938a883185f11ebe3d512d38b464312f/NWPU-RESISC45.zip"
    ),
    archive="NWPU-RESISC45.zip",
    checksum="md5:75206b2e16446591afa88e2628744886",
    root_dir="NWPU-RESISC45",
    subdir="",
    filename_pattern="{cls}_{i:03d}.jpg",
    aliases=("resisc45", "nwpu", "resisc-45", "nwpu_resisc45", "nwpu-resisc-45"),
    notes="Google Earth imagery from over 100 countries.",
)
"""NWPU-RESISC45 dataset.

The `NWPU-RESISC45 <https://doi.org/10.1109/JPROC.2017.2675998>`__ dataset (REmote
Sensing Image Scene Classification, Northwestern Polytechnical University) holds 45
classes of 700 RGB Google Earth images each, 256x256 px, from 0.2 m to about 30 m per pixel.

Dataset features:

* 31,500 images, 45 classes, 700 images per class
* 256x256 px, 0.2-30 m per pixel
* three spectral bands: RGB, JPEG

If you use this dataset in your research, please cite:

* Cheng, Han & Lu, Proc. IEEE 2017, https://doi.org/10.1109/JPROC.2017.2675998
"""

# Images per class from the AID paper (Xia et al. 2017, Table of scene classes);
# they sum to 10,000.
_AID_COUNTS = {
    "Airport": 360, "BareLand": 310, "BaseballField": 220, "Beach": 400, "Bridge": 360,
    "Center": 260, "Church": 240, "Commercial": 350, "DenseResidential": 410,
    "Desert": 300, "Farmland": 370, "Forest": 250, "Industrial": 390, "Meadow": 280,
    "MediumResidential": 290, "Mountain": 340, "Park": 350, "Parking": 390,
    "Playground": 370, "Pond": 420, "Port": 380, "RailwayStation": 260, "Resort": 290,
    "River": 410, "School": 300, "SparseResidential": 300, "Square": 330, "Stadium": 290,
    "StorageTanks": 360, "Viaduct": 420,
}  # fmt: skip

AID = DatasetSpec(
    name="aid",
    title="AID: Aerial Image Dataset",
    classes=tuple(sorted(_AID_COUNTS)),
    images_per_class=_AID_COUNTS,
    image_size=(600, 600),
    gsd_m=(0.5, 8.0),
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Gui-Song Xia, Jingwen Hu, Fan Hu, Baoguang Shi, Xiang Bai, Yanfei Zhong, Liangpei "
        "Zhang and Xiaoqiang Lu. AID: A Benchmark Data Set for Performance Evaluation of "
        "Aerial Scene Classification. IEEE Transactions on Geoscience and Remote Sensing, "
        "55(7):3965-3981, 2017. doi:10.1109/TGRS.2017.2685945"
    ),
    homepage="https://captain-whu.github.io/AID/",
    url=None,  # OneDrive / Baidu Pan only
    archive=None,
    checksum=None,
    root_dir="AID",
    subdir="",
    filename_pattern="{cls_lower}_{i}.jpg",
    aliases=("aid30", "aerial-image-dataset"),
    notes="Distributed through OneDrive/Baidu Pan; download by hand from the homepage.",
)
"""AID: Aerial Image Dataset.

The `AID <https://captain-whu.github.io/AID/>`__ dataset holds 10,000 Google Earth images
of 30 aerial scene classes, 220-420 per class, 600x600 px, at 0.5-8 m per pixel.

Dataset features:

* 10,000 images, 30 classes, 220-420 images per class (per-class counts from the paper)
* 600x600 px, 0.5-8 m per pixel
* three spectral bands: RGB, JPEG

If you use this dataset in your research, please cite:

* Xia et al., IEEE TGRS 2017, https://doi.org/10.1109/TGRS.2017.2685945
"""

# Per-class counts of the released WHU-RS19 (1,005 images). They are not tabulated in the
# papers ("about 50 per class"); these are the counts of the released folders, taken from a
# public file list of the release (every class numbered 1..N without gaps, sum 1,005).
_WHU_RS19_COUNTS = {
    "Airport": 55, "Beach": 50, "Bridge": 52, "Commercial": 56, "Desert": 50,
    "Farmland": 50, "footballField": 50, "Forest": 53, "Industrial": 53, "Meadow": 61,
    "Mountain": 50, "Park": 50, "Parking": 50, "Pond": 54, "Port": 53,
    "railwayStation": 50, "Residential": 54, "River": 56, "Viaduct": 58,
}  # fmt: skip

WHU_RS19 = DatasetSpec(
    name="whu-rs19",
    title="WHU-RS19 (SatScene)",
    classes=tuple(sorted(_WHU_RS19_COUNTS)),
    images_per_class=_WHU_RS19_COUNTS,
    image_size=(600, 600),
    gsd_m=0.5,
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Gui-Song Xia, Wen Yang, Julie Delon, Yann Gousseau, Hong Sun and Henri Maitre. "
        "Structural high-resolution satellite image indexing. In ISPRS TC VII Symposium - "
        "100 Years ISPRS, Vienna, Austria, IAPRS Vol. XXXVIII, Part 7A, pages 298-303, 2010; "
        "and Dengxin Dai and Wen Yang. Satellite image classification via two-layer sparse "
        "coding with biased image representation. IEEE Geoscience and Remote Sensing "
        "Letters, 8(1):173-176, 2011."
    ),
    homepage="https://captain-whu.github.io/BED4RS/",
    url=None,  # Google Drive / Baidu Pan only
    archive=None,
    checksum=None,
    root_dir="WHU-RS19",
    subdir="",
    filename_pattern="{cls_lower}_{i:02d}.jpg",
    aliases=("whurs19", "whu_rs19", "rs19", "satscene", "sat-scene"),
    notes=(
        "Ground sample distance up to 0.5 m. File names are not uniform across classes "
        "(airport_01.jpg, beach-01.jpg, Desert_01.jpg, ...); class folders 'footballField' "
        "and 'railwayStation' start lower-case and sort last."
    ),
)
"""WHU-RS19 (SatScene) dataset.

The `WHU-RS19 <https://captain-whu.github.io/BED4RS/>`__ dataset holds 1,005 Google Earth
satellite images of 19 scene classes (about 50 per class), 600x600 px, with a ground
sample distance of up to 0.5 m.

Dataset features:

* 1,005 images, 19 classes, 50-61 images per class
* 600x600 px, up to 0.5 m per pixel
* three spectral bands: RGB, JPEG

If you use this dataset in your research, please cite:

* Xia et al., ISPRS TC VII Symposium 2010 (Structural high-resolution satellite image
  indexing)
* Dai & Yang, IEEE GRSL 8(1), 2011 (Satellite image classification via two-layer
  sparse coding with biased image representation)
"""

_RSSCN7_CLASSES = (
    "aGrass", "bField", "cIndustry", "dRiverLake", "eForest", "fResident", "gParking",
)  # fmt: skip

RSSCN7 = DatasetSpec(
    name="rsscn7",
    title="RSSCN7",
    classes=_RSSCN7_CLASSES,
    images_per_class=_uniform(_RSSCN7_CLASSES, 400),
    image_size=(400, 400),
    gsd_m=None,  # not stated by the authors: four sampling scales of Google Earth imagery
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Qin Zou, Lihao Ni, Tong Zhang and Qian Wang. Deep Learning Based Feature Selection "
        "for Remote Sensing Scene Classification. IEEE Geoscience and Remote Sensing "
        "Letters, 12(11):2321-2325, 2015. doi:10.1109/LGRS.2015.2475299"
    ),
    homepage="https://github.com/palewithout/RSSCN7",
    url=None,  # no archive with a published checksum
    archive=None,
    checksum=None,
    root_dir="RSSCN7",
    subdir="",
    filename_pattern="{cls[0]}{i:03d}.jpg",
    aliases=("rsscn-7", "rsscn"),
    notes="Images are sampled at four scales (100 per scale and class).",
)
"""RSSCN7 dataset.

The `RSSCN7 <https://github.com/palewithout/RSSCN7>`__ dataset holds 2,800 Google Earth
images of 7 scene classes, 400 per class, 400x400 px, sampled at four scales.

Dataset features:

* 2,800 images, 7 classes, 400 images per class
* 400x400 px
* three spectral bands: RGB, JPEG

If you use this dataset in your research, please cite:

* Zou et al., IEEE GRSL 2015, https://doi.org/10.1109/LGRS.2015.2475299
"""

_SIRI_CLASSES = (
    "agriculture", "commercial", "harbor", "idle_land", "industrial", "meadow", "overpass",
    "park", "pond", "residential", "river", "water",
)  # fmt: skip

SIRI_WHU = DatasetSpec(
    name="siri-whu",
    title="SIRI-WHU (Google image dataset)",
    classes=_SIRI_CLASSES,
    images_per_class=_uniform(_SIRI_CLASSES, 200),
    image_size=(200, 200),
    gsd_m=2.0,
    bands=_RGB,
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=(
        "Bei Zhao, Yanfei Zhong, Gui-Song Xia and Liangpei Zhang. Dirichlet-Derived Multiple "
        "Topic Scene Classification Model for High Spatial Resolution Remote Sensing "
        "Imagery. IEEE Transactions on Geoscience and Remote Sensing, 54(4):2108-2123, 2016. "
        "doi:10.1109/TGRS.2015.2496185"
    ),
    homepage="http://www.lmars.whu.edu.cn/prof_web/zhongyanfei/e-code.html",
    url=None,  # distributed through the authors' page / cloud drives
    archive=None,
    checksum=None,
    root_dir="Google dataset of SIRI-WHU_earth_im_tiff",
    subdir="12class_tif",
    filename_pattern="{i:04d}.tif",
    aliases=("siriwhu", "siri_whu", "siri"),
    notes="Google Earth imagery of urban areas in China; 8-bit RGB TIFF.",
)
"""SIRI-WHU dataset (Google image dataset of SIRI-WHU).

The `SIRI-WHU <http://www.lmars.whu.edu.cn/prof_web/zhongyanfei/e-code.html>`__ dataset
holds 2,400 Google Earth images of 12 classes, 200 per class, 200x200 px at 2 m per pixel.

Dataset features:

* 2,400 images, 12 classes, 200 images per class
* 200x200 px, 2 m per pixel
* three spectral bands: RGB, TIFF

If you use this dataset in your research, please cite:

* Zhao et al., IEEE TGRS 2016, https://doi.org/10.1109/TGRS.2015.2496185
"""

# Per-class counts as released (Helber et al. 2019); they sum to 27,000.
_EUROSAT_COUNTS = {
    "AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500,
    "Industrial": 2500, "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000,
    "River": 2500, "SeaLake": 3000,
}  # fmt: skip

_EUROSAT_CITATION = (
    "Patrick Helber, Benjamin Bischke, Andreas Dengel and Damian Borth. EuroSAT: A Novel "
    "Dataset and Deep Learning Benchmark for Land Use and Land Cover Classification. IEEE "
    "Journal of Selected Topics in Applied Earth Observations and Remote Sensing, "
    "12(7):2217-2226, 2019. doi:10.1109/JSTARS.2019.2918242"
)

EUROSAT = DatasetSpec(
    name="eurosat",
    title="EuroSAT (RGB)",
    classes=tuple(sorted(_EUROSAT_COUNTS)),
    images_per_class=_EUROSAT_COUNTS,
    image_size=(64, 64),
    gsd_m=10.0,
    bands=("B04", "B03", "B02"),
    dtype="uint8",
    rgb_bands=(0, 1, 2),
    citation=_EUROSAT_CITATION,
    homepage="https://github.com/phelber/EuroSAT",
    url="https://madm.dfki.de/files/sentinel/EuroSAT.zip",
    # torchvision's pinned mirror of the same archive (same MD5, as listed by torchvision).
    mirrors=(
        "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
        "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
    ),
    archive="EuroSAT.zip",
    checksum="md5:c8fa014336c82ac7804f0398fcb19387",  # as listed by torchvision
    root_dir=None,  # the archive extracts 2750/<class>/ directly
    subdir="2750",
    # The Zenodo re-release (record 7711810) extracts EuroSAT_RGB/<class>/.
    alt_subdirs=("EuroSAT_RGB", "EuroSAT/2750", "eurosat/2750"),
    filename_pattern="{cls}_{i}.jpg",
    aliases=("eurosat-rgb", "eurosat_rgb", "eurosatrgb"),
    notes="Sentinel-2 bands B04/B03/B02 rendered to 8-bit JPEG by the authors.",
)
"""EuroSAT (RGB) dataset.

The `EuroSAT <https://github.com/phelber/EuroSAT>`__ dataset holds 27,000 Sentinel-2
patches of 10 land-use/land-cover classes (2,000-3,000 per class), 64x64 px at 10 m per
pixel. This entry is the RGB release: bands B04, B03, B02 as 8-bit JPEG.

Dataset features:

* 27,000 images, 10 classes, 2,000-3,000 images per class
* 64x64 px, 10 m per pixel
* three bands (Sentinel-2 B04, B03, B02), JPEG

If you use this dataset in your research, please cite:

* Helber et al., IEEE JSTARS 2019, https://doi.org/10.1109/JSTARS.2019.2918242
"""

EUROSAT_MS = DatasetSpec(
    name="eurosat-ms",
    title="EuroSAT (multispectral, 13 bands)",
    classes=tuple(sorted(_EUROSAT_COUNTS)),
    images_per_class=_EUROSAT_COUNTS,
    image_size=(64, 64),
    gsd_m=10.0,
    bands=(
        "B01",
        "B02",
        "B03",
        "B04",
        "B05",
        "B06",
        "B07",
        "B08",
        "B08A",
        "B09",
        "B10",
        "B11",
        "B12",
    ),  # fmt: skip
    dtype="uint16",
    rgb_bands=(3, 2, 1),
    citation=_EUROSAT_CITATION,
    homepage="https://github.com/phelber/EuroSAT",
    url="https://madm.dfki.de/files/sentinel/EuroSATallBands.zip",
    archive="EuroSATallBands.zip",
    checksum="md5:5ac12b3b2557aa56e1826e981e8e200e",  # as listed by TorchGeo
    root_dir=None,  # the archive extracts ds/images/... directly
    subdir="ds/images/remote_sensing/otherDatasets/sentinel_2/tif",
    alt_subdirs=("EuroSAT_MS", "tif"),
    filename_pattern="{cls}_{i}.tif",
    aliases=("eurosat-allbands", "eurosat_ms", "eurosat-13", "eurosatms", "eurosat-multispectral"),
    notes=(
        "13-band uint16 GeoTIFF, Sentinel-2 L1C top-of-atmosphere reflectance x 10000; "
        "bands are resampled to 10 m (native 10/20/60 m). RGB = B04, B03, B02."
    ),
)
"""EuroSAT multispectral (all bands) dataset.

The 13-band release of `EuroSAT <https://github.com/phelber/EuroSAT>`__: the same 27,000
patches and classes as :data:`EUROSAT`, as 64x64 GeoTIFFs with all Sentinel-2 bands
(B01-B12 and B08A, uint16 reflectance x 10000, resampled to 10 m).

Dataset features:

* 27,000 images, 10 classes, 2,000-3,000 images per class
* 64x64 px, 10 m per pixel
* 13 spectral bands, uint16 GeoTIFF; RGB are bands 3, 2, 1 (0-based: B04, B03, B02)

If you use this dataset in your research, please cite:

* Helber et al., IEEE JSTARS 2019, https://doi.org/10.1109/JSTARS.2019.2918242
"""

CATALOG: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            UCMERCED, PATTERNNET, NWPU_RESISC45, AID, WHU_RS19, RSSCN7, SIRI_WHU, EUROSAT,
            EUROSAT_MS,
        )
    }
)  # fmt: skip
"""Every dataset landlens knows by name, keyed by canonical lowercase name."""


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "-")


def _build_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for spec in CATALOG.values():
        for key in (spec.name, *spec.aliases):
            k = _normalise(key)
            if k in index and index[k] != spec.name:
                raise ValueError(f"catalog alias {key!r} is used by {index[k]} and {spec.name}")
            index[k] = spec.name
    return index


_INDEX = _build_index()


def get_spec(name: str) -> DatasetSpec:
    """The catalog entry for a dataset name or alias, matched case-insensitively.

    Raises:
        DatasetError: if the name is not in the catalog (the message lists the known names).
    """
    key = _normalise(name)
    if key in _INDEX:
        return CATALOG[_INDEX[key]]
    raise DatasetError(
        f"unknown dataset {name!r}; known datasets: {', '.join(CATALOG)} "
        "(or pass a folder with one sub-folder per class)"
    )


def match_spec(
    classes: list[str] | tuple[str, ...], suffix: str | None = None
) -> DatasetSpec | None:
    """The catalog entry whose class folders are exactly ``classes`` (any order), if any.

    EuroSAT RGB and EuroSAT MS share their classes; ``suffix`` (the file extension found in
    the folder, e.g. ``".tif"``) picks the release whose files end that way.
    """
    wanted = set(classes)
    found = [spec for spec in CATALOG.values() if set(spec.classes) == wanted]
    if suffix is not None:
        same_suffix = [s for s in found if s.filename_pattern.lower().endswith(suffix.lower())]
        found = same_suffix or found
    return found[0] if found else None
