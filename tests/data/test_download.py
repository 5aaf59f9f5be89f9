"""Downloads without the internet: file:// and a local HTTP server; offline messages."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures.make_datasets import make_dataset

from landlens.cli.data import data
from landlens.data.catalog import DatasetSpec, get_spec
from landlens.data.download import download_dataset, extract_archive, file_checksum
from landlens.data.folder import scan_folder
from landlens.errors import DatasetError, LandlensError


def _zip_tree(src_root: Path, top: str, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((src_root / top).rglob("*")):
            zf.write(path, path.relative_to(src_root).as_posix())
    return archive


@pytest.fixture(scope="module")
def ucm_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small UCMerced_LandUse.zip with the release's layout (2 classes x 2 images)."""
    work = tmp_path_factory.mktemp("ucm_zip")
    make_dataset(work / "src", "ucmerced", per_class=2, classes=2, size=8)
    serve = work / "serve"
    serve.mkdir()
    return _zip_tree(work / "src", "UCMerced_LandUse", serve / "UCMerced_LandUse.zip")


def _spec(url: str, archive: Path, algorithm: str = "md5") -> DatasetSpec:
    digest = hashlib.new(algorithm, archive.read_bytes()).hexdigest()
    return dataclasses.replace(
        get_spec("ucmerced"), url=url, mirrors=(), checksum=f"{algorithm}:{digest}"
    )


@pytest.fixture
def http_server(ucm_zip: Path) -> Iterator[str]:
    """A quiet HTTP server on 127.0.0.1 serving the folder of ``ucm_zip``; yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = partial(Quiet, directory=str(ucm_zip.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_from_file_url(ucm_zip: Path, tmp_path: Path) -> None:
    spec = _spec(ucm_zip.as_uri(), ucm_zip)
    dest = tmp_path / "data"
    root = download_dataset(spec, dest)
    assert root == dest / "UCMerced_LandUse" / "Images"
    ds = scan_folder(root, "ucmerced")
    assert ds.classes == ["agricultural", "airplane"] and len(ds) == 4
    assert (dest / "UCMerced_LandUse.zip").is_file()
    assert not list(dest.glob("*.part"))
    # A second call reuses the checked archive and the finished extraction.
    moved = ucm_zip.with_name("moved.zip")
    ucm_zip.rename(moved)
    try:
        assert download_dataset(spec, dest) == root
    finally:
        moved.rename(ucm_zip)


def test_download_over_http_with_sha256(ucm_zip: Path, http_server: str, tmp_path: Path) -> None:
    spec = _spec(f"{http_server}/UCMerced_LandUse.zip", ucm_zip, "sha256")
    archive = download_dataset(spec, tmp_path, extract=False)
    assert archive == tmp_path / "UCMerced_LandUse.zip"
    assert file_checksum(archive, "sha256") == spec.checksum_value
    assert not (tmp_path / "UCMerced_LandUse").exists()


def test_mirror_used_when_first_url_fails(ucm_zip: Path, http_server: str, tmp_path: Path) -> None:
    spec = dataclasses.replace(
        _spec(f"{http_server}/missing.zip", ucm_zip),
        mirrors=(f"{http_server}/UCMerced_LandUse.zip",),
    )
    assert download_dataset(spec, tmp_path).is_dir()


def test_checksum_mismatch(ucm_zip: Path, tmp_path: Path) -> None:
    spec = dataclasses.replace(_spec(ucm_zip.as_uri(), ucm_zip), checksum="md5:" + "0" * 32)
    with pytest.raises(DatasetError) as info:
        download_dataset(spec, tmp_path)
    msg = str(info.value)
    assert "checksum mismatch" in msg and "0" * 32 in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())  # neither the archive nor the .part is kept


def test_unreachable_host_gives_one_line(ucm_zip: Path, tmp_path: Path) -> None:
    port = _closed_port()
    spec = _spec(f"http://127.0.0.1:{port}/UCMerced_LandUse.zip", ucm_zip)
    with pytest.raises(LandlensError) as info:
        download_dataset(spec, tmp_path, timeout=5)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"no network access to 127.0.0.1:{port}")
    assert "landlens data verify /path/to/UCMerced_LandUse --dataset ucmerced" in msg
    assert not isinstance(info.value, DatasetError)
    assert not list(tmp_path.glob("*.part"))


def test_http_error(ucm_zip: Path, http_server: str, tmp_path: Path) -> None:
    spec = _spec(f"{http_server}/nothing-here.zip", ucm_zip)
    with pytest.raises(LandlensError, match="HTTP 404"):
        download_dataset(spec, tmp_path)


def test_no_direct_download(tmp_path: Path) -> None:
    with pytest.raises(LandlensError) as info:
        download_dataset("aid", tmp_path)
    msg = str(info.value)
    assert "https://captain-whu.github.io/AID/" in msg and "--dataset aid" in msg
    result = CliRunner().invoke(data, ["download", "whu-rs19", "--dest", str(tmp_path)])
    assert result.exit_code != 0 and isinstance(result.exception, LandlensError)


def test_extract_tar_and_refuse_rar(tmp_path: Path) -> None:
    make_dataset(tmp_path / "src", "rsscn7", per_class=1, classes=2, size=8)
    tgz = tmp_path / "RSSCN7.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tmp_path / "src" / "RSSCN7", arcname="RSSCN7")
    extract_archive(tgz, tmp_path / "out")
    assert scan_folder(tmp_path / "out" / "RSSCN7").classes == ["aGrass", "bField"]
    rar = tmp_path / "NWPU-RESISC45.rar"
    rar.write_bytes(b"Rar!\x1a\x07\x00" + b"\x00" * 32)
    with pytest.raises(LandlensError, match="RAR archives are not supported"):
        extract_archive(rar, tmp_path / "out")


def test_extract_refuses_unsafe_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DatasetError, match="unsafe path"):
        extract_archive(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_progress_bar_names_the_archive_and_pooch_stays_quiet(
    ucm_zip: Path, http_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(f"{http_server}/UCMerced_LandUse.zip", ucm_zip)
    download_dataset(spec, tmp_path, extract=False, progress=True)
    err = capsys.readouterr().err
    assert "UCMerced_LandUse.zip" in err and "100%" in err
    assert "Downloading data from" not in err and "SHA256 hash" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UCMerced_LandUse.zip"]  # no temporary file left


def test_archive_with_wrong_checksum_is_downloaded_again(ucm_zip: Path, http_server: str, tmp_path: Path) -> None:
    spec = _spec(f"{http_server}/UCMerced_LandUse.zip", ucm_zip, "sha256")
    (tmp_path / "UCMerced_LandUse.zip").write_bytes(b"truncated")
    archive = download_dataset(spec, tmp_path, extract=False)
    assert archive.read_bytes() == ucm_zip.read_bytes()


def test_silent_server_times_out_in_one_line(ucm_zip: Path, tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        spec = _spec(f"http://127.0.0.1:{port}/UCMerced_LandUse.zip", ucm_zip)
        with pytest.raises(LandlensError) as info:
            download_dataset(spec, tmp_path, timeout=0.5)
    msg = str(info.value)
    assert msg.startswith(f"no network access to 127.0.0.1:{port} (timed out after 0.5 s)") and "\n" not in msg
    assert not list(tmp_path.iterdir())


def test_unsupported_url_scheme(ucm_zip: Path, tmp_path: Path) -> None:
    spec = _spec("s3://bucket/UCMerced_LandUse.zip", ucm_zip)
    with pytest.raises(LandlensError, match="landlens downloads http, https, ftp and file URLs"):
        download_dataset(spec, tmp_path)
