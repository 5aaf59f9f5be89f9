"""Reading uploaded images safely: a byte limit, content sniffing and a pixel limit.

An upload goes through three checks before any pixel is decoded:

1. **Bytes.** :func:`copy_limited` copies the upload stream to a named temporary file,
   reading at most ``limit + 1`` bytes in all (so a client cannot make the server read a
   gigabyte to learn it was too big); more than ``limit`` bytes is a 413.
2. **Content.** :func:`sniff_format` looks at the first bytes (the "magic number") and
   accepts JPEG, PNG, TIFF (classic and BigTIFF), GIF, BMP and WebP only. The client's
   file name and ``Content-Type`` are never used to decide what a file is; anything else
   is a 415.
3. **Pixels.** :func:`landlens.data.io.probe_image` reads the header; a width x height
   above ``max_pixels`` is a 413 before decoding, so a decompression bomb (a small file
   claiming a huge image) costs nothing. The decoder (:func:`landlens.data.io.load_rgb`)
   checks the same limit again.

Every failure raises :class:`UploadError` with the HTTP status and one line of detail.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from landlens.errors import ImageReadError, LandlensError

MAGIC_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
"""Leading bytes of the accepted formats (WebP is checked separately: ``RIFF....WEBP``)."""

FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp",
}  # fmt: skip
"""File extension used when an upload of each sniffed format is stored."""

CHUNK_SIZE = 1 << 16
"""Bytes asked for per read while copying an upload."""

NAME_LIMIT = 200
"""Longest client file name echoed back (characters)."""


class UploadError(LandlensError):
    """An upload refused with an HTTP status (413 too large, 415 not a supported image...).

    Attributes:
        status: the HTTP status code to answer with.
        detail: one line saying what is wrong.
    """

    def __init__(self, status: int, detail: str) -> None:
        self.status = int(status)
        self.detail = detail
        super().__init__(detail)


class ReadableStream(Protocol):
    """Anything with a blocking ``read(n)`` (a file, ``UploadFile.file``, a socket file)."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class SavedUpload:
    """An upload copied to a temporary file and checked.

    Attributes:
        path: the temporary file (the caller deletes it with :meth:`remove`).
        format: sniffed container format (``"JPEG"``, ``"PNG"``...).
        extension: file extension for that format (``".jpg"``...).
        sha256: hex SHA-256 of the bytes.
        bytes: size in bytes.
        width, height: size in pixels, from the header.
        name: the client's file name, reduced to a safe base name for display only.
        bands, dtype: channels and sample type the header promises (what decoding costs).
    """

    path: Path
    format: str
    extension: str
    sha256: str
    bytes: int
    width: int
    height: int
    name: str
    bands: int = 3
    dtype: str = "uint8"

    def remove(self) -> None:
        """Delete the temporary file (no error if it is already gone)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file, or ``None`` when not accepted."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in MAGIC_FORMATS:
        if head.startswith(magic):
            return fmt
    return None


def copy_limited(src: ReadableStream, dst: BinaryIO, limit: int, *, chunk_size: int = CHUNK_SIZE) -> tuple[int, str]:
    """Copy ``src`` into ``dst``, reading at most ``limit + 1`` bytes in total.

    Returns ``(number of bytes, hex SHA-256)``.

    Raises:
        UploadError: 413 when the stream holds more than ``limit`` bytes (reading stops at
            the first byte past the limit).
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    digest = hashlib.sha256()
    total = 0
    budget = limit + 1  # one byte past the limit is enough to know it is too large
    while budget > 0:
        chunk = src.read(min(chunk_size, budget))
        if not chunk:
            break
        total += len(chunk)
        budget -= len(chunk)
        if total > limit:
            raise UploadError(413, f"upload too large: more than {limit} bytes (limit {_human(limit)})")
        digest.update(chunk)
        dst.write(chunk)
    return total, digest.hexdigest()


def _human(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} bytes"


def safe_name(name: str | None) -> str:
    """A client file name reduced to something safe to echo: its base name, printable
    characters only, at most :data:`NAME_LIMIT` characters (``"upload"`` if nothing is left)."""
    if not name:
        return "upload"
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:NAME_LIMIT] or "upload"


def save_upload(src: ReadableStream, *, max_bytes: int, max_pixels: int, name: str | None = None,
                directory: str | os.PathLike[str] | None = None) -> SavedUpload:
    """Copy an upload to a named temporary file and check its size, format and pixel count.

    Args:
        src: the upload stream (blocking ``read``).
        max_bytes: largest accepted size in bytes.
        max_pixels: largest accepted width x height.
        name: the client's file name (display only; never used for the path or the format).
        directory: where the temporary file is created (default: the system temp folder).

    Returns:
        the checked upload; the caller removes its file with :meth:`SavedUpload.remove`.

    Raises:
        UploadError: 400 empty upload, 413 too many bytes or pixels, 415 not a supported
            image (by content) or an unreadable header.
    """
    from landlens.data.io import check_pixels, probe_image

    fd, tmp = tempfile.mkstemp(prefix="landlens-upload-", suffix=".bin", dir=directory)
    path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            size, sha = copy_limited(src, fh, max_bytes)
        if size == 0:
            raise UploadError(400, "empty upload: the file holds no data")
        with open(path, "rb") as fh:
            head = fh.read(16)
        fmt = sniff_format(head)
        if fmt is None:
            raise UploadError(415, "unsupported file: not a JPEG, PNG, TIFF, GIF, BMP or WebP image "
                                   "(judged by its content)")
        try:
            info = probe_image(path)
        except ImageReadError as exc:
            raise UploadError(415, f"unreadable {fmt} image: {exc.reason}") from None
        try:
            check_pixels(path, info.width, info.height, max_pixels, info.bands)
        except ImageReadError as exc:
            raise UploadError(413, exc.reason) from None
        return SavedUpload(path=path, format=fmt, extension=FORMAT_EXTENSIONS[fmt], sha256=sha, bytes=size,
                           width=info.width, height=info.height, name=safe_name(name), bands=info.bands,
                           dtype=info.dtype)
    except BaseException:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        raise


def decode_error(exc: ImageReadError) -> UploadError:
    """The :class:`UploadError` for a decoding failure: 413 for "too large", else 415."""
    reason = exc.reason.lower()
    if "too large" in reason or "not enough memory" in reason:
        return UploadError(413, f"image too large: {exc.reason}")
    return UploadError(415, f"unreadable image: {exc.reason}")


def decode_upload(upload: SavedUpload, max_pixels: int):  # -> PIL.Image.Image
    """Decode a checked upload to 8-bit RGB (:func:`landlens.data.io.load_rgb` with the limit).

    Raises:
        UploadError: 413 too many pixels, 415 corrupt or truncated data.
    """
    from landlens.data.io import load_rgb

    try:
        return load_rgb(upload.path, max_pixels=max_pixels)
    except ImageReadError as exc:
        raise decode_error(exc) from None


__all__ = [
    "CHUNK_SIZE",
    "FORMAT_EXTENSIONS",
    "MAGIC_FORMATS",
    "SavedUpload",
    "UploadError",
    "copy_limited",
    "decode_error",
    "decode_upload",
    "safe_name",
    "save_upload",
    "sniff_format",
]
