"""Multi-page and many-sample TIFFs: the size limit counts bands, and only page 0 is decoded.

The probe of issue #17 found that a 160-page zlib TIFF of 3000 x 3000 raised a server's RSS by
2.8 GB and that 64-page and 100-sample TIFFs passed ``--max-pixels``; these tests rebuild
smaller versions of those files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from landlens.data.io import BANDS_PER_PIXEL, load_rgb, probe_image, read_image
from landlens.errors import ImageReadError

SIDE = 2000
PAGES = 64


@pytest.fixture(scope="module")
def multipage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 zlib pages of 2000 x 2000 uint8: 256 MB decoded, a few hundred KB on disk."""
    path = tmp_path_factory.mktemp("bombs") / "pages.tif"
    page = np.zeros((SIDE, SIDE), np.uint8)
    page[::7, ::5] = 200  # page 0 has content we can check
    blank = np.zeros_like(page)

    def pages():  # one series of 64 pages, as tifffile.imwrite writes a (64, H, W) stack
        yield page
        for _ in range(PAGES - 1):
            yield blank

    tifffile.imwrite(path, pages(), shape=(PAGES, SIDE, SIDE), dtype=np.uint8,
                     photometric="minisblack", compression="zlib")
    assert path.stat().st_size < 5_000_000
    return path


@pytest.fixture(scope="module")
def many_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One page of 1000 x 1000 with 100 samples per pixel (planar), zlib."""
    path = tmp_path_factory.mktemp("bombs") / "samples.tif"
    tifffile.imwrite(path, np.zeros((100, 1000, 1000), np.uint8), photometric="minisblack",
                     planarconfig="separate", compression="zlib")
    return path


def test_many_samples_count_against_the_limit(many_samples: Path) -> None:
    info = probe_image(many_samples)
    assert (info.width, info.height, info.bands) == (1000, 1000, 100)
    # 1e6 pixels fit a limit of 2e6; 1e6 x 100 bands counts as 25e6 pixels and does not
    limit = 2_000_000
    assert 1000 * 1000 * 100 > limit * BANDS_PER_PIXEL
    for reader in (read_image, load_rgb):
        with pytest.raises(ImageReadError, match=r"1000x1000 pixels x 100 bands .* over the limit of 2000000"):
            reader(many_samples, max_pixels=limit)
    assert read_image(many_samples, max_pixels=25_000_000).shape == (1000, 1000, 100)


def test_verify_refuses_many_samples(many_samples: Path) -> None:
    from landlens.cli.main import cli

    root = many_samples.parent / "ds"
    (root / "a").mkdir(parents=True)
    many_samples.rename(root / "a" / "x.tif")
    res = CliRunner().invoke(cli, ["data", "verify", str(root), "--max-pixels", "2000000"])
    try:
        assert "100 bands" in res.output, res.output
    finally:
        (root / "a" / "x.tif").rename(many_samples)


def test_only_the_first_page_is_decoded(multipage: Path) -> None:
    info = probe_image(multipage)
    assert (info.width, info.height, info.bands, info.pages) == (SIDE, SIDE, 1, PAGES)
    arr = read_image(multipage, max_pixels=50_000_000)
    assert arr.shape == (SIDE, SIDE, 1)
    expected = np.zeros((SIDE, SIDE), np.uint8)
    expected[::7, ::5] = 200
    np.testing.assert_array_equal(arr[..., 0], expected)


_RSS_SCRIPT = """
import json, resource, sys
import numpy as np
from landlens.data.io import load_rgb
np.zeros(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = load_rgb(sys.argv[1], max_pixels=50_000_000)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kb": after - before, "size": img.size}))
"""


def test_multipage_bomb_peak_memory(multipage: Path) -> None:
    """Peak RSS of decoding the 64-page file: all pages are 256 MB; page 0 is 4 MB (+ RGB 12 MB)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(multipage)], capture_output=True,
                         text=True, check=True, timeout=120)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["size"] == [SIDE, SIDE]
    assert res["kb"] < 64 * 1024, f"decoding page 0 raised peak RSS by {res['kb'] / 1024:.0f} MB"
