"""Bounded image decodes: thumbnails at fixed sizes from one shared decode per image, at most
``thumbnail_decodes`` at a time, and a byte budget that concurrent decodes wait for (an upload
that alone needs more is 413)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from landlens.service.budget import WeightedSemaphore, decode_cost, jpeg_draft_scale


def _run_concurrently(app: Any, requests: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    """Send all ``(method, url, kwargs)`` at once to ``app`` (one event loop, in process)."""
    import httpx

    async def main() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await asyncio.gather(*(client.request(m, u, **kw) for m, u, kw in requests))

    return asyncio.run(main())


class _Probe:
    """Wraps a blocking function: counts calls and the most calls running at once (each call
    sleeps ``delay`` seconds first, so that concurrent requests overlap)."""

    def __init__(self, fn: Callable[..., Any], delay: float = 0.25) -> None:
        self.fn, self.delay = fn, delay
        self.calls = self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def _build_archive(root: Path, per_class: int = 3) -> Path:
    """An ``lbp_rgb`` archive of 2 classes x ``per_class`` PNGs of 600 x 400 px under ``root``."""
    from landlens.retrieval.archive import Archive

    rng = np.random.default_rng(0)
    for cls in ("fields", "forest"):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(root / "data" / cls / f"{i}.png")
    Archive.build(root / "data", root / "archive", backbone="lbp_rgb", rerank=None, progress=False)
    return root / "archive"


@pytest.fixture(scope="module")
def big_archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``lbp_rgb`` archive of 2 classes x 3 PNGs of 600 x 400 px."""
    return _build_archive(tmp_path_factory.mktemp("thumbs"))


@pytest.fixture
def app_factory() -> Iterator[Callable[..., Any]]:
    """``app_factory(archive, **create_app_kwargs)``: an app used without a server (closed after)."""
    from landlens.service.app import create_app

    apps: list[Any] = []

    def make(archive: Any, **kwargs: Any) -> Any:
        app = create_app(archive, optimize="none", **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.state.service.close()


def _png_bytes(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- thumbnails


def test_thumbnail_sizes_snap_to_fixed_sizes(make_client: Any, big_archive_dir: Path) -> None:
    client = make_client(big_archive_dir, optimize="none")
    sha = client.get("/api/images/0").json()["sha256"]
    served: dict[int, bytes] = {}
    for requested, size, side in [(32, 128, 128), (100, 128, 128), (128, 128, 128), (129, 256, 256),
                                  (256, 256, 256), (300, 512, 512), (512, 512, 512)]:
        r = client.get("/api/images/0/thumbnail", params={"size": requested})
        assert r.status_code == 200
        assert r.headers["etag"] == f'"{sha}-{size}"'
        assert Image.open(io.BytesIO(r.content)).size == (side, round(side * 2 / 3))
        assert served.setdefault(size, r.content) == r.content  # one rendering per fixed size
    assert client.get("/api/images/0/thumbnail").headers["etag"] == f'"{sha}-256"'  # the default
    service = client.app.state.service
    assert service.thumbnails.decoded == 1  # every size came from one decode
    assert client.get("/api/images/0/thumbnail", params={"size": 31}).status_code == 422
    assert client.get("/api/images/0/thumbnail", params={"size": 513}).status_code == 422


def test_concurrent_thumbnails_of_one_image_share_one_decode(app_factory: Any, big_archive_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import landlens.data.io

    probe = _Probe(landlens.data.io.load_rgb)
    monkeypatch.setattr(landlens.data.io, "load_rgb", probe)
    app = app_factory(big_archive_dir)
    sizes = [32, 64, 100, 128, 200, 256, 384, 512]
    responses = _run_concurrently(app, [("GET", f"/api/images/1/thumbnail?size={s}", {}) for s in sizes])
    assert [r.status_code for r in responses] == [200] * len(sizes)
    assert probe.calls == 1
    assert {max(Image.open(io.BytesIO(r.content)).size) for r in responses} == {128, 256, 512}
    # all cached now: no decode, and the master is kept for the other sizes
    again = _run_concurrently(app, [("GET", f"/api/images/1/thumbnail?size={s}", {}) for s in sizes])
    assert [r.content for r in again] == [r.content for r in responses]
    assert probe.calls == 1


def test_thumbnail_decodes_are_bounded(app_factory: Any, big_archive_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import landlens.data.io

    probe = _Probe(landlens.data.io.load_rgb)
    monkeypatch.setattr(landlens.data.io, "load_rgb", probe)
    app = app_factory(big_archive_dir, thumbnail_decodes=2)
    responses = _run_concurrently(app, [("GET", f"/api/images/{i}/thumbnail", {}) for i in range(6)])
    assert [r.status_code for r in responses] == [200] * 6
    assert probe.calls == 6
    assert probe.most == 2


def test_thumbnail_of_an_unreadable_file_is_404(app_factory: Any, tmp_path: Path) -> None:
    app = app_factory(_build_archive(tmp_path, per_class=1))
    Path(app.state.service.archive.record(1).path).write_bytes(b"not an image")
    responses = _run_concurrently(app, [("GET", "/api/images/1/thumbnail", {})] * 3)
    assert [r.status_code for r in responses] == [404] * 3
    assert responses[0].json()["detail"] == "image 1: its file cannot be read on the server"
    assert app.state.service.budget.in_use == 0


# ---------------------------------------------------------------------------- the decode budget


def test_decode_cost_from_the_header() -> None:
    assert decode_cost(7000, 7000) == 7000 * 7000 * 8  # RGB samples + the RGB image, 4 bytes a pixel in Pillow
    assert decode_cost(100, 100, 1) == 100 * 100 * (1 + 4)
    assert decode_cost(100, 100, 4, "uint16") == 100 * 100 * (8 + 4 + 12)
    assert jpeg_draft_scale(4000, 3000, (256, 256)) == 8
    assert jpeg_draft_scale(1000, 600, (256, 256)) == 2
    assert jpeg_draft_scale(300, 300, (256, 256)) == 1
    assert decode_cost(4000, 3000, fmt="JPEG", draft=(256, 256)) == 500 * 375 * 8
    assert decode_cost(4000, 3000, fmt="PNG", draft=(256, 256)) == 4000 * 3000 * 8


def test_weighted_semaphore_is_first_come_first_served() -> None:
    async def main() -> list[str]:
        sem = WeightedSemaphore(10)
        order: list[str] = []

        async def job(name: str, weight: int, hold: float) -> None:
            async with sem.hold(weight):
                order.append(name)
                await asyncio.sleep(hold)

        first = asyncio.ensure_future(job("a", 6, 0.05))
        await asyncio.sleep(0)
        big = asyncio.ensure_future(job("big", 10, 0.0))  # must wait for a
        await asyncio.sleep(0)
        small = asyncio.ensure_future(job("small", 1, 0.0))  # fits now, but queues behind big
        await asyncio.gather(first, big, small)
        assert sem.in_use == 0 and sem.peak == 10
        return order

    assert asyncio.run(main()) == ["a", "big", "small"]


def test_weighted_semaphore_cancelled_waiter_lets_others_in() -> None:
    async def main() -> None:
        sem = WeightedSemaphore(4)
        await sem.acquire(3)
        big = asyncio.ensure_future(sem.acquire(4))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(sem.acquire(1))
        await asyncio.sleep(0)
        assert not small.done()  # behind big
        big.cancel()
        await asyncio.sleep(0)
        await asyncio.wait_for(small, 1)
        assert sem.in_use == 4 and sem.waiting == 0
        sem.release(1)
        sem.release(3)
        assert sem.in_use == 0
        with pytest.raises(ValueError):
            await sem.acquire(5)

    asyncio.run(main())


def test_concurrent_uploads_wait_for_the_decode_budget(app_factory: Any, service_archive_dir: Path) -> None:
    png = _png_bytes(64, 1)
    budget = 2 * decode_cost(64, 64)  # two 64 px uploads at a time
    app = app_factory(service_archive_dir, decode_budget_bytes=budget)
    service = app.state.service
    probe = _Probe(service.decode)
    service.decode = probe
    files = [("POST", "/api/search", {"files": {"file": (f"q{i}.png", png, "image/png")}, "data": {"k": "2"}})
             for i in range(6)]
    responses = _run_concurrently(app, files)
    assert [r.status_code for r in responses] == [200] * 6, responses[0].text
    assert probe.calls == 6 and probe.most == 2
    assert service.budget.peak == budget and service.budget.in_use == 0
    assert all("wait" in r.json()["timing_ms"] for r in responses)


def test_upload_larger_than_the_decode_budget_is_413(make_client: Any, writable_archive_dir: Path,
                                                     classifier_run: Path, service_setup: dict[str, Any]) -> None:
    token = service_setup["token"]
    budget = decode_cost(64, 64) - 1
    client = make_client(writable_archive_dir, classifier_run=classifier_run, token=token, optimize="none",
                         decode_budget_bytes=budget)
    png = _png_bytes(64, 2)
    before = client.get("/api/health").json()["images"]
    for path, extra in [("/api/search", {}), ("/api/classify", {}),
                        ("/api/images", {"headers": {"Authorization": f"Bearer {token}"}})]:
        r = client.post(path, files={"file": ("big.png", png, "image/png")}, **extra)
        assert r.status_code == 413, (path, r.text)
        detail = r.json()["detail"]
        assert "\n" not in detail and "64x64" in detail and "decode budget" in detail, detail
    assert client.get("/api/health").json()["images"] == before
    assert client.app.state.service.budget.in_use == 0
    # a smaller image still fits
    r = client.post("/api/search", files={"file": ("small.png", _png_bytes(32, 3), "image/png")})
    assert r.status_code == 200
