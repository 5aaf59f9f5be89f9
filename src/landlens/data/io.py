"""Reading image files: native arrays for analysis, 8-bit RGB for CNN backbones.

Three entry points:

* :func:`read_image` decodes a file completely into an ``H x W x C`` array in the file's
  own sample type (``uint8``, ``uint16``, ``int32``, ``float32``) with all its bands.
* :func:`load_rgb` decodes a file into an 8-bit RGB :class:`PIL.Image.Image`, the input
  every ImageNet-style backbone expects, following the rules below.
* :func:`probe_image` reads only the header: size, bands, sample type, format.

Every file problem a user can have (missing, empty, not an image, truncated, corrupt,
larger than ``max_pixels``) raises :class:`~landlens.errors.ImageReadError` with a short
reason; the functions never return partial data (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
is left alone and must stay ``False``).

TIFF files (recognised by their magic bytes, whatever the extension) are read with
``tifffile``, which handles any number of bands, 16-bit and float samples and planar
(``C x H x W``) storage; compressions that ``tifffile`` cannot decode without
``imagecodecs`` (LZW, JPEG) fall back to Pillow. A TIFF's pages after the first (a stack,
a pyramid's overviews) are ignored. Everything else is read with Pillow.

Size limit: ``max_pixels`` (width x height) is checked from the header before any pixel
data is decoded, so a decompression bomb costs nothing. Bands count too: an image with more
than :data:`BANDS_PER_PIXEL` bands counts as ``width x height x bands / 4`` pixels, so a
100-sample TIFF cannot slip under a limit meant for RGB. Only the first page of a
multi-page TIFF (or the first frame of an animation) is read; the others are never decoded. Pillow's own process-wide limit
(``Image.MAX_IMAGE_PIXELS``) is replaced by this per-call limit while a header is parsed
(under a lock, for the duration of ``Image.open`` only), so that a user can raise or
lower the limit per call and the message names the real size; a
``DecompressionBombError``/``Warning`` that Pillow raises while loading (GIF and ICO
frames) is reported the same way.

Conversion rules of :func:`load_rgb`:

* grayscale (1 band) is replicated to three channels; bilevel images become 0/255;
* palette images are expanded through their palette; CMYK, YCbCr, LAB and HSV are
  converted by Pillow (CMYK: ``R = (255 - C)(255 - K) / 255``, likewise G, B);
* an alpha channel (RGBA, LA, palette transparency, TIFF extra sample) is composited on
  black: ``out = round(colour * alpha / 255)``, so transparent "no data" pixels are black;
* multi-band images keep the bands ``rgb_bands`` (0-based, counted without the alpha
  channel), by default the first three, or bands 3, 2, 1 (Sentinel-2 B04, B03, B02) for
  13-band images (EuroSAT MS); single-band images ignore ``rgb_bands``, so a dataset-wide
  ``rgb_bands=(0, 1, 2)`` still accepts the odd grayscale scene;
* samples wider than 8 bits (``uint16``, ``int32``, ``float``) are scaled to 0-255:

  - with ``scale=s`` (a number): ``out = clip(round(v * 255 / s), 0, 255)``, the same
    fixed rule for every image (use it to compare radiometry across scenes);
  - by default, 13-band integer images use ``s = 3000`` (Sentinel-2 L1C reflectance x
    10000, so reflectance 0.3 maps to white; the rule TorchGeo uses to show EuroSAT);
  - by default, any other such image gets a per-image, per-band linear stretch between
    its 2nd and 98th percentiles (``(v - p2) / (p98 - p2)``, clipped; a constant band
    maps to 0), which suits 11-16-bit aerial and satellite products of unknown range.

Chips of georeferenced scenes: a path of the form ``SCENE.tif#window=COL,ROW,W,H&...`` (a
chip reference, :mod:`landlens.scenes.refs`) is read by rasterio through that window only, with
the bands, resampling, nodata and stretch the reference records
(:mod:`landlens.scenes.reader`); ``max_pixels`` applies to the chip, never to the scene, and
``rgb_bands``, ``scale`` and ``draft_size`` are ignored (the reference carries its own band
choice and stretch). Every reader below accepts such a path wherever it accepts a file.

All functions are free of shared state between calls and safe to use from DataLoader
worker processes.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from landlens.errors import ImageReadError, first_line
from landlens.scenes.refs import ChipRef, looks_like_chip_ref, parse_chip_ref

__all__ = [
    "BANDS_PER_PIXEL",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SENTINEL2_SCALE",
    "check_pixels",
    "ImageInfo",
    "file_problem",
    "is_image_file",
    "load_rgb",
    "probe_image",
    "read_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".dib",
        ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".jpx", ".tga",
    }
)  # fmt: skip
"""File extensions (lowercase, with the dot) treated as images when scanning folders."""

DEFAULT_MAX_PIXELS = 178_956_970
"""Default limit on width x height: twice Pillow's ``MAX_IMAGE_PIXELS``, i.e. Pillow's own
hard limit (about 13,377 x 13,377 pixels)."""

BANDS_PER_PIXEL = 4
"""Bands one pixel of ``max_pixels`` stands for: an image of more bands counts as
``width x height x bands / 4`` pixels, so every image within the limit decodes to at most
as many samples as an RGBA image of ``max_pixels`` pixels."""

SENTINEL2_SCALE = 3000.0
"""Divisor mapping Sentinel-2 L1C digital numbers (reflectance x 10000) to 0-1 for display."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Errors Pillow and tifffile raise on malformed data (besides UnidentifiedImageError).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
    KeyError, NotImplementedError, RuntimeError,
)  # fmt: skip

_MODE_INFO: dict[str, tuple[int, str]] = {
    "1": (1, "uint8"), "L": (1, "uint8"), "LA": (2, "uint8"), "La": (2, "uint8"),
    "P": (3, "uint8"), "PA": (4, "uint8"), "RGB": (3, "uint8"), "RGBA": (4, "uint8"),
    "RGBa": (4, "uint8"), "RGBX": (3, "uint8"), "CMYK": (3, "uint8"), "YCbCr": (3, "uint8"),
    "LAB": (3, "uint8"), "HSV": (3, "uint8"), "I": (1, "int32"), "F": (1, "float32"),
    "I;16": (1, "uint16"), "I;16L": (1, "uint16"), "I;16B": (1, "uint16"),
    "I;16N": (1, "uint16"),
}  # fmt: skip
"""Bands and sample type that :func:`read_image` returns for each Pillow mode."""


@dataclass(frozen=True)
class ImageInfo:
    """What an image header says, as :func:`read_image` would decode it.

    Attributes:
        width, height: size in pixels.
        bands: number of channels of the decoded array.
        dtype: numpy sample type name of the decoded array.
        format: container format as Pillow names it (``"JPEG"``, ``"PNG"``, ``"TIFF"``...).
        pages: pages or frames in the file; only the first is ever decoded.
    """

    width: int
    height: int
    bands: int
    dtype: str
    format: str
    pages: int = 1


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name has one of the :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- internals

_limit_lock = threading.Lock()
_limit_saved: list[int | None] = []


def _reset_after_fork() -> None:  # pragma: no cover - exercised only by fork()
    """A child forked while another thread held the lock must not inherit it held."""
    global _limit_lock
    if _limit_saved:
        Image.MAX_IMAGE_PIXELS = _limit_saved.pop()
    _limit_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a non-empty regular file an image can be read from, in a few words
    ("no such file", "symbolic link loop", "not a regular file: a named pipe (FIFO)"...), or
    ``None`` when it is one. Only ``stat`` is called: a FIFO or a device is never opened.
    For a chip reference (``SCENE#window=...``), the problem of its scene file or of the reference."""
    if looks_like_chip_ref(path):
        try:
            ref = parse_chip_ref(path)
        except ImageReadError as exc:
            return exc.reason
        if ref is not None:
            return file_problem(ref.scene)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return "broken symbolic link" if p.is_symlink() else "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read file ({exc.strerror or exc})"
    mode = st.st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))  # fmt: skip
    for test, what in kinds:
        if test(mode):
            return f"not a regular file: {what}"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file"
    return None


def _check_file(path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    """The path, after checking it is a non-empty regular file, and its first 16 bytes."""
    p = Path(path)
    problem = file_problem(p)
    if problem is not None:
        raise ImageReadError(p, problem)
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except PermissionError:
        raise ImageReadError(p, "permission denied") from None
    except IsADirectoryError:
        raise ImageReadError(p, "not a regular file") from None
    except OSError as exc:
        raise ImageReadError(p, f"cannot read file ({exc.strerror or exc})") from None
    return p, head


def _is_tiff(head: bytes) -> bool:
    return head[:4] in _TIFF_MAGIC


def check_pixels(
    path: Path, width: int, height: int, max_pixels: int | None, bands: int = 1
) -> None:
    """Refuse (:class:`ImageReadError`) an image whose decoded size exceeds ``max_pixels``:
    width x height, or width x height x bands / :data:`BANDS_PER_PIXEL` for more than 4 bands."""
    if max_pixels is None:
        return
    if width * height > max_pixels:
        raise ImageReadError(
            path,
            f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels} "
            "(--max-pixels)",
        )
    if width * height * bands > max_pixels * BANDS_PER_PIXEL:
        raise ImageReadError(
            path,
            f"image too large: {width}x{height} pixels x {bands} bands counts as "
            f"{width * height * bands // BANDS_PER_PIXEL} pixels, over the limit of {max_pixels} "
            "(--max-pixels)",
        )


def _first_line(exc: BaseException) -> str:
    return first_line(exc, 120)


def _reason(exc: BaseException) -> str:
    """A short human reason for a decoding exception."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large: {_first_line(exc)} (--max-pixels)"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    msg = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in msg or "failed to read" in msg:
        return "truncated image data"
    return f"corrupt image data ({_first_line(exc)})"


def _open_pil(path: Path, max_pixels: int | None) -> Image.Image:
    """Open (header only) with Pillow, enforcing ``max_pixels`` instead of Pillow's limit."""
    try:
        with _limit_lock:
            _limit_saved.append(Image.MAX_IMAGE_PIXELS)
            Image.MAX_IMAGE_PIXELS = None  # no bomb warning/error: our check follows
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = _limit_saved.pop()
    except (UnidentifiedImageError, Image.DecompressionBombError, MemoryError) as exc:
        raise ImageReadError(path, _reason(exc)) from None
    except _DECODE_ERRORS as exc:
        raise ImageReadError(path, _reason(exc)) from None
    try:
        check_pixels(path, im.width, im.height, max_pixels)
    except ImageReadError:
        im.close()
        raise
    return im


def _load_pil(path: Path, im: Image.Image, max_pixels: int | None) -> None:
    """Decode all pixel data, turning decoder failures into :class:`ImageReadError`.

    Some formats (GIF, ICO) check frame sizes against Pillow's limit while loading; their
    ``DecompressionBombWarning``/``Error`` become "image too large", and the size is checked
    against ``max_pixels`` again, since loading can change it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (Image.DecompressionBombError, MemoryError) as exc:
        raise ImageReadError(path, _reason(exc)) from None
    except Image.DecompressionBombWarning as exc:
        raise ImageReadError(path, f"image too large: {_first_line(exc)}") from None
    except _DECODE_ERRORS as exc:
        raise ImageReadError(path, _reason(exc)) from None
    check_pixels(path, im.width, im.height, max_pixels)


def _pil_array(path: Path, im: Image.Image, max_pixels: int | None) -> tuple[np.ndarray, bool]:
    """The decoded pixels of an open Pillow image as ``H x W x C`` and whether the last
    channel is alpha."""
    _load_pil(path, im, max_pixels)
    mode = im.mode
    alpha = False
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        if mode == "PA" or "transparency" in im.info:
            im, alpha = im.convert("RGBA"), True
        else:
            im = im.convert("RGB")
    elif mode in ("LA", "La"):
        im, alpha = (im.convert("LA") if mode == "La" else im), True
    elif mode in ("RGBA", "RGBa"):
        im, alpha = (im.convert("RGBA") if mode == "RGBa" else im), True
    elif mode not in ("L", "RGB", "I", "F") and not mode.startswith("I;16"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX and anything exotic
    arr = np.asarray(im)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr), alpha


@dataclass(frozen=True)
class _TiffPage:
    """A TIFF's first page and its layout: axes, shape, and the size they give."""

    page: Any
    axes: str
    shape: tuple[int, ...]
    height: int
    width: int
    bands: int


def _tiff_page(path: Path, tf: tifffile.TiffFile, max_pixels: int | None) -> _TiffPage:
    """The first page of a TIFF and its layout, after the size check (nothing decoded).

    Only the first page is ever read: the pages after it (a multi-page TIFF, a pyramid's
    overviews, a stack) are ignored, so they cost neither time nor memory.
    """
    if not tf.pages:
        raise ImageReadError(path, "corrupt image data (TIFF holds no image)")
    page = tf.pages.first
    axes, shape = str(page.axes), tuple(int(v) for v in page.shape)
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(path, f"unsupported TIFF layout (axes {axes})")
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    bands = int(np.prod(shape)) // max(width * height, 1)
    check_pixels(path, width, height, max_pixels, bands)
    return _TiffPage(page, axes, shape, height, width, bands)


def _read_tiff(path: Path, max_pixels: int | None) -> tuple[np.ndarray, bool] | None:
    """Decode a TIFF's first page with tifffile, or ``None`` when it needs a codec only
    Pillow has."""
    try:
        with tifffile.TiffFile(path) as tf:
            layout = _tiff_page(path, tf, max_pixels)
            page, axes, shape = layout.page, layout.axes, layout.shape
            arr = page.asarray()
            photometric = int(getattr(page, "photometric", -1))
            colormap = getattr(page, "colormap", None)
            extrasamples = tuple(int(e) for e in (getattr(page, "extrasamples", ()) or ()))
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise ImageReadError(path, _reason(exc)) from None
    except _DECODE_ERRORS as exc:
        if "imagecodecs" in str(exc):
            return None  # e.g. LZW or JPEG compression: Pillow can decode those
        raise ImageReadError(path, _reason(exc)) from None
    except Exception as exc:  # tifffile.TiffFileError and relatives
        if type(exc).__module__.startswith("tifffile"):
            raise ImageReadError(path, _reason(exc)) from None
        raise

    arr = np.asarray(arr).reshape(shape)
    # Put Y, X first and fold every other axis (samples, depth) into channels.
    yi, xi = axes.index("Y"), axes.index("X")
    height, width = layout.height, layout.width
    rest = [i for i in range(arr.ndim) if i not in (yi, xi)]
    arr = arr.transpose([yi, xi, *rest]).reshape(height, width, -1)
    if photometric == 3 and colormap is not None and arr.shape[-1] == 1:  # PALETTE
        cmap = np.asarray(colormap).T  # (entries, 3), 16-bit
        arr = cmap[arr[..., 0]]
        arr = (arr >> 8).astype(np.uint8) if cmap.max() > 255 else arr.astype(np.uint8)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    # Extra samples 1 (associated) and 2 (unassociated) are alpha; only the last one counts.
    alpha = bool(extrasamples) and extrasamples[-1] in (1, 2) and arr.shape[-1] in (2, 4)
    return np.ascontiguousarray(arr), alpha


def _decode(path: str | os.PathLike[str], max_pixels: int | None) -> tuple[np.ndarray, bool]:
    p, head = _check_file(path)
    if _is_tiff(head):
        out = _read_tiff(p, max_pixels)
        if out is not None:
            return out
    im = _open_pil(p, max_pixels)
    try:
        return _pil_array(p, im, max_pixels)
    finally:
        im.close()


def _chip(path: str | os.PathLike[str]) -> ChipRef | None:
    """The chip reference ``path`` is (``None`` for a file), its scene checked to be a file."""
    ref = parse_chip_ref(path)
    if ref is not None:
        problem = file_problem(ref.scene)
        if problem is not None:
            raise ImageReadError(path, f"scene {ref.scene}: {problem}")
    return ref


def _read_chip(path: str | os.PathLike[str], ref: ChipRef, max_pixels: int | None, rgb: bool) -> np.ndarray:
    """A chip's ``(H, W, 3)`` uint8 RGB (``rgb``) or ``(H, W, C)`` samples, ``max_pixels``
    checked on its window first; errors name the whole reference."""
    from landlens.scenes import reader

    check_pixels(Path(os.fspath(path)), ref.width, ref.height, max_pixels, len(ref.bands or (0, 0, 0)))
    try:
        return reader.read_chip_rgb(ref) if rgb else reader.read_chip(ref)[0]
    except ImageReadError as exc:
        raise ImageReadError(path, exc.reason) from None
    except MemoryError as exc:
        raise ImageReadError(path, _reason(exc)) from None


# ----------------------------------------------------------------------- conversion


def _to_uint8(x: np.ndarray, scale: float | None, sentinel2: bool) -> np.ndarray:
    """Scale ``H x W x C`` samples to ``uint8`` by the module's documented rule."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "b":
        return x.astype(np.uint8) * 255
    xf = x.astype(np.float32)
    if scale is None and sentinel2 and np.issubdtype(x.dtype, np.integer):
        scale = SENTINEL2_SCALE
    if scale is not None:
        out = xf * np.float32(255.0 / float(scale))
    else:
        flat = xf.reshape(-1, xf.shape[-1])
        finite = np.isfinite(flat)
        if not finite.all():
            flat = np.where(finite, flat, np.nan)
            lo, hi = np.nanpercentile(flat, [2.0, 98.0], axis=0)
            lo, hi = np.nan_to_num(lo), np.nan_to_num(hi)
        else:
            lo, hi = np.percentile(flat, [2.0, 98.0], axis=0)
        span = np.where(hi > lo, hi - lo, np.inf).astype(np.float32)
        out = (xf - lo.astype(np.float32)) * (np.float32(255.0) / span)
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def _alpha_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):  # float alpha in [0, 1]
        return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``round(rgb * alpha / 255)`` in integer arithmetic."""
    a = alpha.astype(np.uint16)[..., None]
    return ((rgb.astype(np.uint16) * a + 127) // 255).astype(np.uint8)


def _array_to_rgb(
    path: Path,
    arr: np.ndarray,
    alpha: bool,
    rgb_bands: Sequence[int] | None,
    scale: float | None,
) -> Image.Image:
    nbands = arr.shape[-1]
    colour, a = (arr[..., :-1], arr[..., -1]) if alpha else (arr, None)
    n = colour.shape[-1]
    if rgb_bands is not None and n > 1:
        idx = [int(b) for b in rgb_bands]
        if len(idx) not in (1, 3) or any(not -n <= b < n for b in idx):
            raise ImageReadError(path, f"rgb_bands {idx} do not fit an image with {n} band(s)")
        colour = colour[..., idx]
    elif n == 13:
        colour = colour[..., [3, 2, 1]]  # Sentinel-2 L1C order: B04, B03, B02
    elif n >= 3:
        colour = colour[..., :3]
    else:
        colour = colour[..., :1]
    rgb = _to_uint8(colour, scale, sentinel2=nbands == 13)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    if a is not None:
        rgb = _composite_on_black(rgb, _alpha_to_uint8(a))
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


# --------------------------------------------------------------------------- public API


def read_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode an image file completely into an ``H x W x C`` array.

    The array keeps the file's sample type (``uint8``, ``uint16``, ``int32``,
    ``float32``...) and all its bands, in native byte order. Grayscale files give
    ``C = 1``; planar TIFFs (``C x H x W``) are transposed to ``H x W x C``. Colour
    encodings that are not bands are converted: palette images to RGB (RGBA with
    transparency), CMYK/YCbCr/LAB/HSV to RGB, bilevel images to 0/255 ``uint8``.

    Args:
        path: the image file.
        max_pixels: largest width x height accepted, checked before decoding; ``None``
            for no limit.

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated, corrupt or
            larger than ``max_pixels``.
    """
    ref = _chip(path)
    if ref is not None:
        return _read_chip(path, ref, max_pixels, rgb=False)
    arr, _ = _decode(path, max_pixels)
    return arr


def load_rgb(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    rgb_bands: Sequence[int] | None = None,
    draft_size: tuple[int, int] | None = None,
    scale: float | None = None,
) -> Image.Image:
    """Decode an image file into an 8-bit RGB :class:`PIL.Image.Image`.

    Conversion follows the rules in the module docstring: grayscale is replicated,
    palette/CMYK are converted, alpha is composited on black, multi-band images keep
    ``rgb_bands`` (default: the first three, or 3, 2, 1 for 13 bands), and samples wider
    than 8 bits are divided by ``scale`` or, without it, stretched between their 2nd and
    98th percentiles (13-band integer images: divided by :data:`SENTINEL2_SCALE`).

    Args:
        path: the image file.
        max_pixels: largest width x height accepted, checked on the header before
            decoding; ``None`` for no limit.
        rgb_bands: 0-based indices of the bands shown as red, green, blue (or one index,
            shown as gray); alpha is not counted and single-band images ignore them.
        draft_size: ``(width, height)`` the caller will resize to. For JPEG files the
            decoder then skips detail with DCT scaling (``Image.draft``): the result is the
            smallest of 1/1, 1/2, 1/4, 1/8 of the full size that is still at least
            ``draft_size`` in both dimensions. Ignored for other formats.
        scale: fixed divisor for samples wider than 8 bits (see the module docstring).

    Raises:
        ImageReadError: as :func:`read_image`, or ``rgb_bands`` that do not fit the image.
    """
    ref = _chip(path)
    if ref is not None:
        return Image.fromarray(_read_chip(path, ref, max_pixels, rgb=True), "RGB")
    p, head = _check_file(path)
    if _is_tiff(head):
        out = _read_tiff(p, max_pixels)
        if out is not None:
            return _array_to_rgb(p, out[0], out[1], rgb_bands, scale)
    im = _open_pil(p, max_pixels)
    try:
        if draft_size is not None and im.format == "JPEG":
            w, h = (int(v) for v in draft_size)
            if w > 0 and h > 0:
                im.draft("RGB", (w, h))
        plain = rgb_bands is None or [int(b) for b in rgb_bands] == [0, 1, 2]
        if plain and (
            im.mode in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV")
            or (im.mode == "P" and "transparency" not in im.info)
        ):
            _load_pil(p, im, max_pixels)
            return im.convert("RGB")
        arr, alpha = _pil_array(p, im, max_pixels)
    finally:
        im.close()
    return _array_to_rgb(p, arr, alpha, rgb_bands, scale)


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image's header: size, bands and sample type as :func:`read_image` decodes.

    No pixel data is decoded and no size limit applies.

    Raises:
        ImageReadError: the file is missing, empty, not an image or has a corrupt header.
    """
    ref = _chip(path)
    if ref is not None:
        from landlens.scenes.reader import probe_chip

        try:
            width, height, bands, dtype, driver = probe_chip(ref)
        except ImageReadError as exc:
            raise ImageReadError(path, exc.reason) from None
        return ImageInfo(width, height, bands, dtype, driver)
    p, head = _check_file(path)
    if _is_tiff(head):
        try:
            with tifffile.TiffFile(p) as tf:
                layout = _tiff_page(p, tf, None)
                page, height, width, bands = layout.page, layout.height, layout.width, layout.bands
                dtype = np.dtype(page.dtype)
                if int(getattr(page, "photometric", -1)) == 3 and bands == 1:
                    bands, dtype = 3, np.dtype(np.uint8)
                if dtype.kind == "b":
                    dtype = np.dtype(np.uint8)
                return ImageInfo(width, height, bands, dtype.name, "TIFF", len(tf.pages))
        except ImageReadError:
            pass  # a layout tifffile cannot read: Pillow may (or will report the problem)
        except MemoryError:
            raise ImageReadError(p, "not enough memory to read the header") from None
        except Exception as exc:
            if not (isinstance(exc, _DECODE_ERRORS) or type(exc).__module__.startswith("tifffile")):
                raise
            # fall through: Pillow may still read it (or will report the problem)
    im = _open_pil(p, None)
    try:
        mode = im.mode
        bands, dtype = _MODE_INFO.get(mode, (3, "uint8"))
        if mode == "P" and "transparency" in im.info:
            bands = 4
        return ImageInfo(im.width, im.height, bands, dtype, str(im.format or "unknown"))
    finally:
        im.close()
