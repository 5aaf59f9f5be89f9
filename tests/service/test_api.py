"""The search service API (landlens.service.app) against direct Archive / Predictor calls."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _upload(path: Path, name: str | None = None, content_type: str = "image/png") -> dict[str, Any]:
    return {"file": (name or path.name, path.read_bytes(), content_type)}


def _ids(results: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in results]


# ---------------------------------------------------------------------------- read endpoints


def test_health_reports_the_loaded_archive(read_client: Any, service_archive: Any) -> None:
    r = read_client.get("/api/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "images": len(service_archive), "backbone": "lbp_rgb",
                        "classifier": True, "generation": service_archive.generation, "writable": False, "rerank": None, "forward": "jit",
                        "text": False}


def test_classes_match_the_fixture(read_client: Any, service_setup: dict[str, Any], classifier_run: Path) -> None:
    r = read_client.get("/api/classes")
    assert r.status_code == 200
    body = r.json()
    expected = [{"name": c, "count": service_setup["per_class"]} for c in sorted(service_setup["classes"])]
    assert body["classes"] == expected
    assert body["classifier_classes"] == ["forest", "harbor", "river", "desert"]


def test_search_by_upload_equals_direct_archive_search(read_client: Any, service_archive: Any,
                                                       query_png: Path) -> None:
    k = 5
    r = read_client.post("/api/search", files=_upload(query_png), data={"k": str(k)})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = service_archive.search_vectors(service_archive.embed([service_archive.load_query(query_png)]), k)[0]
    assert len(body["results"]) == k
    assert _ids(body["results"]) == [h.record.id for h in ref]
    assert [r["rank"] for r in body["results"]] == list(range(1, k + 1))
    np.testing.assert_allclose([r["distance"] for r in body["results"]], [h.distance for h in ref], atol=1e-5)
    np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in ref], atol=1e-5)
    # the query is an image of the first class: the nearest images are of that class
    assert body["results"][0]["class"] == "agricultural"
    assert body["query"] == {"id": None, "name": "query.png", "class": None, "width": 64, "height": 64}
    assert body["k"] == k and body["class"] is None
    assert body["results"][0]["thumbnail"] == f"/api/images/{body['results'][0]['id']}/thumbnail"
    assert "path" not in body["results"][0]
    # timings: in the body and in the Server-Timing header
    assert {"decode", "embed", "search", "total"} <= set(body["timing_ms"])
    timing = r.headers["server-timing"]
    for name in ("decode", "embed", "search", "total"):
        assert f"{name};dur=" in timing


def test_search_by_upload_includes_the_classification(read_client: Any, query_png: Path,
                                                      classifier_run: Path) -> None:
    from landlens.data.io import load_rgb
    from landlens.training.predict import Predictor

    r = read_client.post("/api/search", files=_upload(query_png), data={"k": "3"})
    preds = r.json()["classification"]["predictions"]
    ref = Predictor(classifier_run).predict_images([load_rgb(query_png)], 4)[0]
    assert [p["class"] for p in preds] == list(ref.labels)
    np.testing.assert_allclose([p["probability"] for p in preds], ref.probabilities, rtol=1e-5)


def test_search_k_is_validated_and_clamped(read_client: Any, service_archive: Any, query_png: Path) -> None:
    for bad in ("0", "101", "-3", "many"):
        r = read_client.post("/api/search", files=_upload(query_png), data={"k": bad})
        assert r.status_code == 422, (bad, r.text)
        assert isinstance(r.json()["detail"], str) and "k" in r.json()["detail"]
    r = read_client.post("/api/search", files=_upload(query_png), data={"k": "100"})
    assert r.status_code == 200
    assert r.json()["k"] == len(service_archive)
    assert sorted(_ids(r.json()["results"])) == sorted(rec.id for rec in service_archive.records())
    # default k is 12 (all 12 images here)
    r = read_client.post("/api/search", files=_upload(query_png))
    assert len(r.json()["results"]) == 12


def test_search_by_id_excludes_itself_and_equals_archive(read_client: Any, service_archive: Any) -> None:
    image_id = 5
    r = read_client.get(f"/api/search/{image_id}", params={"k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = service_archive.search_id(image_id, 4)
    assert _ids(body["results"]) == [h.record.id for h in ref]
    assert image_id not in _ids(body["results"])
    rec = service_archive.record(image_id)
    assert body["query"] == {"id": image_id, "name": rec.name, "class": rec.class_name, "width": 64, "height": 64}
    assert all(h["place"] is None for h in body["results"])  # image files lie nowhere
    assert read_client.get("/api/scenes").json() == {"scenes": []}
    # k larger than the archive: every other image, once
    r = read_client.get(f"/api/search/{image_id}", params={"k": 100})
    ids = _ids(r.json()["results"])
    assert len(ids) == len(service_archive) - 1 and len(set(ids)) == len(ids) and image_id not in ids
    assert read_client.get("/api/search/999").status_code == 404
    assert read_client.get("/api/search/3", params={"k": 0}).status_code == 422


def test_class_filter_returns_only_that_class(read_client: Any, service_archive: Any, query_png: Path) -> None:
    cls = "beach"  # not the query's class: without the filter it would rank other classes first
    r = read_client.post("/api/search", files=_upload(query_png), data={"k": "10", "class": cls})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class"] == cls
    assert {x["class"] for x in body["results"]} == {cls}
    assert len(body["results"]) == 4  # clamped to the class size
    vec = service_archive.embed([service_archive.load_query(query_png)])
    ref = service_archive.search_vectors(vec, 4, class_name=cls)[0]
    assert _ids(body["results"]) == [h.record.id for h in ref]
    r = read_client.get("/api/search/0", params={"k": 10, "class": "airplane"})
    assert {x["class"] for x in r.json()["results"]} == {"airplane"}
    assert len(r.json()["results"]) == 4
    # an empty filter means all classes; an unknown class is refused
    r = read_client.post("/api/search", files=_upload(query_png), data={"k": "3", "class": ""})
    assert r.status_code == 200 and r.json()["class"] is None
    r = read_client.post("/api/search", files=_upload(query_png), data={"k": "3", "class": "volcano"})
    assert r.status_code == 422 and "volcano" in r.json()["detail"]


def test_image_record_has_no_server_path(read_client: Any, service_archive: Any) -> None:
    r = read_client.get("/api/images/2")
    assert r.status_code == 200
    assert r.json() == service_archive.record(2).to_dict()
    assert str(service_archive.directory) not in r.text and service_archive.record(2).path not in r.text
    assert read_client.get("/api/images/12345").status_code == 404


def test_thumbnail_is_a_jpeg_of_the_image(read_client: Any, service_archive: Any) -> None:
    from landlens.data.io import load_rgb

    r = read_client.get("/api/images/4/thumbnail", params={"size": 48})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.content[:3] == b"\xff\xd8\xff"
    im = Image.open(io.BytesIO(r.content))
    # 48 is served at the fixed size 128, larger than the 64 px image: not enlarged
    assert im.format == "JPEG" and max(im.size) == 64
    # the same picture: compare with the original shrunk independently
    ref = np.asarray(load_rgb(service_archive.record(4).path).resize(im.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(im.convert("RGB"), dtype=float) - ref).mean() < 12.0
    other = np.asarray(load_rgb(service_archive.record(11).path).resize(im.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(im.convert("RGB"), dtype=float) - other).mean() > 20.0
    # caching headers, ETag and 304
    etag = r.headers["etag"]
    assert etag == f'"{service_archive.record(4).sha256}-128"'
    assert r.headers["cache-control"] == "public, max-age=3600"
    r2 = read_client.get("/api/images/4/thumbnail", params={"size": 48}, headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b""
    r2 = read_client.get("/api/images/4/thumbnail", params={"size": 128}, headers={"If-None-Match": etag})
    assert r2.status_code == 304
    # default size 256 is larger than the 64 px image: the image is not enlarged
    r3 = read_client.get("/api/images/4/thumbnail")
    assert max(Image.open(io.BytesIO(r3.content)).size) == 64
    assert read_client.get("/api/images/999/thumbnail").status_code == 404
    assert read_client.get("/api/images/4/thumbnail", params={"size": 16}).status_code == 422
    assert read_client.get("/api/images/4/thumbnail", params={"size": 513}).status_code == 422


def test_thumbnails_are_cached(read_client: Any) -> None:
    service = read_client.app.state.service
    first = read_client.get("/api/images/7/thumbnail", params={"size": 40}).content
    hits = service.thumbnails.hits
    second = read_client.get("/api/images/7/thumbnail", params={"size": 40}).content
    assert second == first and service.thumbnails.hits == hits + 1


def test_classify_equals_predictor(read_client: Any, query_png: Path, classifier_run: Path) -> None:
    from landlens.data.io import load_rgb
    from landlens.training.predict import Predictor

    r = read_client.post("/api/classify", files=_upload(query_png), data={"top_k": "4"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 4
    assert sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-6)
    ref = Predictor(classifier_run).predict_images([load_rgb(query_png)], 4)[0]
    assert [p["class"] for p in preds] == list(ref.labels)
    np.testing.assert_allclose([p["probability"] for p in preds], ref.probabilities, rtol=1e-5)
    assert max(ref.probabilities) > 0.4  # the fixture's head is not uniform: the test can tell classes apart
    r = read_client.post("/api/classify", files=_upload(query_png), data={"top_k": "2"})
    assert [p["class"] for p in r.json()["predictions"]] == list(ref.labels[:2])
    assert read_client.post("/api/classify", files=_upload(query_png), data={"top_k": "0"}).status_code == 422


def test_classify_without_classifier_is_404(make_client: Any, service_archive_dir: Path, query_png: Path) -> None:
    client = make_client(service_archive_dir)
    r = client.post("/api/classify", files=_upload(query_png))
    assert r.status_code == 404 and "classifier" in r.json()["detail"]
    r = client.post("/api/search", files=_upload(query_png), data={"k": "2"})
    assert r.status_code == 200 and r.json()["classification"] is None
    assert client.get("/api/health").json()["classifier"] is False
    assert client.get("/api/classes").json()["classifier_classes"] is None


def test_openapi_lists_the_endpoints(read_client: Any) -> None:
    spec = read_client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/api/health": {"get"}, "/api/classes": {"get"}, "/api/search": {"post"},
        "/api/search/{image_id}": {"get"}, "/api/images/{image_id}": {"get", "delete"},
        "/api/images/{image_id}/thumbnail": {"get"}, "/api/classify": {"post"}, "/api/images": {"post"},
    }  # fmt: skip
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    assert read_client.get("/docs").status_code == 200


def test_page_and_static_files(read_client: Any) -> None:
    from landlens.service.app import STATIC_DIR

    if not (STATIC_DIR / "index.html").is_file():
        pytest.skip("the web page is not written yet")
    r = read_client.get("/")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
    assert r.text == (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    assert r.headers["content-type"].startswith("text/html")
    for asset in sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file() and not p.name.startswith(".")):
        r = read_client.get(f"/static/{asset}")
        assert r.status_code == 200 and r.content == (STATIC_DIR / asset).read_bytes()
    assert read_client.get("/static/missing.js").status_code == 404


# ---------------------------------------------------------------------------- write endpoints


def test_add_search_duplicate_delete(make_client: Any, writable_archive_dir: Path, service_setup: dict[str, Any],
                                     write_query: Any, tmp_path: Path) -> None:
    token = service_setup["token"]
    auth = {"Authorization": f"Bearer {token}"}
    client = make_client(writable_archive_dir, token=token)
    n0 = client.get("/api/health").json()["images"]
    gen0 = client.get("/api/health").json()["generation"]
    new = write_query(tmp_path / "new.png", class_index=2, image_index=50)

    r = client.post("/api/images", files=_upload(new, name="holiday photo.png"), data={"class": "beach"},
                    headers=auth)
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["class"] == "beach" and rec["width"] == 64 and rec["height"] == 64
    import hashlib

    sha = hashlib.sha256(new.read_bytes()).hexdigest()
    assert rec["sha256"] == sha
    assert r.headers["location"] == f"/api/images/{rec['id']}"
    # stored content-addressed, never under the client's name
    stored = writable_archive_dir / "uploads" / f"{sha}.png"
    assert stored.is_file() and stored.read_bytes() == new.read_bytes()
    assert not (writable_archive_dir / "uploads" / "holiday photo.png").exists()
    assert rec["name"] == stored.name

    health = client.get("/api/health").json()
    assert health["images"] == n0 + 1 and health["generation"] > gen0 and health["writable"] is True
    counts = {c["name"]: c["count"] for c in client.get("/api/classes").json()["classes"]}
    assert counts == {"agricultural": 4, "airplane": 4, "beach": 5}

    # searchable: the same picture is rank 1 at distance ~0
    r = client.post("/api/search", files=_upload(new), data={"k": "3"})
    top = r.json()["results"][0]
    assert top["id"] == rec["id"] and top["distance"] == pytest.approx(0.0, abs=1e-5)
    assert client.get(f"/api/images/{rec['id']}/thumbnail", params={"size": 32}).status_code == 200

    # duplicate content (under another name) -> 409 naming the existing id
    r = client.post("/api/images", files=_upload(new, name="copy.png"), headers=auth)
    assert r.status_code == 409 and f"id {rec['id']}" in r.json()["detail"]
    # an image already in the archive from the build -> 409 with its id
    from landlens.retrieval.archive import Archive

    first = Archive.open(writable_archive_dir).record(0)
    r = client.post("/api/images", files={"file": ("x.tif", Path(first.path).read_bytes(), "image/tiff")},
                    headers=auth)
    assert r.status_code == 409 and "id 0" in r.json()["detail"]

    # delete -> gone from records, searches and thumbnails
    r = client.delete(f"/api/images/{rec['id']}", headers=auth)
    assert r.status_code == 200 and r.json() == {"removed": rec["id"]}
    assert client.get(f"/api/images/{rec['id']}").status_code == 404
    assert client.get(f"/api/images/{rec['id']}/thumbnail").status_code == 404
    r = client.post("/api/search", files=_upload(new), data={"k": "100"})
    assert rec["id"] not in _ids(r.json()["results"]) and len(r.json()["results"]) == n0
    assert client.delete(f"/api/images/{rec['id']}", headers=auth).status_code == 404
    # the archive on disk agrees (a fresh process would see the same)
    assert len(Archive.open(writable_archive_dir)) == n0


def test_add_rejects_bad_class_names(make_client: Any, writable_archive_dir: Path, service_setup: dict[str, Any],
                                     query_png: Path) -> None:
    client = make_client(writable_archive_dir, token=service_setup["token"])
    auth = {"Authorization": f"Bearer {service_setup['token']}"}
    r = client.post("/api/images", files=_upload(query_png), data={"class": "x" * 300}, headers=auth)
    assert r.status_code == 422
    r = client.post("/api/images", files=_upload(query_png), data={"class": "bad\nname"}, headers=auth)
    assert r.status_code == 422
    assert client.get("/api/health").json()["images"] == 12


# ---------------------------------------------------------------------------- micro-batching


def test_micro_batcher_shares_calls_and_keeps_order() -> None:
    from landlens.service.batching import BatcherClosed, MicroBatcher

    calls: list[list[int]] = []
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # hold the first batch while the others queue up
        return [x * x for x in items]

    batcher = MicroBatcher(fn, max_batch=4, max_wait=0.05)
    first = batcher.submit(1)
    time.sleep(0.15)  # the first batch (one item) is running and blocked
    futures = [batcher.submit(x) for x in range(2, 12)]
    release.set()
    assert first.result(5) == 1
    assert [f.result(5) for f in futures] == [x * x for x in range(2, 12)]
    assert calls[0] == [1]
    assert [len(c) for c in calls[1:]] == [4, 4, 2]  # the 10 queued items in full batches
    assert [x for c in calls for x in c] == list(range(1, 12))
    assert batcher.batches == 4 and batcher.items == 11 and batcher.largest_batch == 4
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(5)


def test_micro_batcher_reports_errors_to_every_request() -> None:
    from landlens.service.batching import MicroBatcher

    def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    with MicroBatcher(fn, max_batch=8, max_wait=0.0) as batcher:
        bad = batcher.submit(13)
        with pytest.raises(ValueError, match="unlucky"):
            bad.result(5)
        assert batcher.submit(2).result(5) == 2  # the worker survives


def test_concurrent_searches_share_forward_passes(make_client: Any, service_archive_dir: Path,
                                                  service_archive: Any, write_query: Any, tmp_path: Path) -> None:
    client = make_client(service_archive_dir, max_wait=0.5)  # a wide window so that the requests meet
    queries = [write_query(tmp_path / f"q{i}.png", class_index=i % 3, image_index=60 + i) for i in range(4)]
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        results[i] = client.post("/api/search", files=_upload(queries[i]), data={"k": "3"})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher = client.app.state.service.batcher
    assert batcher.items == 4 and batcher.batches < 4
    for i, q in enumerate(queries):
        ref = service_archive.search_vectors(service_archive.embed([service_archive.load_query(q)]), 3)[0]
        assert _ids(results[i].json()["results"]) == [h.record.id for h in ref]


def test_images_added_by_another_process_are_picked_up(make_client: Any, writable_archive_dir: Path,
                                                        write_query: Any, tmp_path: Path) -> None:
    from landlens.retrieval.archive import Archive

    client = make_client(writable_archive_dir, refresh_interval=0.0)
    before = client.get("/api/health").json()
    other = Archive.open(writable_archive_dir)  # e.g. `landlens index add` while the server runs
    new = other.add([write_query(tmp_path / "elsewhere.png", 1, 77)], ["lake"])
    health = client.get("/api/health").json()
    assert health["images"] == before["images"] + 1 and health["generation"] == before["generation"] + 1
    assert client.get(f"/api/images/{new[0].id}").json()["class"] == "lake"
    assert {"name": "lake", "count": 1} in client.get("/api/classes").json()["classes"]
    hits = client.get(f"/api/search/{new[0].id}?k=3").json()["results"]
    assert [h["id"] for h in hits] == [h.record.id for h in other.search_id(new[0].id, 3)]


def test_rerank_service_equals_the_archive_reranker(make_client: Any, service_archive_dir: Path) -> None:
    """`create_app(rerank=...)`: health reports the re-ranker, search by id follows the archive's
    own re-ranked search (an independently opened archive with the same spec)."""
    from landlens.retrieval.archive import Archive

    client = make_client(service_archive_dir, rerank="aqe:n=2,alpha=3")
    health = client.get("/api/health").json()
    assert health["rerank"]["spec"].startswith("aqe:n=2,alpha=3")
    ref = Archive.open(service_archive_dir)
    ref.set_rerank("aqe:n=2,alpha=3")
    for rec in ref.records()[:3]:
        body = client.get(f"/api/search/{rec.id}", params={"k": 5}).json()
        want = ref.search_id(rec.id, 5)
        assert [r["id"] for r in body["results"]] == [h.record.id for h in want]
        assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in want], abs=1e-6)
    plain = make_client(service_archive_dir).get("/api/health").json()
    assert plain["rerank"] is None
