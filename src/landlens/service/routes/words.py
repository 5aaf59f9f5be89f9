"""Search by words: a sentence (optionally with an image, optionally refined by feedback), and
zero-shot labels of an upload with any class names.

Both need an archive with an attached image-text alignment (``landlens index text``); without
one they answer 409 naming the command. A text query costs one text encoding and one scan of
the archive's projected vectors (:mod:`landlens.retrieval.textsearch`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from landlens.errors import LandlensError, first_line
from landlens.service.common import ServiceError, Timer, clamp_k
from landlens.service.models import MAX_TEXT_CHARS, TextSearchRequest
from landlens.service.routes.search import read_marks
from landlens.service.state import SearchService, get_service

Service = Annotated[SearchService, Depends(get_service)]

MAX_LABELS = 100
"""Most class names one zero-shot request may name."""


def _require_text(service: SearchService) -> None:
    if not service.archive.has_text:
        raise ServiceError(409, "this archive answers no text queries: attach an alignment with "
                                "`landlens index text ARCHIVE ALIGNMENT` and restart or wait for the reload")


def words_router(max_k: int) -> APIRouter:
    """The routes of search by words, with ``k`` limited to ``max_k``."""
    router = APIRouter(tags=["words"])

    @router.post("/api/search/text")
    async def search_text(service: Service, body: TextSearchRequest) -> JSONResponse:
        """Search the archive by a sentence; with ``image`` ({"id": N} or {"vector_token": T} of an
        upload), by the image combined with the sentence (``image_weight`` its share); with
        ``relevant`` / ``irrelevant`` ids, refined by Rocchio in the shared space (send the
        same sentence and every mark so far on each round)."""
        from landlens.retrieval.feedback import FeedbackError
        from landlens.retrieval.generations import UnknownImageError

        await run_in_threadpool(service.refresh)
        _require_text(service)
        timer = Timer()
        text = body.text.strip() if body.text is not None else None
        if not text and body.image is None:
            raise ServiceError(422, "text: give a sentence (or an image with one)")
        relevant, irrelevant, cls, weights = read_marks(service, body, max_k, required=False)
        image: Any = None
        query: dict[str, Any] = {"text": text}
        if body.image is not None:
            if (body.image.id is None) == (body.image.vector_token is None):
                raise ServiceError(422, "image: give exactly one of 'id' (an indexed image) or 'vector_token'")
            vector, described, image_id = await run_in_threadpool(service.query_vector, body.image)
            image = image_id if image_id is not None else vector
            query["image"] = described
        available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
        if isinstance(image, int) and (cls is None or query["image"].get("class") == cls):
            available -= 1
        kk = clamp_k(body.k, available)
        t = time.perf_counter()
        try:
            hits = await run_in_threadpool(
                lambda: service.archive.search_text(text or None, kk, image=image, image_weight=body.image_weight,
                                                    class_name=cls, relevant=relevant, irrelevant=irrelevant,
                                                    weights=weights)) if kk else []
        except UnknownImageError as exc:
            raise ServiceError(404, first_line(exc)) from None
        except (FeedbackError, LandlensError) as exc:
            raise ServiceError(422, first_line(exc)) from None
        timer.add("search", t)
        timing = timer.finish()
        out = {"k": kk, "class": cls, "query": query, "image_weight": body.image_weight if image is not None else None,
               "results": await run_in_threadpool(service.hits_json, hits), "classification": None,
               **({"feedback": {"method": "rocchio", "weights": weights.to_dict(), "relevant": relevant,
                                "irrelevant": irrelevant}} if relevant or irrelevant else {}),
               "timing_ms": timing}
        return JSONResponse(out, headers={"Server-Timing": Timer.header(timing)})

    @router.post("/api/labels")
    async def zero_shot_labels(
        service: Service,
        file: Annotated[UploadFile, File(description="image to label")],
        classes: Annotated[str, Form(max_length=MAX_TEXT_CHARS * 4,
                                     description="comma-separated class names, e.g. 'forest,river,sea or lake'")],
    ) -> JSONResponse:
        """Zero-shot labels of an uploaded image: the probability of each named class (never
        trained on) by the attached alignment's prompt ensembles."""
        _require_text(service)
        names = list(dict.fromkeys(c.strip() for c in classes.split(",") if c.strip()))
        if not 2 <= len(names) <= MAX_LABELS or any(len(n) > 200 for n in names):
            raise ServiceError(422, f"classes: name 2 to {MAX_LABELS} distinct classes of at most 200 characters")
        timer = Timer()
        probs = await service.on_upload(file, timer, lambda image: service.archive.zero_shot([image], names), "label")
        order = sorted(range(len(names)), key=lambda i: -float(probs[0][i]))
        timing = timer.finish()
        return JSONResponse({"labels": [{"class": names[i], "probability": float(probs[0][i])} for i in order],
                             "timing_ms": timing}, headers={"Server-Timing": Timer.header(timing)})

    return router


__all__ = ["words_router"]
