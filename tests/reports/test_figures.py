"""Report figures: PNG output, confusion-matrix normalisation, learning-curve panels, exact
image-grid layout, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import landlens.atomic as atomic
from landlens.reports.figures import (
    GRID_PAD,
    GRID_TITLE_PX,
    grid_size,
    plot_confusion_matrix,
    plot_learning_curves,
    row_normalize,
    save_image_grid,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        return im.size


@pytest.mark.filterwarnings("error")
def test_row_normalize_hand_worked_with_empty_row() -> None:
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    expected = np.array([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    out = row_normalize(cm)
    assert np.array_equal(out, expected)
    assert not np.isnan(out).any()
    assert np.array_equal(row_normalize(np.zeros((2, 2))), np.zeros((2, 2)))


@pytest.mark.filterwarnings("error")  # a 0/0 row must not raise a RuntimeWarning
@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png_small(tmp_path, normalize: bool) -> None:
    cm = np.array([[5, 1, 0], [0, 0, 0], [1, 0, 7]])
    out = plot_confusion_matrix(cm, ["forest", "harbor", "river"], tmp_path / "sub" / "cm.png", normalize=normalize)
    assert out == tmp_path / "sub" / "cm.png"
    w, h = _png_size(out)
    assert 300 <= w <= 3000 and 300 <= h <= 3000
    assert sorted(os.listdir(out.parent)) == ["cm.png"]  # no temporary file left behind


@pytest.mark.filterwarnings("error")
def test_confusion_matrix_45_classes_is_larger(tmp_path) -> None:
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, (45, 45)) + np.eye(45, dtype=int) * 80
    cm[7] = 0
    classes = [f"class_name_{i:02d}" for i in range(45)]
    big = plot_confusion_matrix(cm, classes, tmp_path / "cm45.png", title="NWPU")
    small = plot_confusion_matrix(cm[:3, :3], classes[:3], tmp_path / "cm3.png")
    (wb, hb), (ws, hs) = _png_size(big), _png_size(small)
    assert wb > 1.5 * ws and hb > 1.5 * hs  # the figure grows with the class count


def test_confusion_matrix_shape_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_learning_curves_list_and_dict_forms(tmp_path) -> None:
    rows = [
        {"epoch": e, "train_loss": 2.0 / e, "val_loss": (2.2 / e if e % 2 == 0 else None),
         "train_acc": 0.5 + 0.1 * e, "val_acc": 0.45 + 0.1 * e, "lr": 0.1 * 0.5**e}
        for e in range(1, 5)
    ]
    a = plot_learning_curves(rows, tmp_path / "lc_rows.png", title="run")
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    b = plot_learning_curves(cols, tmp_path / "lc_cols.png")
    # three panels (loss, accuracy, lr) of 4.8 in at 100 dpi
    assert _png_size(a) == (1440, 380)
    assert _png_size(b) == (1440, 380)


def test_learning_curves_missing_keys_are_skipped(tmp_path) -> None:
    only_loss = plot_learning_curves({"train_loss": [1.0, 0.5, 0.25]}, tmp_path / "loss.png")
    assert _png_size(only_loss) == (480, 380)  # one panel
    two = plot_learning_curves([{"train_loss": 1.0, "val_acc": 0.2}, {"train_loss": 0.7}], tmp_path / "two.png")
    assert _png_size(two) == (960, 380)


def test_learning_curves_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no loss"):
        plot_learning_curves({"epoch": [1, 2]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="different lengths"):
        plot_learning_curves({"train_loss": [1.0, 2.0], "val_loss": [1.0]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _tiles(n: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_image_grid_exact_layout(tmp_path) -> None:
    tiles = _tiles(5, 10, 12)
    out = save_image_grid(tiles, tmp_path / "g.png", ncols=3)
    # 3 columns x 2 rows of 12x10 cells with 2-pixel gaps: 3*12 + 4*2 = 44, 2*10 + 3*2 = 26
    assert _png_size(out) == (44, 26) == grid_size(5, 3, 10, 12)
    with Image.open(out) as im:
        grid = np.asarray(im.convert("RGB"))
    for i, t in enumerate(tiles):
        r, c = divmod(i, 3)
        y, x = 2 + r * 12, 2 + c * 14
        assert np.array_equal(grid[y:y + 10, x:x + 12], t)
    assert (grid[:, :2] == 255).all() and (grid[-2:] == 255).all()  # white margins
    assert (grid[14:24, 30:42] == 255).all()  # the unused sixth cell stays white


def test_image_grid_titles_and_cell_px(tmp_path) -> None:
    tiles = _tiles(4, 8, 8)
    out = save_image_grid(tiles, tmp_path / "t.png", ncols=2, titles=["a", "b", "c", "a long caption"], cell_px=16)
    assert _png_size(out) == (2 * 16 + 3 * GRID_PAD, 2 * (16 + GRID_TITLE_PX) + 3 * GRID_PAD)
    with Image.open(out) as im:
        grid = np.asarray(im.convert("RGB"))
    y0 = GRID_PAD + GRID_TITLE_PX
    cell = grid[y0:y0 + 16, GRID_PAD:GRID_PAD + 16]
    assert np.array_equal(cell, np.repeat(np.repeat(tiles[0], 2, axis=0), 2, axis=1))  # nearest enlargement
    assert (grid[GRID_PAD:y0, GRID_PAD:GRID_PAD + 16] < 128).any()  # some caption ink
    # the same input gives the same bytes
    again = save_image_grid(tiles, tmp_path / "t2.png", ncols=2, titles=["a", "b", "c", "a long caption"], cell_px=16)
    assert out.read_bytes() == again.read_bytes()


def test_image_grid_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        save_image_grid([np.zeros((4, 4, 3), dtype=np.float32)], tmp_path / "x.png", ncols=1)
    with pytest.raises(ValueError, match="titles"):
        save_image_grid(_tiles(2, 4, 4), tmp_path / "x.png", ncols=1, titles=["one"])
    with pytest.raises(ValueError, match="no images"):
        save_image_grid([], tmp_path / "x.png", ncols=1)


def test_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    target = tmp_path / "cm.png"
    plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], target)
    before = target.read_bytes()

    def broken_replace(src, dst):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)  # the one atomic writer
    with pytest.raises(OSError, match="disk full"):
        plot_confusion_matrix(np.array([[1, 2], [3, 4]]), ["a", "b"], target)
    with pytest.raises(OSError, match="disk full"):
        save_image_grid(_tiles(1, 4, 4), target, ncols=1)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cm.png"]
