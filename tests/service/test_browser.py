"""The search page (``landlens.service`` static files) in a real headless Chromium.

A real uvicorn server runs ``create_app`` over a tiny ``lbp_rgb`` archive in a background
thread; Playwright drives the system Chromium (``/usr/bin/chromium``, never ``playwright
install``). The result cards are compared with the archive's own answers computed directly
in this process (``search_vectors``, ``search_id``), not with the server's JSON; the
classifier panel with the predictions the server sent.

Without Chromium (or Playwright) the module is skipped, except when ``CI`` is set: then it
fails, so CI cannot silently lose the browser test. Screenshots go to
``runs/test-artifacts/browser/``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.make_datasets import make_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "runs" / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("LANDLENS_CHROMIUM", "/usr/bin/chromium"))
TITLE = "landlens — search by example or by words"
K = 6
PER_CLASS = 4


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    """Skip locally; fail under CI, where the browser test must always run."""
    if _in_ci():
        pytest.fail(f"{reason}; CI is set, so the browser test fails instead of skipping")
    pytest.skip(reason)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless system Chromium through Playwright."""
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"the playwright Python package is not installed ({exc})")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def archive_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-class x 4-image archive (64 px JPEGs, ``lbp_rgb`` features) and a query image."""
    from landlens.retrieval.archive import Archive

    tmp = tmp_path_factory.mktemp("browser")
    data = make_dataset(tmp / "data", "patternnet", per_class=PER_CLASS, size=64, classes=3)
    archive = Archive.build(data, tmp / "archive", backbone="lbp_rgb", rerank=None, progress=False)
    # the query is an archive image itself (the second one of the first class)
    query = next(r for r in archive.records() if r.class_name == archive.classes[0]
                 and r.name.endswith("002.jpg"))
    return {"archive": archive, "dir": tmp / "archive", "query": query, "query_path": Path(query.path), "data": data,
            "tmp": tmp}


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on 127.0.0.1 (a free port) in a background thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server_url(archive_env: dict[str, Any]) -> Iterator[str]:
    """``create_app(archive_dir)`` (no classifier) behind a real uvicorn."""
    from landlens.service.app import create_app

    with _serve(create_app(archive_env["dir"])) as url:
        yield url


@pytest.fixture(scope="module")
def classifier_url(archive_env: dict[str, Any], classifier_run: Path) -> Iterator[str]:
    """``create_app(archive_dir, classifier_run=...)`` behind a real uvicorn; ``classifier_run``
    (tests/service/conftest.py) is an untrained LBP-RGB classifier with unequal probabilities."""
    from landlens.service.app import create_app

    with _serve(create_app(archive_env["dir"], classifier_run=classifier_run)) as url:
        yield url


@pytest.fixture
def open_page(browser: Any, server_url: str) -> Iterator[Callable[..., Any]]:
    """``open_page(width, height, goto=True, url=None, **context_options)``: a fresh page,
    on the search page of ``url`` (default: :func:`server_url`) unless ``goto`` is false.

    The page records console errors (the browser reports each Content-Security-Policy
    violation there too), page errors and failed requests in ``page.problems``, and CSP
    violation events in ``window.__csp`` (:func:`_csp_violations`).
    """
    contexts: list[Any] = []

    def make(width: int = 1280, height: int = 900, goto: bool = True, url: str | None = None,
             **options: Any) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height}, **options)
        context.add_init_script(CSP_LISTENER)  # injected by the browser, not subject to the page's CSP
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
        page.problems = problems
        if goto:
            page.goto((url or server_url) + "/")
        return page

    yield make
    for context in contexts:
        context.close()


# ---------------------------------------------------------------------- helpers

CSP_LISTENER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
    e => window.__csp.push(`${e.effectiveDirective} blocked ${e.blockedURI || 'inline'}`));
"""


def _csp_violations(page: Any) -> list[str]:
    return page.evaluate("() => window.__csp")


def _is_upload_search(response: Any) -> bool:
    return response.request.method == "POST" and response.url.split("?")[0].endswith("/api/search")


def _search(page: Any, action: Callable[[], None], predicate: Callable[[Any], bool]) -> Any:
    """Run ``action``, wait for the matching search response and for the page to render it."""
    with page.expect_response(predicate) as info:
        action()
    response = info.value
    page.wait_for_selector("#results:not([aria-busy])", state="attached")
    return response


def _cards(page: Any) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "#results .result",
        """els => els.map(e => ({
            tag: e.tagName,
            id: Number(e.dataset.id),
            rank: e.querySelector('.rank').textContent,
            cls: e.querySelector('.class').textContent,
            score: e.querySelector('.score').textContent,
            src: new URL(e.querySelector('img').src).pathname,
            loading: e.querySelector('img').getAttribute('loading'),
        }))""",
    )


def _wait_thumbnails(page: Any) -> list[int]:
    """Scroll each card into view (thumbnails load lazily), wait until every image finished
    loading; return their natural widths."""
    images = page.locator("#results .result img")
    for i in range(images.count()):
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .result img')].every(i => i.complete)"
    )
    return page.eval_on_selector_all("#results .result img", "els => els.map(i => i.naturalWidth)")


def _prob_rows(page: Any) -> list[dict[str, Any]]:
    """Name, value text and bar fill fraction of each ``#probs .prob`` row."""
    return page.eval_on_selector_all(
        "#probs .prob",
        """els => els.map(e => ({
            name: e.querySelector('.name').textContent,
            value: e.querySelector('.value').textContent,
            frac: e.querySelector('.bar > *').getBoundingClientRect().width
                  / e.querySelector('.bar').clientWidth,
        }))""",
    )


def _ids(hits: list[Any]) -> list[int]:
    return [h.record.id for h in hits]


def _upload_reference(archive: Any, path: Path, k: int, class_name: str | None = None) -> list[Any]:
    vectors = archive.embed([archive.load_query(path)])
    return archive.search_vectors(vectors, k, class_name=class_name)[0]


def _shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# ---------------------------------------------------------------------- tests


def test_search_page_end_to_end(browser: Any, archive_env: dict[str, Any],
                                open_page: Callable[..., Any]) -> None:
    """Upload, class filter, click and Enter on cards: the page shows the archive's answers."""
    archive, query, query_path = archive_env["archive"], archive_env["query"], archive_env["query_path"]
    page = open_page(1280, 900)
    assert page.title() == TITLE

    # class filter: "all" plus one option per archive class, filled from /api/classes
    page.wait_for_function(
        f"() => document.querySelectorAll('#class-filter option').length === {len(archive.classes) + 1}"
    )
    options = page.eval_on_selector_all("#class-filter option", "els => els.map(o => o.value)")
    assert options == ["", *archive.classes]
    assert len(archive.classes) == 3

    # upload a query: exactly k cards, in the archive's own order
    page.fill("#k", str(K))
    page.locator("#k").blur()  # commit it now ("change" with no query yet: no search)
    response = _search(page, lambda: page.set_input_files("#file-input", str(query_path)),
                       _is_upload_search)
    assert response.status == 200
    reference = _upload_reference(archive, query_path, K)
    cards = _cards(page)
    assert len(cards) == K
    assert [c["id"] for c in cards] == _ids(reference)
    assert cards[0]["id"] == query.id  # the query is indexed: itself at rank 1
    assert cards[0]["cls"] == query.class_name
    assert [c["rank"] for c in cards] == [str(i) for i in range(1, K + 1)]
    assert [c["cls"] for c in cards] == [h.record.class_name for h in reference]
    assert [c["score"] for c in cards] == [f"{h.score:.3f}" for h in reference]
    assert all(c["tag"] == "BUTTON" for c in cards)  # focusable, Enter activates
    assert all(c["loading"] == "lazy" for c in cards)
    assert [c["src"] for c in cards] == [f"/api/images/{c['id']}/thumbnail" for c in cards]
    assert all(w > 0 for w in _wait_thumbnails(page))

    total = response.json()["timing_ms"]["total"]
    assert page.text_content("#status") == f"{K} results in {int(total + 0.5)} ms"
    preview = page.eval_on_selector(
        "#query-preview", "i => ({src: i.getAttribute('src'), w: i.naturalWidth, shown: i.offsetWidth > 0})"
    )
    assert preview["src"].startswith("blob:") and preview["shown"]
    page.wait_for_function("() => document.getElementById('query-preview').complete")
    assert page.eval_on_selector("#query-preview", "i => i.naturalWidth") == 64
    assert page.request.get(page.url + "api/health").json()["classifier"] is False
    assert page.is_hidden("#probs")
    _shot(page, "search.png")

    # class filter re-runs the upload with the class: only that class is left
    other = archive.classes[1]
    assert other != query.class_name
    _search(page, lambda: page.select_option("#class-filter", other), _is_upload_search)
    cards = _cards(page)
    assert {c["cls"] for c in cards} == {other}
    assert [c["id"] for c in cards] == _ids(_upload_reference(archive, query_path, K, other))
    assert len(cards) == PER_CLASS
    _search(page, lambda: page.select_option("#class-filter", ""), _is_upload_search)
    assert [c["id"] for c in _cards(page)] == _ids(reference)

    # clicking the second card searches with that indexed image
    second = _cards(page)[1]["id"]
    response = _search(page, lambda: page.click("#results .result >> nth=1"),
                       lambda r: f"/api/search/{second}?" in r.url)
    assert f"k={K}" in response.url
    assert [c["id"] for c in _cards(page)] == _ids(archive.search_id(second, K))
    assert second not in [c["id"] for c in _cards(page)]
    page.wait_for_function("() => document.getElementById('query-preview').complete")
    preview = page.eval_on_selector("#query-preview",
                                    "i => ({src: i.getAttribute('src'), w: i.naturalWidth})")
    assert preview["src"].endswith(f"/api/images/{second}/thumbnail") and preview["w"] > 0
    assert all(w > 0 for w in _wait_thumbnails(page))

    # keyboard: Enter on a focused card does the same; the filter then re-runs that id query
    third = _cards(page)[2]["id"]
    page.focus("#results .result >> nth=2")
    _search(page, lambda: page.keyboard.press("Enter"), lambda r: f"/api/search/{third}?" in r.url)
    assert [c["id"] for c in _cards(page)] == _ids(archive.search_id(third, K))
    _search(page, lambda: page.select_option("#class-filter", other),
            lambda r: f"/api/search/{third}?" in r.url)
    cards = _cards(page)
    assert {c["cls"] for c in cards} == {other}
    assert [c["id"] for c in cards] == _ids(archive.search_id(third, K, class_name=other))

    assert page.problems == []


def test_search_page_fits_a_phone(browser: Any, archive_env: dict[str, Any],
                                  open_page: Callable[..., Any]) -> None:
    """At 360 x 740 (a phone): a dropped query works and nothing scrolls sideways."""
    archive, query_path = archive_env["archive"], archive_env["query_path"]
    page = open_page(360, 740, device_scale_factor=2, is_mobile=True, has_touch=True)
    page.fill("#k", str(K))
    page.locator("#k").blur()  # commit it now ("change" with no query yet: no search)
    # this time the query is dropped on the drop zone (a File in a DataTransfer)
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
            return transfer;
        }""",
        [base64.b64encode(query_path.read_bytes()).decode(), query_path.name],
    )
    _search(page, lambda: page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer}),
            _is_upload_search)
    assert page.text_content("#query-caption") == query_path.name
    assert [c["id"] for c in _cards(page)] == _ids(_upload_reference(archive, query_path, K))
    assert all(w > 0 for w in _wait_thumbnails(page))
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 360
    rights = page.eval_on_selector_all(
        "#results .result, #drop-zone, #class-filter, #k, #status",
        "els => els.map(e => e.getBoundingClientRect().right)",
    )
    assert max(rights) <= 360
    # at least two result columns fit side by side
    tops = page.eval_on_selector_all("#results .result", "els => els.map(e => e.getBoundingClientRect().top)")
    assert tops[0] == tops[1]
    _shot(page, "search-mobile.png")
    assert page.problems == []


def test_classifier_panel(browser: Any, archive_env: dict[str, Any], classifier_url: str,
                          open_page: Callable[..., Any]) -> None:
    """With a classifier loaded, an upload's predictions fill ``#probs``: one row each."""
    query_path = archive_env["query_path"]
    page = open_page(1280, 900, url=classifier_url)
    page.wait_for_function("() => document.getElementById('archive-info').textContent.includes('classifier')")
    assert page.is_hidden("#probs")  # nothing to show before the first search
    response = _search(page, lambda: page.set_input_files("#file-input", str(query_path)),
                       _is_upload_search)
    predictions = response.json()["classification"]["predictions"]
    probabilities = [p["probability"] for p in predictions]
    assert len(predictions) >= 2 and max(probabilities) - min(probabilities) > 0.1
    assert page.is_visible("#probs")
    rows = _prob_rows(page)
    assert [r["name"] for r in rows] == [p["class"] for p in predictions]
    assert [r["value"] for r in rows] == [f"{100 * p:.1f}%" for p in probabilities]
    for row, p in zip(rows, probabilities):
        assert row["frac"] == pytest.approx(p, abs=0.02)
    assert all(w > 0 for w in _wait_thumbnails(page))
    _shot(page, "search-classifier.png")

    # a search by id has no classification: the panel hides
    _search(page, lambda: page.click("#results .result >> nth=1"), lambda r: "/api/search/" in r.url)
    assert page.is_hidden("#probs")
    assert page.problems == []


def test_server_strings_are_escaped(browser: Any, archive_env: dict[str, Any],
                                    open_page: Callable[..., Any], server_url: str) -> None:
    """Class names with markup (in hits and predictions) show as text and never run.

    ``/api/health`` is the server's answer with ``classifier: true``; the upload search is
    answered by the test: the archive's own hits and a ``classification`` with given
    probabilities, names carrying markup.
    """
    archive, query_path = archive_env["archive"], archive_env["query_path"]
    evil = '<img src=x onerror="window.__pwned=1">'
    predictions = [
        {"class": evil, "probability": 0.625},
        {"class": "airplane", "probability": 0.25},
        {"class": "<b>beach</b>", "probability": 0.125},
    ]

    def health(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["classifier"] = True
        route.fulfill(response=response, json=body)

    # the upload search is answered here, from the archive's own hits (route.fetch() would
    # not forward the browser's multipart body)
    hits = _upload_reference(archive, query_path, 12)
    results = [dict(h.to_dict(), thumbnail=f"/api/images/{h.record.id}/thumbnail") for h in hits]
    results[0]["class"] = results[0]["name"] = evil
    body = {"k": 12, "class": None, "query": {"id": None, "name": query_path.name, "class": None},
            "results": results, "classification": {"predictions": predictions},
            "timing_ms": {"decode": 1.0, "embed": 2.0, "search": 0.5, "total": 3.5}}

    def search(route: Any) -> None:
        if route.request.method != "POST":
            route.fallback()
            return
        route.fulfill(status=200, json=body)

    page = open_page(1280, 900, goto=False)
    page.route(re.compile(r".*/api/health$"), health)
    page.route(re.compile(r".*/api/search$"), search)
    page.goto(server_url + "/")
    page.wait_for_function("() => document.getElementById('archive-info').textContent.includes('classifier')")
    _search(page, lambda: page.set_input_files("#file-input", str(query_path)), _is_upload_search)

    assert page.is_visible("#probs")
    rows = _prob_rows(page)
    assert [r["name"] for r in rows] == [p["class"] for p in predictions]
    assert [r["value"] for r in rows] == ["62.5%", "25.0%", "12.5%"]
    for row, p in zip(rows, predictions):
        assert row["frac"] == pytest.approx(p["probability"], abs=0.02)
    # markup from the server stays text: no element was created, no handler ran
    assert page.text_content("#results .result >> nth=0 >> .class") == evil
    assert page.eval_on_selector_all("#probs img, #probs b, #results .meta img", "els => els.length") == 0
    assert page.evaluate("window.__pwned") is None
    assert page.problems == []


def test_search_error_is_shown(browser: Any, archive_env: dict[str, Any],
                               open_page: Callable[..., Any], bad_files: dict[str, Path]) -> None:
    """A file that is not an image: the server's one-line ``detail`` appears in ``#status``."""
    page = open_page(1280, 900)
    response = _search(page, lambda: page.set_input_files("#file-input", str(bad_files["not_image"])),
                       _is_upload_search)
    assert response.status == 415
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert page.text_content("#status") == detail
    assert "error" in (page.get_attribute("#status", "class") or "")
    assert page.eval_on_selector_all("#results .result", "els => els.length") == 0
    assert page.is_hidden("#probs")


# ---------------------------------------------------------------------- relevance feedback


def _is_feedback(response: Any) -> bool:
    return response.request.method == "POST" and response.url.split("?")[0].endswith("/api/search/feedback")


def _marks(page: Any) -> dict[int, dict[str, str]]:
    """Per card id: the ``aria-pressed`` of its relevant / not relevant toggles."""
    return {int(k): v for k, v in page.eval_on_selector_all(
        "#results .card",
        """els => Object.fromEntries(els.map(e => [e.dataset.id, {
            relevant: e.querySelector('.mark-relevant').getAttribute('aria-pressed'),
            irrelevant: e.querySelector('.mark-irrelevant').getAttribute('aria-pressed'),
        }]))""",
    ).items()}


def _expected_marks(ids: list[int], relevant: set[int], irrelevant: set[int]) -> dict[int, dict[str, str]]:
    return {i: {"relevant": str(i in relevant).lower(), "irrelevant": str(i in irrelevant).lower()} for i in ids}


def _refined(archive: Any, query_vector: Any, relevant: list[int], irrelevant: list[int], k: int,
             exclude: int | None = None) -> list[int]:
    """The archive's hits for Rocchio's refined query, computed directly (default weights)."""
    import numpy as np

    from landlens.retrieval.feedback import rocchio

    def stack(ids: list[int]) -> Any:
        return np.stack([archive.vector(i) for i in ids]) if ids else np.zeros((0, archive.dim), np.float32)

    q = rocchio(query_vector, stack(relevant), stack(irrelevant))
    return _ids(archive.search_vectors(q[None], k, exclude=[exclude] if exclude is not None else None)[0])


def _click_mark(page: Any, card_id: int, kind: str) -> None:
    page.click(f'#results .card[data-id="{card_id}"] .mark-{kind}')


def test_relevance_feedback_rounds(browser: Any, archive_env: dict[str, Any],
                                   open_page: Callable[..., Any]) -> None:
    """Mark results, refine twice (round 1, round 2), then refine a search by an indexed image:
    each grid equals Rocchio + ``search_vectors`` computed here; marks persist by id; the
    toggles never start a search."""
    archive, query, query_path = archive_env["archive"], archive_env["query"], archive_env["query_path"]
    page = open_page(1280, 900)
    searches: list[str] = []
    page.on("request", lambda r: searches.append(r.url) if "/api/search" in r.url else None)
    page.fill("#k", str(K))
    page.locator("#k").blur()
    assert page.is_hidden("#feedback-bar")
    upload = _search(page, lambda: page.set_input_files("#file-input", str(query_path)), _is_upload_search)
    token = upload.json()["query_token"]
    assert isinstance(token, str) and len(token) >= 16
    q_vec = archive.embed([archive.load_query(query_path)])[0]
    cards = _cards(page)
    assert [c["id"] for c in cards] == _ids(_upload_reference(archive, query_path, K))
    assert page.is_visible("#feedback-bar") and page.is_disabled("#refine")
    assert _marks(page) == _expected_marks([c["id"] for c in cards], set(), set())

    # mark one image of the query's class relevant and one of another class not relevant
    rel = next(c["id"] for c in cards if c["cls"] == query.class_name and c["id"] != query.id)
    irr = next(c["id"] for c in cards if c["cls"] != query.class_name)
    n_searches = len(searches)
    _click_mark(page, rel, "relevant")
    _click_mark(page, irr, "irrelevant")
    # toggling twice unmarks; switching kind moves the mark
    _click_mark(page, irr, "relevant")
    _click_mark(page, irr, "irrelevant")
    assert len(searches) == n_searches  # the toggles did not search with the card's image
    assert _marks(page) == _expected_marks([c["id"] for c in cards], {rel}, {irr})
    assert page.get_attribute(f'#results .card[data-id="{rel}"]', "class") == "card is-relevant"
    assert page.text_content("#marks-summary") == "1 relevant, 1 not relevant marked."
    assert page.is_enabled("#refine")

    # round 1
    response = _search(page, lambda: page.click("#refine"), _is_feedback)
    assert response.status == 200
    sent = response.request.post_data_json
    assert sent == {"query": {"vector_token": token}, "relevant": [rel], "irrelevant": [irr], "k": K}
    ids1 = [c["id"] for c in _cards(page)]
    assert ids1 == _refined(archive, q_vec, [rel], [irr], K)
    assert ids1 != [c["id"] for c in cards]  # the marks changed the grid
    ms = int(response.json()["timing_ms"]["total"] + 0.5)
    assert page.text_content("#status") == f"round 1: {K} results in {ms} ms"
    assert rel in ids1
    assert _marks(page) == _expected_marks(ids1, {rel}, {irr})  # marks persist on the new cards
    assert all(w > 0 for w in _wait_thumbnails(page))
    _shot(page, "feedback.png")

    # round 2: one more image not relevant; the marks of round 1 are sent again
    irr2 = next(i for i in reversed(ids1) if i not in (rel, irr) and archive.record(i).class_name != query.class_name)
    _click_mark(page, irr2, "irrelevant")
    response = _search(page, lambda: page.click("#refine"), _is_feedback)
    assert response.request.post_data_json == {"query": {"vector_token": token}, "relevant": [rel],
                                               "irrelevant": [irr, irr2], "k": K}
    ids2 = [c["id"] for c in _cards(page)]
    assert ids2 == _refined(archive, q_vec, [rel], [irr, irr2], K)
    assert page.text_content("#status").startswith(f"round 2: {K} results in ")
    assert _marks(page) == _expected_marks(ids2, {rel}, {irr, irr2})

    # the class filter re-runs the refined query (same round) with the class
    other = archive.classes[1]
    response = _search(page, lambda: page.select_option("#class-filter", other), _is_feedback)
    assert response.request.post_data_json["class"] == other
    assert page.text_content("#status").startswith("round 2: ")
    _search(page, lambda: page.select_option("#class-filter", ""), _is_feedback)
    assert [c["id"] for c in _cards(page)] == ids2

    # clicking a card is a new query (by id): marks are cleared, round 0
    second = ids2[1]
    _search(page, lambda: page.click(f'#results .result[data-id="{second}"]'),
            lambda r: f"/api/search/{second}?" in r.url)
    ids = [c["id"] for c in _cards(page)]
    assert ids == _ids(archive.search_id(second, K))
    assert _marks(page) == _expected_marks(ids, set(), set())
    assert page.is_disabled("#refine")
    assert not page.text_content("#status").startswith("round")

    # refine the indexed query: sent by id, the query itself left out
    mark = ids[0]
    _click_mark(page, mark, "relevant")
    response = _search(page, lambda: page.click("#refine"), _is_feedback)
    assert response.request.post_data_json == {"query": {"id": second}, "relevant": [mark],
                                               "irrelevant": [], "k": K}
    ids = [c["id"] for c in _cards(page)]
    assert ids == _refined(archive, archive.vector(second), [mark], [], K, exclude=second)
    assert second not in ids
    assert page.text_content("#status").startswith("round 1: ")

    # keyboard: Space on a focused toggle marks it
    target = ids[-1]
    page.focus(f'#results .card[data-id="{target}"] .mark-irrelevant')
    page.keyboard.press("Space")
    assert _marks(page)[target] == {"relevant": "false", "irrelevant": "true"}
    page.click("#clear-marks")
    assert page.is_disabled("#refine") and set(v["relevant"] for v in _marks(page).values()) == {"false"}
    assert page.problems == []


def test_relevance_feedback_on_a_phone_and_an_expired_token(browser: Any, archive_env: dict[str, Any],
                                                            open_page: Callable[..., Any]) -> None:
    """At 360 px the toggles and the Refine bar fit; when the server answers 410 (the uploaded
    query's token expired) the page uploads the query again and refines with the new token."""
    archive, query, query_path = archive_env["archive"], archive_env["query"], archive_env["query_path"]
    page = open_page(360, 740, device_scale_factor=2, is_mobile=True, has_touch=True)
    page.fill("#k", str(K))
    page.locator("#k").blur()
    first = _search(page, lambda: page.set_input_files("#file-input", str(query_path)), _is_upload_search)
    old_token = first.json()["query_token"]
    cards = _cards(page)
    rel = next(c["id"] for c in cards if c["cls"] == query.class_name and c["id"] != query.id)
    page.tap(f'#results .card[data-id="{rel}"] .mark-relevant')
    assert _marks(page)[rel] == {"relevant": "true", "irrelevant": "false"}

    calls: list[dict[str, Any]] = []

    def feedback(route: Any) -> None:
        calls.append(route.request.post_data_json)
        if len(calls) == 1:  # the server "forgot" the token
            route.fulfill(status=410, json={"detail": "query token expired or unknown"})
        else:
            route.continue_()

    page.route(re.compile(r".*/api/search/feedback$"), feedback)
    with page.expect_response(_is_upload_search) as again:
        _search(page, lambda: page.tap("#refine"), lambda r: _is_feedback(r) and r.status == 200)
    new_token = again.value.json()["query_token"]
    assert new_token != old_token
    assert [c["query"] for c in calls] == [{"vector_token": old_token}, {"vector_token": new_token}]
    q_vec = archive.embed([archive.load_query(query_path)])[0]
    ids = [c["id"] for c in _cards(page)]
    assert ids == _refined(archive, q_vec, [rel], [], K)
    assert page.text_content("#status").startswith("round 1: ")
    assert _marks(page)[rel]["relevant"] == "true"
    assert all(w > 0 for w in _wait_thumbnails(page))

    # nothing scrolls sideways; toggles and the bar stay on screen, toggles are touch-sized
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 360
    rights = page.eval_on_selector_all("#results .card, #results .mark, #refine, #clear-marks, #marks-summary",
                                       "els => els.map(e => e.getBoundingClientRect().right)")
    assert max(rights) <= 360
    heights = page.eval_on_selector_all("#results .mark", "els => els.map(e => e.getBoundingClientRect().height)")
    assert min(heights) >= 36
    _shot(page, "feedback-mobile.png")
    assert [p for p in page.problems if "status of 410" not in p] == []


# ---------------------------------------------------------------------- security headers, docs


def test_page_obeys_its_content_security_policy(browser: Any, archive_env: dict[str, Any],
                                                open_page: Callable[..., Any], server_url: str) -> None:
    """The page, a search (the preview is a blob: URL), thumbnails and a click run under the
    server's CSP without one violation; an inline script is refused (the check can fail)."""
    page = open_page(1280, 900, goto=False)
    response = page.goto(server_url + "/")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    page.fill("#k", str(K))
    page.locator("#k").blur()
    _search(page, lambda: page.set_input_files("#file-input", str(archive_env["query_path"])), _is_upload_search)
    page.wait_for_function("() => document.getElementById('query-preview').complete")
    assert all(w > 0 for w in _wait_thumbnails(page))
    _search(page, lambda: page.click("#results .result >> nth=1"), lambda r: "/api/search/" in r.url)
    assert _csp_violations(page) == []
    assert page.problems == []

    # the listener works: markup injected at run time cannot run inline code
    page.evaluate("""() => {
        const s = document.createElement('script');
        s.textContent = 'window.__inline = 1';
        document.body.appendChild(s);
    }""")
    page.wait_for_function("() => window.__csp.length > 0")
    assert page.evaluate("() => window.__inline") is None
    assert _csp_violations(page) == ["script-src-elem blocked inline"]


def test_docs_render_offline(browser: Any, open_page: Callable[..., Any], server_url: str) -> None:
    """/docs renders Swagger UI from this server alone (every other origin is cut off, as on a
    machine without internet), with no CSP violation."""
    page = open_page(1280, 900, goto=False)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.context.route(lambda url: not url.startswith(server_url), lambda route: route.abort())
    page.goto(server_url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "landlens search service" in page.text_content(".swagger-ui .info .title")
    page.wait_for_function("() => document.querySelectorAll('.swagger-ui .opblock').length >= 9")
    page.click(".opblock-summary-path[data-path='/api/health']")  # expand one operation
    page.wait_for_selector(".opblock.is-open")
    assert requested and all(u.startswith(server_url + "/") for u in requested), requested
    assert _csp_violations(page) == []
    assert page.problems == []
    _shot(page, "docs.png")


# ---------------------------------------------------------------------- search by words


@pytest.fixture(scope="module")
def words_url(archive_env: dict[str, Any]) -> Iterator[str]:
    """A copy of the test archive with an alignment attached, behind a real uvicorn."""
    import shutil

    from fixtures.words import captioned_alignment

    from landlens.service.app import create_app

    tmp = archive_env["tmp"]
    shutil.copytree(archive_env["dir"], tmp / "words_archive")
    captioned_alignment(archive_env["data"], tmp / "words_archive", tmp / "align.safetensors")
    with _serve(create_app(tmp / "words_archive")) as url:
        yield url


def _is_text_search(response: Any) -> bool:
    return response.url.endswith("/api/search/text") and response.request.method == "POST"


def test_search_by_words(browser: Any, archive_env: dict[str, Any], words_url: str,
                         open_page: Callable[..., Any]) -> None:
    """The text box searches by words; 'with the last query image' combines the two; feedback
    marks refine a text query; the cards are the archive's own answers."""
    from landlens.retrieval.archive import Archive

    archive = Archive.open(archive_env["tmp"] / "words_archive")
    cls = archive.classes[1]
    page = open_page(1280, 900, url=words_url)
    page.wait_for_selector("#text-form:not([hidden])")
    assert page.is_disabled("#text-combine")  # no image query yet
    page.fill("#k", str(K))
    page.locator("#k").blur()
    sentence = f"there is {cls} in the image"
    page.fill("#text-query", sentence)
    _search(page, lambda: page.click("#text-submit"), _is_text_search)
    cards = _cards(page)
    assert [c["id"] for c in cards] == _ids(archive.search_text(sentence, K))
    assert cards[0]["cls"] == cls
    assert all(w > 0 for w in _wait_thumbnails(page))
    _shot(page, "search_words.png")

    # mark the first result relevant and the last one not, refine: Rocchio in the shared space
    first, last = cards[0]["id"], cards[-1]["id"]
    _click_mark(page, first, "relevant")
    _click_mark(page, last, "irrelevant")
    _search(page, lambda: page.click("#refine"), _is_text_search)
    want = archive.search_text(sentence, K, relevant=[first], irrelevant=[last])
    assert [c["id"] for c in _cards(page)] == _ids(want)

    # an indexed image, then the same sentence with it (Enter in the text box submits)
    other = _cards(page)[2]["id"]
    _search(page, lambda: page.click("#results .result >> nth=2"), lambda r: f"/api/search/{other}?" in r.url)
    assert page.is_enabled("#text-combine")
    page.check("#text-combine")
    page.fill("#text-query", "with many trees")
    _search(page, lambda: page.press("#text-query", "Enter"), _is_text_search)
    want = archive.search_text("with many trees", K, image=other)
    assert [c["id"] for c in _cards(page)] == _ids(want)
    assert page.problems == [] and _csp_violations(page) == []


# ---------------------------------------------------------------------- scenes


@pytest.fixture(scope="module")
def scene_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An archive of the 64-px chips of a generated UTM scene (320 x 256 px) behind uvicorn."""
    from fixtures.scenes import utm_scene
    from fixtures.weights import require

    require("rasterio", "pyproj", why="scene archives (pip install 'landlens[scenes]')")
    from landlens.retrieval.archive import Archive
    from landlens.service.app import create_app

    tmp = tmp_path_factory.mktemp("browser_scene")
    scene = utm_scene(tmp / "utm.tif")[0]
    arch = Archive.build_from_scenes([scene], tmp / "scene.archive", chip=64, backbone="lbp_rgb", rerank=None,
                                     workers=0, progress=False)
    with _serve(create_app(tmp / "scene.archive", optimize="none")) as url:
        yield {"url": url, "archive": arch, "scene": scene}


def test_scene_view_draws_the_hits_and_searches_where_clicked(browser: Any, open_page: Callable[..., Any],
                                                               scene_env: dict[str, Any]) -> None:
    """A click on the scene searches with the chip there: the cards are the archive's own answer
    for that chip, and the query's and hits' windows are drawn where they lie on the scene."""
    arch = scene_env["archive"]
    page = open_page(1280, 900, url=scene_env["url"])
    page.wait_for_selector("#scene-view:not([hidden])")
    page.wait_for_function("() => { const i = document.getElementById('scene-image'); "
                           "return i.complete && i.naturalWidth > 0; }")
    page.fill("#k", "4")
    page.locator("#k").blur()
    box = page.locator("#scene-image").bounding_box()
    x, y = box["x"] + box["width"] * 150 / 320, box["y"] + box["height"] * 80 / 256  # inside window (128, 64)
    _search(page, lambda: page.mouse.click(x, y), lambda r: "/api/search/at" in r.url)
    chip = next(r for r in arch.records() if arch.geo(r.id).window == (128, 64, 64, 64))
    want = arch.search_vectors(arch.embed([arch.load_query(chip.path)]), 4)[0]
    assert [c["id"] for c in _cards(page)] == _ids(want) and want[0].record.id == chip.id
    rects = page.eval_on_selector_all(
        "#scene-overlay rect", "els => els.map(e => [e.getAttribute('class'), ...['x', 'y', 'width', 'height']"
                               ".map(a => Number(e.getAttribute(a)))])")
    assert rects[-1] == ["query", 128, 64, 64, 64]  # drawn last, on top of the hits
    assert sorted(tuple(r[1:]) for r in rects[:-1]) == sorted(tuple(arch.geo(h.record.id).window) for h in want)
    assert page.locator("#scene-image").bounding_box() == box  # the view did not move under the pointer
    # the header's archive line arrives from /api/health whenever it comes: its line is reserved,
    # so the scene does not move when it is filled (it did on a slow machine, under the pointer)
    page.evaluate("document.getElementById('archive-info').textContent = ''")
    assert page.locator("#scene-image").bounding_box() == box
    drawn = page.locator("#scene-overlay rect.query").bounding_box()  # on screen, around the click
    assert drawn["x"] <= x <= drawn["x"] + drawn["width"] and drawn["y"] <= y <= drawn["y"] + drawn["height"]
    assert abs(drawn["width"] - box["width"] * 64 / 320) <= 4  # the box includes the 3 px stroke
    _shot(page, "scene-view.png")
    assert page.problems == [] and _csp_violations(page) == []
