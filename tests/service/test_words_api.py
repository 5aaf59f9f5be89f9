"""The service's search by words: POST /api/search/text (sentence, sentence + image, feedback)
and POST /api/labels, against the archive's own answers computed in this process; 409 without
an alignment; bad requests are one-line 4xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BASE_URL, _write_query
from fastapi.testclient import TestClient
from fixtures.words import captioned_alignment


@pytest.fixture(scope="module")
def words_env(service_dataset: Path, service_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import shutil

    from landlens.retrieval.archive import Archive
    from landlens.service.app import create_app

    tmp = tmp_path_factory.mktemp("words_api")
    shutil.copytree(service_archive_dir, tmp / "arch")
    captioned_alignment(service_dataset, tmp / "arch", tmp / "align.safetensors")
    with TestClient(create_app(tmp / "arch", optimize="none"), base_url=BASE_URL) as client:
        yield {"client": client, "archive": Archive.open(tmp / "arch"), "tmp": tmp}


def _ids(hits: list[Any]) -> list[int]:
    return [h.record.id for h in hits]


def test_text_search_answers_as_the_archive(words_env: dict) -> None:
    client, archive = words_env["client"], words_env["archive"]
    assert client.get("/api/health").json()["text"] is True
    r = client.post("/api/search/text", json={"text": "there is beach in the image", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["id"] for h in body["results"]] == _ids(archive.search_text("there is beach in the image", 5))
    assert body["query"] == {"text": "there is beach in the image"}
    assert body["results"][0]["class"] == "beach" and "search" in body["timing_ms"]
    r = client.post("/api/search/text", json={"text": "an aerial view of airplane", "k": 3, "class": "beach"})
    assert {h["class"] for h in r.json()["results"]} == {"beach"}


def test_text_with_an_indexed_image_and_feedback(words_env: dict) -> None:
    client, archive = words_env["client"], words_env["archive"]
    first = archive.records()[0]
    r = client.post("/api/search/text", json={"text": "with many planes", "image": {"id": first.id},
                                              "image_weight": 0.4, "k": 6})
    assert r.status_code == 200, r.text
    want = archive.search_text("with many planes", 6, image=first.id, image_weight=0.4)
    assert [h["id"] for h in r.json()["results"]] == _ids(want)
    assert first.id not in [h["id"] for h in r.json()["results"]]
    good, bad = want[1].record.id, want[4].record.id
    r = client.post("/api/search/text", json={"text": "with many planes", "image": {"id": first.id},
                                              "image_weight": 0.4, "k": 6, "relevant": [good], "irrelevant": [bad]})
    want = archive.search_text("with many planes", 6, image=first.id, image_weight=0.4, relevant=[good],
                               irrelevant=[bad])
    assert [h["id"] for h in r.json()["results"]] == _ids(want)
    assert r.json()["feedback"]["relevant"] == [good]


def test_text_with_an_uploaded_image(words_env: dict) -> None:
    client, archive = words_env["client"], words_env["archive"]
    query = _write_query(words_env["tmp"] / "q.png", 1)
    up = client.post("/api/search", files={"file": ("q.png", query.read_bytes(), "image/png")}, data={"k": "3"})
    token = up.json()["query_token"]
    r = client.post("/api/search/text", json={"text": "a picture showing beach", "image": {"vector_token": token},
                                              "k": 4})
    assert r.status_code == 200, r.text
    vector = archive.embed([archive.load_query(query)])[0]
    assert [h["id"] for h in r.json()["results"]] == _ids(archive.search_text("a picture showing beach", 4, image=vector))


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"k": 3}, 422, "give a sentence"),
    ({"text": "   ", "k": 3}, 422, "give a sentence"),
    ({"text": "x" * 1001}, 422, "at most 1000"),
    ({"text": "beach", "image": {"id": 10 ** 6}}, 404, "no image with id"),
    ({"text": "beach", "image": {}}, 422, "exactly one"),
    ({"text": "beach", "class": "nowhere"}, 422, "not in the archive"),
    ({"text": "beach", "relevant": [1], "irrelevant": [1]}, 422, "both relevant and not relevant"),
    ({"text": "beach", "extra": 1}, 422, "extra"),
])
def test_bad_text_requests(words_env: dict, body: dict, status: int, words: str) -> None:
    r = words_env["client"].post("/api/search/text", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_zero_shot_labels_of_an_upload(words_env: dict) -> None:
    client, archive = words_env["client"], words_env["archive"]
    query = _write_query(words_env["tmp"] / "l.png", 2)
    names = ["beach", "airplane", "agricultural", "dense forest"]
    r = client.post("/api/labels", files={"file": ("l.png", query.read_bytes(), "image/png")},
                    data={"classes": ", ".join(names)})
    assert r.status_code == 200, r.text
    got = {d["class"]: d["probability"] for d in r.json()["labels"]}
    want = archive.zero_shot([archive.load_query(query)], names)[0]
    assert got == pytest.approx(dict(zip(names, want)), abs=1e-6)
    assert np.isclose(sum(got.values()), 1.0)
    r = client.post("/api/labels", files={"file": ("l.png", query.read_bytes(), "image/png")}, data={"classes": "one"})
    assert r.status_code == 422 and "2 to 100" in r.json()["detail"]


def test_an_archive_without_alignment_answers_409(service_archive_dir: Path) -> None:
    from landlens.service.app import create_app

    with TestClient(create_app(service_archive_dir, optimize="none"), base_url=BASE_URL) as client:
        assert client.get("/api/health").json()["text"] is False
        r = client.post("/api/search/text", json={"text": "beach"})
        assert r.status_code == 409 and "landlens index text" in r.json()["detail"]
