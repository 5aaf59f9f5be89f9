"""Security rules of the search service, one test per rule (see issue #6)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _png(side: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class CountingStream:
    """A stream of ``size`` bytes that records how many bytes were asked for and returned."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.requested = 0
        self.calls = 0

    def read(self, n: int = -1) -> bytes:
        self.calls += 1
        if n is None or n < 0:
            n = self.size - self.pos
        self.requested += n
        n = min(n, self.size - self.pos)
        self.pos += n
        return b"\xab" * n


# ------------------------------------------------------------------------------ byte limit


def test_copy_limited_reads_at_most_limit_plus_one_byte() -> None:
    from landlens.service.uploads import UploadError, copy_limited

    limit = 100_000
    stream = CountingStream(10_000_000)
    sink = io.BytesIO()
    with pytest.raises(UploadError) as err:
        copy_limited(stream, sink, limit, chunk_size=4096)
    assert err.value.status == 413
    assert stream.pos == limit + 1 and stream.requested <= limit + 1
    # within the limit: everything is copied, with the right digest
    import hashlib

    stream = CountingStream(limit)
    sink = io.BytesIO()
    n, sha = copy_limited(stream, sink, limit, chunk_size=4096)
    assert n == limit and sink.getvalue() == b"\xab" * limit
    assert sha == hashlib.sha256(b"\xab" * limit).hexdigest()


def test_upload_over_the_byte_limit_is_413(make_client: Any, service_archive_dir: Path) -> None:
    limit = 20_000
    client = make_client(service_archive_dir, max_upload_bytes=limit)
    big = _png(side=128)  # ~49 KB of noise: over the limit, within the multipart allowance
    assert limit < len(big) < limit + 64 * 1024
    r = client.post("/api/search", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    # far over the limit: the body itself is cut off (Content-Length checked before reading)
    huge = _png(side=400)
    assert len(huge) > limit + 64 * 1024
    r = client.post("/api/search", files={"file": ("huge.png", huge, "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post("/api/classify", files={"file": ("huge.png", huge, "image/png")})
    assert r.status_code == 413
    # a small upload still works
    r = client.post("/api/search", files={"file": ("ok.png", _png(side=48), "image/png")}, data={"k": "2"})
    assert r.status_code == 200


# ------------------------------------------------------------------------------ pixel limit


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` zeros (small file, huge image)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_is_413_before_decoding(make_client: Any, service_archive_dir: Path) -> None:
    client = make_client(service_archive_dir, raise_server_exceptions=False)
    service = client.app.state.service

    def must_not_decode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a bomb reached the decoder")

    service.archive.load_query = must_not_decode  # the app's own archive object
    bomb = _bomb_png(20_000)  # 400 megapixels in about 50 KB
    assert len(bomb) < 100_000
    r = client.post("/api/search", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "20000x20000" in r.json()["detail"], r.text
    # a lower pixel limit also applies to ordinary images
    client2 = make_client(service_archive_dir, max_pixels=50 * 50)
    r = client2.post("/api/search", files={"file": ("x.png", _png(side=64), "image/png")})
    assert r.status_code == 413 and "64x64" in r.json()["detail"]


# ------------------------------------------------------------------------------ content sniffing


def test_text_named_jpg_is_415(make_client: Any, service_archive_dir: Path) -> None:
    client = make_client(service_archive_dir)
    text = b"These are field notes, not an image.\n" * 10
    r = client.post("/api/search", files={"file": ("x.jpg", text, "image/jpeg")})
    assert r.status_code == 415 and isinstance(r.json()["detail"], str)
    # a JPEG header followed by garbage is sniffed as JPEG but cannot be decoded: 415 too
    r = client.post("/api/search", files={"file": ("y.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 200, "image/jpeg")})
    assert r.status_code == 415
    # an SVG (scripts!) named png is refused
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    r = client.post("/api/search", files={"file": ("z.png", svg, "image/png")})
    assert r.status_code == 415


def test_png_named_txt_is_accepted(make_client: Any, service_archive_dir: Path) -> None:
    client = make_client(service_archive_dir)
    r = client.post("/api/search", files={"file": ("evil.txt", _png(side=64), "text/plain")}, data={"k": "2"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert r.json()["query"]["name"] == "evil.txt"


def test_sniff_format_by_magic_bytes() -> None:
    from landlens.service.uploads import sniff_format

    assert sniff_format(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\n\x00") == "PNG"
    assert sniff_format(b"II*\x00\x08\x00") == "TIFF" and sniff_format(b"MM\x00*") == "TIFF"
    assert sniff_format(b"GIF89a\x01\x00") == "GIF" and sniff_format(b"BM\x00\x00") == "BMP"
    assert sniff_format(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(b"<?xml version") is None and sniff_format(b"") is None


# ------------------------------------------------------------------------------ thumbnails


@pytest.mark.parametrize("image_id", ["..%2f..%2fetc%2fpasswd", "..%2F..%2F..%2Fetc%2Fpasswd", "-1", "1e3",
                                      "0x1", "%2e%2e", "1.0", "99999999999999999999999"])
def test_thumbnail_ids_never_name_a_file(read_client: Any, image_id: str) -> None:
    r = read_client.get(f"/api/images/{image_id}/thumbnail")
    assert r.status_code in (404, 422), (image_id, r.status_code)
    assert r.headers["content-type"].startswith("application/json")
    assert "root:" not in r.text


def test_static_route_serves_only_its_folder(read_client: Any) -> None:
    for name in ("..%2fapp.py", "..%2F..%2Fpyproject.toml", "%2e%2e%2fuploads.py", ".hidden"):
        r = read_client.get(f"/static/{name}")
        assert r.status_code == 404, name
        assert "create_app" not in r.text


# ------------------------------------------------------------------------------ tokens


def test_writes_without_token_are_401(make_client: Any, writable_archive_dir: Path) -> None:
    client = make_client(writable_archive_dir, token="right-token")
    png = _png(side=48, seed=3)
    r = client.post("/api/images", files={"file": ("a.png", png, "image/png")})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.delete("/api/images/0")
    assert r.status_code == 401
    assert client.get("/api/health").json()["images"] == 12


def test_writes_with_wrong_token_are_401(make_client: Any, writable_archive_dir: Path) -> None:
    client = make_client(writable_archive_dir, token="right-token")
    png = _png(side=48, seed=4)
    for header in ("Bearer wrong-token", "Bearer right-token-but-longer", "Basic right-token", "right-token",
                   "Bearer "):
        r = client.post("/api/images", files={"file": ("a.png", png, "image/png")},
                        headers={"Authorization": header})
        assert r.status_code == 401, header
        assert client.delete("/api/images/0", headers={"Authorization": header}).status_code == 401
    assert client.get("/api/health").json()["images"] == 12
    assert not (writable_archive_dir / "uploads").exists() or not any((writable_archive_dir / "uploads").iterdir())
    # the token is checked before the body is read: an oversized unauthenticated upload is 401, not 413
    huge = b"\x89PNG\r\n\x1a\n" + b"\x00" * (21 * 1024 * 1024)
    r = client.post("/api/images", files={"file": ("a.png", huge, "image/png")},
                    headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # and the right token works
    r = client.post("/api/images", files={"file": ("a.png", png, "image/png")},
                    headers={"Authorization": "Bearer right-token"})
    assert r.status_code == 201


def test_server_without_token_refuses_writes_403(make_client: Any, writable_archive_dir: Path) -> None:
    client = make_client(writable_archive_dir)
    png = _png(side=48, seed=5)
    for headers in ({}, {"Authorization": "Bearer anything"}):
        r = client.post("/api/images", files={"file": ("a.png", png, "image/png")}, headers=headers)
        assert r.status_code == 403 and r.json()["detail"] == "writes are disabled: start the server with a token"
        assert client.delete("/api/images/0", headers=headers).status_code == 403
    assert client.get("/api/health").json()["writable"] is False
    assert client.get("/api/images/0").status_code == 200


def test_check_token_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from landlens.service import auth as app_module

    seen: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return original(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    assert app_module.check_token("s3cret", "Bearer s3cret") is None
    assert app_module.check_token("s3cret", "Bearer s3cre") == (401, "invalid token")
    assert seen == [(b"s3cret", b"s3cret"), (b"s3cre", b"s3cret")]
    assert app_module.check_token(None, "Bearer s3cret")[0] == 403
    assert app_module.check_token("s3cret", None)[0] == 401


# ------------------------------------------------------------------------------ uploads on disk


def test_upload_is_stored_by_content_hash_only(make_client: Any, writable_archive_dir: Path, tmp_path: Path) -> None:
    import hashlib

    client = make_client(writable_archive_dir, token="t0k")
    png = _png(side=40, seed=9)
    evil = "../../../../" + str(tmp_path / "pwned.png")
    r = client.post("/api/images", files={"file": (evil, png, "image/png")},
                    headers={"Authorization": "Bearer t0k"})
    assert r.status_code == 201, r.text
    sha = hashlib.sha256(png).hexdigest()
    assert [p.name for p in (writable_archive_dir / "uploads").iterdir()] == [f"{sha}.png"]
    assert not (tmp_path / "pwned.png").exists()


# ------------------------------------------------------------------------------ errors


def test_internal_errors_hide_the_traceback(make_client: Any, service_archive_dir: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(service_archive_dir, raise_server_exceptions=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail /srv/private/path")

    client.app.state.service.archive.search_id = broken
    with caplog.at_level("ERROR", logger="landlens.service"):
        r = client.get("/api/search/1")
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    assert "secret" not in r.text and "Traceback" not in r.text
    assert "secret detail" in caplog.text  # logged for the operator


def test_decode_errors_do_not_leak_server_paths(make_client: Any, service_archive_dir: Path) -> None:
    import tempfile

    client = make_client(service_archive_dir)
    good = _png(side=64)
    truncated = good[: len(good) // 2]
    r = client.post("/api/search", files={"file": ("t.png", truncated, "image/png")})
    assert r.status_code == 415
    assert tempfile.gettempdir() not in r.text and "landlens-upload" not in r.text
    assert str(service_archive_dir) not in r.text


# ------------------------------------------------------------------------------ binding and CORS


def test_serve_binds_localhost_by_default(service_archive_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    from click.testing import CliRunner

    from landlens.cli import serve as serve_module

    runner = CliRunner()
    help_text = runner.invoke(serve_module.serve_cmd, ["--help"]).output
    assert "--host" in help_text and "127.0.0.1" in help_text

    config = serve_module.serve_config(object())
    assert config.host == "127.0.0.1" and config.port == 8000

    captured: list[Any] = []
    monkeypatch.setattr(serve_module, "run_server", captured.append)
    monkeypatch.delenv("LANDLENS_TOKEN", raising=False)
    result = runner.invoke(serve_module.serve_cmd, [str(service_archive_dir)])
    assert result.exit_code == 0, result.output
    assert len(captured) == 1 and captured[0].host == "127.0.0.1" and captured[0].port == 8000
    assert "http://127.0.0.1:8000/" in result.output
    assert captured[0].app.state.service.token is None

    # a token file is read and stripped; an empty one is a one-line error
    tok = tmp_path / "token"
    tok.write_text("  abc123\n")
    result = runner.invoke(serve_module.serve_cmd, [str(service_archive_dir), "--token-file", str(tok),
                                                    "--host", "0.0.0.0", "--port", "9001"])
    assert result.exit_code == 0, result.output
    assert captured[-1].host == "0.0.0.0" and captured[-1].port == 9001
    assert captured[-1].app.state.service.token == "abc123"
    tok.write_text("\n")
    result = runner.invoke(serve_module.serve_cmd, [str(service_archive_dir), "--token-file", str(tok)])
    assert result.exit_code == 2 and "empty" in result.output
    # LANDLENS_TOKEN works too
    monkeypatch.setenv("LANDLENS_TOKEN", "from-env")
    result = runner.invoke(serve_module.serve_cmd, [str(service_archive_dir)])
    assert captured[-1].app.state.service.token == "from-env"
    # a missing archive is a one-line error, exit 2
    result = runner.invoke(serve_module.serve_cmd, [str(tmp_path / "nope")])
    assert result.exit_code == 2 and "landlens: error:" in result.output


def test_no_cors_headers_by_default(read_client: Any) -> None:
    r = read_client.get("/api/health", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    r = read_client.options("/api/search", headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_headers_only_for_the_given_origins(make_client: Any, service_archive_dir: Path) -> None:
    client = make_client(service_archive_dir, cors_origins=["https://maps.example.org"])
    r = client.get("/api/health", headers={"Origin": "https://maps.example.org"})
    assert r.headers["access-control-allow-origin"] == "https://maps.example.org"
    r = client.options("/api/search", headers={"Origin": "https://maps.example.org",
                                               "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://maps.example.org"
    r = client.get("/api/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ------------------------------------------------------------------------------ TIFF bombs


def _tiff(shape: tuple[int, ...], **kwargs: Any) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros(shape, np.uint8), photometric="minisblack", compression="zlib", **kwargs)
    return buf.getvalue()


def test_many_sample_and_multi_page_tiffs(make_client: Any, service_archive_dir: Path) -> None:
    """Issue #17.1 through the service: bands count against --max-pixels before decoding, and a
    stack of pages is read as its first page only."""
    client = make_client(service_archive_dir, max_pixels=1_000_000)
    samples = _tiff((100, 500, 500), planarconfig="separate")  # 250,000 pixels x 100 bands
    r = client.post("/api/search", files={"file": ("s.tif", samples, "image/tiff")}, data={"k": "2"})
    assert r.status_code == 413 and "500x500 pixels x 100 bands" in r.json()["detail"], r.text
    pages = _tiff((64, 500, 500))  # 64 pages: only the first is decoded
    r = client.post("/api/search", files={"file": ("p.tif", pages, "image/tiff")}, data={"k": "2"})
    assert r.status_code == 200, r.text
    assert (r.json()["query"]["width"], r.json()["query"]["height"]) == (500, 500)
