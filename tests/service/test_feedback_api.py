"""``POST /api/search/feedback`` (relevance feedback, Rocchio) against direct computations:
``landlens.retrieval.feedback.rocchio`` on the archive's own vectors, then
``Archive.search_vectors``; and its errors (404, 410, 422)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from landlens.retrieval.feedback import rocchio
from landlens.service.app import MAX_FEEDBACK_IDS, QUERY_TOKEN_EXPIRED, QueryVectorCache

URL = "/api/search/feedback"


def _upload(path: Path) -> dict[str, Any]:
    return {"file": (path.name, path.read_bytes(), "image/png")}


def _ids(results: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in results]


def _vectors(archive: Any, ids: list[int]) -> np.ndarray:
    return np.stack([archive.vector(i) for i in ids]) if ids else np.zeros((0, archive.dim), np.float32)


def _by_class(archive: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in archive.records():
        out.setdefault(r.class_name, []).append(r.id)
    return out


@pytest.fixture
def client(make_client: Any, service_archive_dir: Path) -> Any:
    return make_client(service_archive_dir)


def test_feedback_on_an_upload_equals_the_direct_rocchio_search(client: Any, service_archive: Any,
                                                                 query_png: Path) -> None:
    k = 6
    r = client.post("/api/search", files=_upload(query_png), data={"k": str(k)})
    assert r.status_code == 200, r.text
    first = r.json()
    token = first["query_token"]
    assert isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9_-]{16,64}", token)
    classes = _by_class(service_archive)
    relevant = classes["agricultural"][:2]
    irrelevant = [classes["beach"][0]]
    r = client.post(URL, json={"query": {"vector_token": token}, "relevant": relevant,
                               "irrelevant": irrelevant, "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    q = service_archive.embed([service_archive.load_query(query_png)])[0]
    refined = rocchio(q, _vectors(service_archive, relevant), _vectors(service_archive, irrelevant),
                      a=1.0, b=0.75, c=0.15)
    ref = service_archive.search_vectors(refined[None], k)[0]
    assert _ids(body["results"]) == [h.record.id for h in ref]
    np.testing.assert_allclose([x["score"] for x in body["results"]], [h.score for h in ref], atol=1e-5)
    assert body["feedback"] == {"method": "rocchio", "weights": {"a": 1.0, "b": 0.75, "c": 0.15},
                                "relevant": relevant, "irrelevant": irrelevant}
    assert body["query"] == first["query"] and body["query_token"] == token
    assert body["k"] == k and body["class"] is None
    assert {"refine", "search", "total"} <= set(body["timing_ms"])
    # the refined query differs from the plain one (the answer is not just the first search)
    assert not np.allclose(refined / np.linalg.norm(refined), q / np.linalg.norm(q), atol=1e-3)
    # a second round with the same token works (the token is not used up)
    r = client.post(URL, json={"query": {"vector_token": token}, "relevant": relevant, "k": k})
    assert r.status_code == 200
    ref = service_archive.search_vectors(rocchio(q, _vectors(service_archive, relevant))[None], k)[0]
    assert _ids(r.json()["results"]) == [h.record.id for h in ref]


def test_feedback_on_an_indexed_query_leaves_it_out(client: Any, service_archive: Any) -> None:
    classes = _by_class(service_archive)
    qid = classes["airplane"][0]
    relevant = classes["airplane"][1:3]
    irrelevant = classes["beach"][:2] + classes["agricultural"][:1]
    weights = {"a": 0.5, "b": 1.0, "c": 0.4}
    k = 100  # more than the archive holds: every other image, in the refined order
    r = client.post(URL, json={"query": {"id": qid}, "relevant": relevant, "irrelevant": irrelevant,
                               "k": k, "weights": weights})
    assert r.status_code == 200, r.text
    body = r.json()
    refined = rocchio(service_archive.vector(qid), _vectors(service_archive, relevant),
                      _vectors(service_archive, irrelevant), **weights)
    ref = service_archive.search_vectors(refined[None], len(service_archive) - 1, exclude=[qid])[0]
    assert _ids(body["results"]) == [h.record.id for h in ref]
    assert len(body["results"]) == len(service_archive) - 1 == body["k"]
    assert qid not in _ids(body["results"])
    # the marks changed the order (the endpoint did not just search with the plain query)
    assert _ids(body["results"]) != [h.record.id for h in service_archive.search_id(qid, len(service_archive) - 1)]
    assert set(relevant) | set(irrelevant) <= set(_ids(body["results"]))  # marked images are kept
    assert body["query"]["id"] == qid and body["query"]["class"] == "airplane"
    assert body["query_token"] is None
    assert body["feedback"]["weights"] == weights

    # with a class filter: only that class, the query still left out
    r = client.post(URL, json={"query": {"id": qid}, "relevant": relevant, "k": 12, "class": "airplane"})
    assert r.status_code == 200, r.text
    ref = service_archive.search_vectors(rocchio(service_archive.vector(qid),
                                                 _vectors(service_archive, relevant))[None], 12,
                                         class_name="airplane", exclude=[qid])[0]
    assert _ids(r.json()["results"]) == [h.record.id for h in ref]
    assert len(ref) == 3 and r.json()["k"] == 3


def test_feedback_errors(client: Any, service_archive: Any) -> None:
    ids = [r.id for r in service_archive.records()]
    unknown = max(ids) + 1000
    qid, other = ids[0], ids[1]

    def post(body: dict[str, Any]) -> tuple[int, str]:
        r = client.post(URL, json=body)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        return r.status_code, detail

    assert post({"query": {"id": unknown}, "relevant": [other]}) == \
        (404, f"no image with id {unknown} in the archive")
    assert post({"query": {"id": qid}, "relevant": [other, unknown]}) == \
        (404, f"relevant: no image with id {unknown} in the archive")
    assert post({"query": {"id": qid}, "irrelevant": [unknown]}) == \
        (404, f"irrelevant: no image with id {unknown} in the archive")
    status, detail = post({"query": {"id": qid}, "relevant": [], "irrelevant": []})
    assert status == 422 and "at least one" in detail
    status, detail = post({"query": {"id": qid}})
    assert status == 422 and "at least one" in detail
    many = list(range(MAX_FEEDBACK_IDS // 2 + 1))
    status, detail = post({"query": {"id": qid}, "relevant": many,
                           "irrelevant": [i + 10_000 for i in many]})
    assert status == 422 and str(MAX_FEEDBACK_IDS) in detail
    status, detail = post({"query": {"id": qid}, "relevant": list(range(MAX_FEEDBACK_IDS + 1))})
    assert status == 422 and detail.startswith("relevant")
    status, detail = post({"query": {"id": qid}, "relevant": [other], "irrelevant": [other]})
    assert status == 422 and f"image {other}" in detail
    status, detail = post({"query": {"id": qid, "vector_token": "a" * 22}, "relevant": [other]})
    assert status == 422 and "exactly one" in detail
    status, detail = post({"query": {}, "relevant": [other]})
    assert status == 422 and "exactly one" in detail
    assert post({"query": {"id": qid}, "relevant": [other], "k": 101})[0] == 422
    assert post({"query": {"id": qid}, "relevant": [other], "k": 0})[0] == 422
    assert post({"query": {"id": qid}, "relevant": [other], "class": "nope"})[0] == 422
    status, detail = post({"query": {"id": qid}, "relevant": [other], "weights": {"a": 0, "b": 0, "c": 0}})
    assert status == 422 and detail.startswith("weights")
    assert post({"query": {"id": qid}, "relevant": [other], "weights": {"a": -1}})[0] == 422
    assert post({"query": {"id": qid}, "relevant": [other], "weights": {"d": 1}})[0] == 422
    # a token the server never issued (or forgot): 410, never 500
    assert post({"query": {"vector_token": "x" * 22}, "relevant": [other]}) == (410, QUERY_TOKEN_EXPIRED)
    assert post({"query": {"vector_token": "../../etc"}, "relevant": [other]})[0] == 422
    # a refined query of zero length: the query itself as the only irrelevant image, a = c
    status, detail = post({"query": {"id": qid}, "irrelevant": [qid], "weights": {"a": 1, "b": 0, "c": 1}})
    assert status == 422 and "zero vector" in detail


def test_expired_token_is_410(make_client: Any, service_archive_dir: Path, service_archive: Any,
                              write_query: Any, tmp_path: Path) -> None:
    client = make_client(service_archive_dir, query_cache=2)
    tokens = []
    for i in range(3):
        png = write_query(tmp_path / f"q{i}.png", class_index=i % 3, image_index=50 + i)
        r = client.post("/api/search", files=_upload(png), data={"k": "3"})
        assert r.status_code == 200
        tokens.append(r.json()["query_token"])
    assert len(set(tokens)) == 3
    other = service_archive.records()[0].id
    r = client.post(URL, json={"query": {"vector_token": tokens[0]}, "relevant": [other]})
    assert r.status_code == 410 and r.json() == {"detail": QUERY_TOKEN_EXPIRED}
    for t in tokens[1:]:
        assert client.post(URL, json={"query": {"vector_token": t}, "relevant": [other]}).status_code == 200
    # query_cache=0: no tokens at all
    client = make_client(service_archive_dir, query_cache=0)
    r = client.post("/api/search", files=_upload(png), data={"k": "3"})
    assert r.status_code == 200 and r.json()["query_token"] is None


def test_query_vector_cache_is_a_bounded_lru() -> None:
    cache = QueryVectorCache(2)
    a = cache.put(np.array([1.0, 0.0]), {"name": "a"})
    b = cache.put(np.array([0.0, 1.0]), {"name": "b"})
    assert cache.get(a)[1] == {"name": "a"}  # a is now the most recent
    c = cache.put(np.array([1.0, 1.0]), {"name": "c"})
    assert cache.get(b) is None and len(cache) == 2
    np.testing.assert_array_equal(cache.get(a)[0], [1.0, 0.0])
    np.testing.assert_array_equal(cache.get(c)[0], [1.0, 1.0])
    assert not cache.get(c)[0].flags.writeable
    assert len({a, b, c}) == 3 and all(len(t) >= 22 for t in (a, b, c))
