"""Downloading and extracting catalog datasets, for machines that have a network.

:func:`download_dataset` streams a catalog entry's archive into a ``.part`` file, checks
its published checksum while it arrives, renames it into place, extracts it with the
standard library (ZIP, TAR) and returns the class root. An archive already present with
the right checksum is not downloaded again, and an extraction that finished is not
repeated.

Many landlens users work offline. Without network access the function raises a
:class:`~landlens.errors.LandlensError` that says so in one line and tells how to use a
copy of the dataset obtained elsewhere: every landlens command accepts the folder
(``landlens data verify /path/to/UCMerced_LandUse --dataset ucmerced``). Datasets that are
only distributed through cloud drives (``url=None`` in the catalog) get the same kind of
message, with the dataset's homepage.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from landlens.data.catalog import DatasetSpec, get_spec
from landlens.hashing import file_digest as file_checksum
from landlens.errors import DatasetError, LandlensError

__all__ = ["DEFAULT_TIMEOUT", "download_dataset", "extract_archive", "file_checksum"]

DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for a connection or for the next block of data."""

_CHUNK = 1 << 20
_MARKER = ".landlens-extracted-{archive}"


class _NetworkError(Exception):
    """No connection to a host (DNS failure, refused, unreachable, timed out)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(reason)
        self.host = host
        self.reason = reason


class _HttpError(Exception):
    """The server answered, but not with the file."""


def _host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts.netloc or parts.scheme + ":"


def _local_hint(spec: DatasetSpec) -> str:
    folder = spec.root_dir or (spec.subdir.split("/")[0] if spec.subdir else spec.name)
    return (
        f"point landlens at a local copy instead: "
        f"`landlens data verify /path/to/{folder} --dataset {spec.name}` "
        "(or pass the folder to any command)"
    )


def _fetch(
    url: str, part: Path, algorithm: str | None, timeout: float, progress: bool
) -> str | None:
    """Stream ``url`` into ``part``; return the digest (``None`` without an algorithm)."""
    h = hashlib.new(algorithm, usedforsecurity=False) if algorithm else None
    request = urllib.request.Request(url, headers={"User-Agent": "landlens"})
    host = _host(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(part, "wb") as out:
            total = resp.headers.get("Content-Length")
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=int(total) if total and total.isdigit() else None,
                    unit="B", unit_scale=True, desc=part.name[: -len(".part")],
                )  # fmt: skip
            try:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    if h is not None:
                        h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as exc:
        raise _HttpError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if urllib.parse.urlsplit(url).scheme == "file":
            raise _HttpError(f"{url}: {exc.reason}") from None
        raise _NetworkError(
            host, str(getattr(exc.reason, "strerror", None) or exc.reason)
        ) from None
    except TimeoutError:
        raise _NetworkError(host, f"timed out after {timeout:g} s") from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _NetworkError(host, f"connection failed ({type(exc).__name__})") from None
    except OSError as exc:
        raise LandlensError(f"{part}: cannot write the download ({exc.strerror or exc})") from None
    return None if h is None else h.hexdigest()


def _download_archive(spec: DatasetSpec, archive: Path, timeout: float, progress: bool) -> None:
    algorithm, expected = spec.checksum_algorithm, spec.checksum_value
    part = archive.with_name(archive.name + ".part")
    offline: list[_NetworkError] = []
    failures: list[str] = []
    mismatch: str | None = None
    for url in (spec.url, *spec.mirrors):
        assert url is not None
        try:
            digest = _fetch(url, part, algorithm, timeout, progress)
        except _NetworkError as exc:
            offline.append(exc)
            part.unlink(missing_ok=True)
            continue
        except _HttpError as exc:
            failures.append(str(exc))
            part.unlink(missing_ok=True)
            continue
        if expected is not None and digest != expected:
            part.unlink(missing_ok=True)
            mismatch = (
                f"{archive.name} from {url}: {algorithm} checksum mismatch "
                f"(expected {expected}, got {digest}); the download was discarded"
            )
            continue
        os.replace(part, archive)
        return
    if mismatch is not None:
        raise DatasetError(mismatch)
    if offline and not failures:
        hosts = ", ".join(dict.fromkeys(e.host for e in offline))
        raise LandlensError(
            f"no network access to {hosts} ({offline[0].reason}); "
            f"download {spec.archive} elsewhere from {spec.url}, extract it, and "
            + _local_hint(spec)
        )
    raise LandlensError(
        f"download of {spec.archive} failed: {'; '.join(failures + [str(e) for e in offline])}"
        f"; {_local_hint(spec)}"
    )


def _safe_members_zip(zf: zipfile.ZipFile, dest: Path) -> None:
    root = dest.resolve()
    for info in zf.infolist():
        target = (dest / info.filename).resolve()
        if target != root and root not in target.parents:
            raise DatasetError(f"{zf.filename}: unsafe path in archive: {info.filename}")


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a ZIP or TAR archive into ``dest`` with the standard library.

    Members that would land outside ``dest`` are refused. RAR and 7z archives cannot be
    read by the standard library: extract them with ``unrar x`` or ``7z x`` instead.

    Raises:
        LandlensError: the format cannot be extracted here.
        DatasetError: the archive is damaged or unsafe.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    suffix = archive.name.lower()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _safe_members_zip(zf, dest)
                zf.extractall(dest)
            return
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    for member in tf.getmembers():
                        target = (dest / member.name).resolve()
                        if dest.resolve() not in target.parents or member.issym() or member.islnk():
                            raise DatasetError(f"{archive}: unsafe member {member.name}")
                    tf.extractall(dest)
            return
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DatasetError(f"{archive}: damaged archive ({exc})") from None
    if suffix.endswith((".rar", ".7z")):
        kind = "RAR" if suffix.endswith(".rar") else "7z"
        raise LandlensError(
            f"cannot extract {archive}: {kind} archives are not supported by the Python "
            f"standard library; extract it with `unrar x` or `7z x` into {dest} and pass "
            "the extracted folder to landlens"
        )
    raise LandlensError(f"cannot extract {archive}: not a ZIP or TAR archive")


def _class_root(spec: DatasetSpec, dest: Path) -> Path:
    root = dest / spec.root_dir if spec.root_dir else dest
    return root / spec.subdir if spec.subdir else root


def download_dataset(
    name: str | DatasetSpec,
    dest: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    extract: bool = True,
    progress: bool = False,
) -> Path:
    """Download a catalog dataset into ``dest``, check it, extract it.

    Args:
        name: catalog name or alias, or a :class:`DatasetSpec` (e.g. one with another url).
        dest: folder that receives the archive and its extracted content.
        timeout: seconds to wait for a connection or for the next block of data.
        extract: extract the archive after checking it.
        progress: show a progress bar on stderr.

    Returns:
        The class root of the extracted dataset (the archive path when ``extract=False``).

    Raises:
        LandlensError: no network access, no direct download for this dataset, a download
            error, or an archive format the standard library cannot extract.
        DatasetError: checksum mismatch, damaged archive, or an archive without the
            expected layout.
    """
    spec = name if isinstance(name, DatasetSpec) else get_spec(name)
    if spec.url is None or spec.archive is None:
        raise LandlensError(
            f"{spec.title} has no direct download; get it from {spec.homepage}, extract it, "
            f"and {_local_hint(spec)}"
        )
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LandlensError(f"{dest}: cannot create folder ({exc.strerror or exc})") from None
    archive = dest / spec.archive
    have = archive.is_file() and (
        spec.checksum is None
        or file_checksum(archive, spec.checksum_algorithm or "md5") == spec.checksum_value
    )
    if not have:
        _download_archive(spec, archive, timeout, progress)
    if not extract:
        return archive
    marker = dest / _MARKER.format(archive=spec.archive)
    target = _class_root(spec, dest)
    if not (marker.is_file() and target.is_dir()):
        extract_archive(archive, dest)
        marker.write_text(spec.checksum or "extracted\n")
    if not target.is_dir():
        raise DatasetError(
            f"{archive}: extracted, but {target} is missing (unexpected archive layout)"
        )
    return target
