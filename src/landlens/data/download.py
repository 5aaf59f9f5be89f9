"""Downloading and extracting catalog datasets, for machines that have a network.

:func:`download_dataset` fetches a catalog entry's archive with ``pooch.retrieve``: pooch
streams it into a temporary file beside the destination, checks the published checksum
(``md5:...`` / ``sha256:...``, the catalog's own notation), moves it into place only if it
matches, and does not download again an archive already present with the right checksum.
Mirrors are tried in turn. The archive is then extracted with the standard library (ZIP,
TAR) and the class root returned; an extraction that finished is not repeated.

Many landlens users work offline. Without network access the function raises a
:class:`~landlens.errors.LandlensError` that says so in one line and tells how to use a
copy of the dataset obtained elsewhere: every landlens command accepts the folder
(``landlens data verify /path/to/UCMerced_LandUse --dataset ucmerced``). Datasets that are
only distributed through cloud drives (``url=None`` in the catalog) get the same kind of
message, with the dataset's homepage.
"""

from __future__ import annotations

import errno
import ftplib
import logging
import os
import re
import shutil
import socket
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from landlens.data.catalog import DatasetSpec, get_spec
from landlens.errors import DatasetError, LandlensError
from landlens.hashing import file_digest as file_checksum

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


class _ChecksumError(Exception):
    """The file arrived, but its checksum is not the published one (pooch deleted it)."""


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


def _copy_file_url(url: str, output_file: str, pooch: Any = None, check_only: bool = False) -> bool | None:
    """A pooch downloader for ``file://`` URLs (a copy on a local or mounted disk)."""
    source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if check_only:
        return source.is_file()
    try:
        shutil.copyfile(source, output_file)
    except OSError as exc:
        raise _HttpError(f"{url}: {exc.strerror or exc}") from None
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__`` and urllib3's ``reason``."""
    seen: set[int] = set()
    todo: BaseException | None = exc
    while todo is not None and id(todo) not in seen:
        seen.add(id(todo))
        yield todo
        reason = getattr(todo, "reason", None)
        wrapped = todo.args[0] if todo.args and isinstance(todo.args[0], BaseException) else None
        todo = todo.__cause__ or (reason if isinstance(reason, BaseException) else None) or wrapped or todo.__context__


def _is_network(exc: OSError) -> bool:
    """A socket's failure to reach or hear from a host, not a local file's."""
    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)) or exc.errno in (
        errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN)


def _network_error(url: str, exc: Exception, timeout: float) -> _NetworkError:
    """One short reason for a failed connection (the socket's own words where there are some)."""
    import requests

    chain = list(_causes(exc))
    if any(isinstance(e, (TimeoutError, requests.exceptions.Timeout)) or "timed out" in str(e) for e in chain):
        return _NetworkError(_host(url), f"timed out after {timeout:g} s")
    for e in reversed(chain):
        if isinstance(e, OSError) and e.strerror:
            return _NetworkError(_host(url), e.strerror)
    return _NetworkError(_host(url), f"connection failed ({type(chain[-1]).__name__})")


@contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch logs "Downloading data from ..." on stderr; landlens shows a progress bar instead."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fetch(url: str, archive: Path, checksum: str | None, timeout: float, progress: bool) -> None:
    """Put ``url`` at ``archive`` (already there with ``checksum``: nothing to do)."""
    import pooch
    import requests

    scheme = urllib.parse.urlsplit(url).scheme
    bar = None
    if scheme == "file":
        downloader: Any = _copy_file_url
    elif scheme in ("http", "https"):
        if progress:
            from tqdm import tqdm

            class Bar(tqdm):  # pooch tests the bar's truth before it sets the total, which tqdm refuses
                def __bool__(self) -> bool:
                    return True

            bar = Bar(unit="B", unit_scale=True, desc=archive.name)
        downloader = pooch.HTTPDownloader(progressbar=bar if bar is not None else False, chunk_size=_CHUNK,
                                          timeout=timeout,
                                          headers={"User-Agent": "landlens"})
    elif scheme == "ftp":
        downloader = pooch.FTPDownloader(progressbar=progress, chunk_size=_CHUNK, timeout=timeout)
    else:
        raise _HttpError(f"{url}: landlens downloads http, https, ftp and file URLs")
    try:
        with _quiet_pooch():
            pooch.retrieve(url, known_hash=checksum, fname=archive.name, path=archive.parent,
                           downloader=downloader)
    except requests.exceptions.HTTPError as exc:
        response = exc.response
        status = f"HTTP {response.status_code} {response.reason}" if response is not None else str(exc)
        raise _HttpError(f"{url}: {status}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError) as exc:
        raise _network_error(url, exc, timeout) from None
    except requests.exceptions.RequestException as exc:
        raise _HttpError(f"{url}: {type(exc).__name__}") from None
    except ftplib.Error as exc:  # the FTP server answered with an error
        raise _HttpError(f"{url}: FTP {exc}") from None
    except ValueError as exc:
        got = re.search(r"but got ([0-9a-fA-F]+)", str(exc))
        if got is None:  # not pooch's checksum message: a bug
            raise
        raise _ChecksumError(got.group(1)) from None
    except OSError as exc:
        if _is_network(exc):  # FTP's socket errors are not wrapped
            raise _network_error(url, exc, timeout) from None
        raise LandlensError(f"{archive}: cannot write the download ({exc.strerror or exc})") from None
    finally:
        if bar is not None:
            bar.close()


def _download_archive(spec: DatasetSpec, archive: Path, timeout: float, progress: bool) -> None:
    algorithm, expected = spec.checksum_algorithm, spec.checksum_value
    offline: list[_NetworkError] = []
    failures: list[str] = []
    mismatch: str | None = None
    for url in (spec.url, *spec.mirrors):
        assert url is not None
        try:
            _fetch(url, archive, spec.checksum, timeout, progress)
        except _NetworkError as exc:
            offline.append(exc)
            continue
        except _HttpError as exc:
            failures.append(str(exc))
            continue
        except _ChecksumError as exc:
            mismatch = (
                f"{archive.name} from {url}: {algorithm} checksum mismatch "
                f"(expected {expected}, got {exc}); the download was discarded"
            )
            continue
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

    Not pooch's ``Unzip``/``Untar``: they extract into a folder of their own and skip it once
    it exists, where the catalog's layouts need ``dest`` itself; not torchvision's
    ``extract_archive``: it picks the format from the file name, extracts TAR members
    without the ``"data"`` filter (absolute paths, ``..`` and links pass), lets a ZIP member
    with ``..`` in its path through silently (``zipfile`` rewrites it) instead of refusing
    the archive, and fails with its library's errors rather than one line naming the archive.

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
