"""HTTP hardening of the service: accepted Host names (DNS rebinding), security headers and
the page's Content-Security-Policy, request body timeouts (on a real uvicorn over loopback),
and API docs served without a CDN."""

from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from landlens.service.routes.page import STATIC_DIR

# ---------------------------------------------------------------------------- Host header


def test_only_local_host_names_are_accepted_by_default(read_client: Any) -> None:
    for host in ("localhost", "127.0.0.1", "127.0.0.1:8000", "localhost:8000", "[::1]", "[::1]:8000"):
        r = read_client.get("/api/health", headers={"Host": host})
        assert r.status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2", "", "a b"):
        r = read_client.get("/api/health", headers={"Host": host})
        assert r.status_code == 400, host
        assert r.headers["x-frame-options"] == "DENY"  # the refusal carries the security headers too
    # the page and writes are refused as well: a rebound name reaches nothing
    assert read_client.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_allowed_hosts_widen_or_open(make_client: Any, service_archive_dir: Path) -> None:
    from landlens.errors import LandlensError
    from landlens.service.app import create_app

    client = make_client(service_archive_dir, optimize="none", allowed_hosts=["localhost", "scenes.lab", "*.corp.org"])
    for host, status in [("scenes.lab", 200), ("SCENES.LAB:8000", 200), ("a.corp.org", 200), ("corp.org.evil", 400),
                         ("127.0.0.1", 400)]:
        assert client.get("/api/health", headers={"Host": host}).status_code == status, host
    anyhost = make_client(service_archive_dir, optimize="none", allowed_hosts=["*"])
    assert anyhost.get("/api/health", headers={"Host": "whatever.example"}).status_code == 200
    for bad in (["ev*il.org"], ["*evil.org"], [""]):
        with pytest.raises(LandlensError, match="allowed host"):
            create_app(service_archive_dir, optimize="none", allowed_hosts=bad)


def test_serve_accepts_its_host_and_allowed_hosts(service_archive_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from landlens.cli import serve as serve_module

    assert serve_module.host_names("127.0.0.1") == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert serve_module.host_names("10.0.0.5", ["Scenes.Lab"]) == ["localhost", "127.0.0.1", "::1", "[::1]",
                                                                    "10.0.0.5", "scenes.lab"]
    assert serve_module.host_names("0.0.0.0") == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert serve_module.host_names("fe80::1")[-1] == "[fe80::1]"

    captured: list[Any] = []
    monkeypatch.setattr(serve_module, "run_server", captured.append)
    monkeypatch.delenv("LANDLENS_TOKEN", raising=False)
    runner = CliRunner()
    result = runner.invoke(serve_module.serve_cmd, [str(service_archive_dir), "--host", "0.0.0.0", "--optimize",
                                                    "none", "--allowed-host", "scenes.lab", "--read-timeout", "3",
                                                    "--body-timeout", "0"])
    assert result.exit_code == 0, result.output
    assert "scenes.lab" in result.output
    with TestClient(captured[-1].app, base_url="http://scenes.lab") as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"Host": "other.lab"}).status_code == 400
    result = runner.invoke(serve_module.serve_cmd, [str(service_archive_dir), "--optimize", "none",
                                                    "--allowed-host", "*"])
    assert result.exit_code == 0 and "Host names accepted: any" in result.output
    with TestClient(captured[-1].app, base_url="http://anything.example") as client:
        assert client.get("/api/health").status_code == 200
    assert "--allowed-host" in runner.invoke(serve_module.serve_cmd, ["--help"]).output


# ---------------------------------------------------------------------------- security headers


def test_security_headers_on_every_answer(read_client: Any) -> None:
    for path, status in [("/", 200), ("/static/app.js", 200), ("/api/health", 200), ("/api/images/999", 404),
                         ("/api/images/0/thumbnail", 200), ("/nope", 404)]:
        r = read_client.get(path)
        assert r.status_code == status, path
        h = r.headers
        assert h["x-content-type-options"] == "nosniff", path
        assert h["x-frame-options"] == "DENY", path
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
    r = read_client.post("/api/search", files={"file": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and r.headers["x-frame-options"] == "DENY"


def test_page_has_no_inline_code() -> None:
    """What ``script-src 'self'; style-src 'self'`` forbids: inline scripts, styles, handlers."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    for tag in re.findall(r"<script\b[^>]*>", html, re.I):
        assert re.search(r"\bsrc=", tag), tag
    assert not re.search(r"<script\b[^>]*>\s*[^\s<]", html, re.I)  # no code between <script ...> and </script>
    assert not re.search(r"<style\b", html, re.I)
    assert not re.search(r"\sstyle\s*=", html, re.I)
    assert not re.search(r"\son[a-z]+\s*=", html, re.I)
    assert not re.search(r"""(href|src)\s*=\s*["']\s*javascript:""", html, re.I)
    js = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    assert not re.search(r"\b(eval|Function)\s*\(|\.innerHTML\s*=|setAttribute\(\s*[\"'](style|on)", js)


# ---------------------------------------------------------------------------- API docs


def test_docs_use_only_files_of_this_server(read_client: Any) -> None:
    r = read_client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", r.text)  # the OpenAPI document Swagger UI loads
    assert len(urls) >= 4, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        got = read_client.get(url)
        assert got.status_code == 200, url
        assert got.content
    assert "cdn" not in r.text.lower()
    assert read_client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert read_client.get("/docs/assets/swagger-ui-bundle.js.map").status_code == 404  # only what the page needs
    assert read_client.get("/docs/assets/..%2Fapp.py").status_code == 404
    assert read_client.get("/redoc").status_code == 404  # it needed a CDN: gone


def test_docs_policy_allows_only_its_own_inline_script(read_client: Any) -> None:
    import base64
    import hashlib

    r = read_client.get("/docs")
    csp = r.headers["content-security-policy"]
    assert csp != read_client.get("/").headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    script_src = re.search(r"script-src ([^;]*)", csp).group(1)
    assert script_src.split() == ["'self'", f"'sha256-{digest}'", script_src.split()[2]]  # + the oauth2 page's
    assert read_client.get("/docs/oauth2-redirect").status_code == 200


# ---------------------------------------------------------------------------- body timeouts


@contextlib.contextmanager
def _live(app: Any) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _trickle(port: int, head: bytes, chunks: list[bytes], pause: float, limit: float) -> tuple[bytes, float]:
    """Send ``head``, then each chunk ``pause`` seconds apart while the server lets us; return
    what the server answered (until it closed) and the seconds until the answer began."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(head)
        s.setblocking(False)
        answer = b""
        first = None
        for chunk in chunks:
            end = time.monotonic() + pause
            while time.monotonic() < end:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                if not data:
                    return answer, first if first is not None else time.monotonic() - t0
                answer += data
                first = first if first is not None else time.monotonic() - t0
            if time.monotonic() - t0 > limit:
                break
            try:
                s.sendall(chunk)
            except OSError:  # the server closed the connection
                break
        s.settimeout(max(0.1, limit - (time.monotonic() - t0)))
        try:
            while data := s.recv(65536):
                answer += data
                first = first if first is not None else time.monotonic() - t0
        except (TimeoutError, OSError):
            pass
    return answer, first if first is not None else time.monotonic() - t0


def _upload_head(length: int, path: str = "/api/search") -> bytes:
    """Request headers of a ``length``-byte multipart upload and the start of its file part."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {length}\r\n\r\n"
            "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()


@pytest.fixture(scope="module")
def timed_server(service_archive_dir: Path) -> Iterator[int]:
    """A real server with short body timeouts: 0.5 s between chunks, 2 s for a whole body."""
    from landlens.service.app import create_app

    with _live(create_app(service_archive_dir, optimize="none", read_timeout=0.5, body_timeout=2.0)) as port:
        yield port


def test_trickled_body_is_cut_off_at_the_body_deadline(timed_server: int) -> None:
    # 1 byte every 0.3 s: never a pause past the read timeout, but the body never completes
    answer, seconds = _trickle(timed_server, _upload_head(1000), [b"x"] * 40, pause=0.3, limit=8.0)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"not complete within 2 s" in answer
    assert b"connection: close" in answer.lower()
    assert 1.8 <= seconds <= 4.0, seconds


def test_stalled_body_is_cut_off_at_the_read_timeout(timed_server: int) -> None:
    answer, seconds = _trickle(timed_server, _upload_head(1000), [b"x"], pause=5.0, limit=8.0)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"no data for 0.5 s" in answer
    assert 0.4 <= seconds <= 2.0, seconds


def test_timeouts_leave_normal_requests_alone(timed_server: int) -> None:
    import http.client

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 60)).save(buf, "PNG")
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + buf.getvalue() + b"\r\n--b--\r\n")
    conn = http.client.HTTPConnection("127.0.0.1", timed_server, timeout=30)
    conn.request("POST", "/api/search", body=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    r.read()
    time.sleep(2.5)  # past the body deadline of that request: the keep-alive connection still works
    conn.request("GET", "/api/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_body_timeouts_can_be_turned_off(service_archive_dir: Path) -> None:
    from landlens.service.app import create_app

    with _live(create_app(service_archive_dir, optimize="none", read_timeout=None, body_timeout=0)) as port:
        answer, _ = _trickle(port, _upload_head(1000), [b"x"] * 4, pause=0.7, limit=2.5)
    assert answer == b""  # still waiting for the rest of the body
