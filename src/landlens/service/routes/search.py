"""Search routes: by an uploaded image, by an indexed image, and relevance feedback."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from landlens.errors import LandlensError, first_line
from landlens.service.common import ServiceError, Timer, clamp_k, class_param
from landlens.service.models import MAX_FEEDBACK_IDS, FeedbackRequest, FeedbackWeights, MarkedSearch
from landlens.service.state import SearchService, get_service

Service = Annotated[SearchService, Depends(get_service)]
FORMAT_HELP = "json: landlens's JSON; geojson: an RFC 7946 FeatureCollection, one WGS84 polygon per hit (chips of scenes)"
GEOJSON = "application/geo+json"


def geojson_response(service: SearchService, query: str, hits: list[Any],
                     place: tuple[float, float] | None = None) -> JSONResponse:
    """The hits as ``application/geo+json`` (:func:`landlens.retrieval.geo.results_geojson`):
    ``query`` is the query's chip reference or file name, ``place`` the WGS84 point asked for."""
    from landlens.retrieval.geo import results_geojson
    from landlens.retrieval.search import SearchResult

    doc = results_geojson(service.archive, [SearchResult(query, None, hits)], places=[place])
    return JSONResponse(doc, media_type=GEOJSON)


def read_marks(service: SearchService, body: MarkedSearch, max_k: int, *,
               required: bool) -> tuple[list[int], list[int], str | None, Any]:
    """The checked feedback part of a search body: ``(relevant, irrelevant, class, Rocchio
    weights)``, duplicates dropped; 422 naming the field for too many or contradictory marks
    (or none when ``required``), a ``k`` above ``max_k``, an unknown class or bad weights."""
    from landlens.retrieval.feedback import FeedbackError, RocchioWeights

    relevant = list(dict.fromkeys(int(i) for i in body.relevant))
    irrelevant = list(dict.fromkeys(int(i) for i in body.irrelevant))
    if required and not relevant and not irrelevant:
        raise ServiceError(422, "relevant, irrelevant: mark at least one image relevant or not relevant")
    if len(relevant) + len(irrelevant) > MAX_FEEDBACK_IDS:
        raise ServiceError(422, f"relevant, irrelevant: at most {MAX_FEEDBACK_IDS} marked images, "
                                f"got {len(relevant) + len(irrelevant)}")
    both = sorted(set(relevant) & set(irrelevant))
    if both:
        raise ServiceError(422, f"image {both[0]} is marked both relevant and not relevant")
    if body.k > max_k:
        raise ServiceError(422, f"k: Input should be less than or equal to {max_k}")
    cls = class_param(body.class_name)
    service.check_class(cls)
    w = body.weights or FeedbackWeights()
    try:
        weights = RocchioWeights(w.a, w.b, w.c)
    except FeedbackError as exc:
        raise ServiceError(422, f"weights: {first_line(exc)}") from None
    return relevant, irrelevant, cls, weights


def search_router(max_k: int) -> APIRouter:
    """The search routes, with ``k`` limited to ``max_k`` (in validation and in the OpenAPI schema)."""
    router = APIRouter(tags=["search"])

    @router.post("/api/search")
    async def search_upload(
        service: Service,
        file: Annotated[UploadFile, File(description="query image (JPEG, PNG, TIFF, GIF, BMP or WebP)")],
        k: int = Form(12, ge=1, le=max_k, description="number of results"),  # max_k: not in an annotation
        class_name: Annotated[str | None, Form(alias="class", description="only images of this class")] = None,
        fmt: Annotated[str, Form(alias="format", pattern="^(json|geojson)$", description=FORMAT_HELP)] = "json",
    ) -> JSONResponse:
        """Search the archive with an uploaded image."""
        await run_in_threadpool(service.refresh)
        timer = Timer()
        cls = class_param(class_name)
        service.check_class(cls)
        saved = await service.receive(file, timer)
        try:
            t = time.perf_counter()
            async with service.decoding(saved):  # the decode budget, held while the pixels live
                t = timer.add("wait", t)
                image = await run_in_threadpool(service.decode, saved)
                t = timer.add("decode", t)
                width, height = image.width, image.height
                embed = asyncio.wrap_future(service.batcher.submit(image))
                classify = None
                if service.predictor is not None:
                    n = len(service.predictor.classes)
                    classify = asyncio.ensure_future(run_in_threadpool(service.classify, image, min(5, n)))
                del image
                try:
                    vector = await embed
                except BaseException:
                    if classify is not None:
                        classify.cancel()
                    raise
                t = timer.add("embed", t)
                available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
                kk = clamp_k(k, available)
                hits = (await run_in_threadpool(service.archive.search_vectors, np.asarray(vector)[None], kk,
                                                class_name=cls))[0] if kk else []
                t = timer.add("search", t)
                classification = None
                if classify is not None:
                    classification = await classify
                    timer.add("classify", t)
        finally:
            await run_in_threadpool(saved.remove)
        if fmt == "geojson":
            return geojson_response(service, saved.name.replace("#", "_"), hits)
        query = {"id": None, "name": saved.name, "class": None, "width": width, "height": height}
        query_token = service.queries.put(np.asarray(vector), query)  # for relevance feedback
        timing = timer.finish()
        body = {"k": kk, "class": cls, "query": query, "query_token": query_token,
                "results": await run_in_threadpool(service.hits_json, hits), "classification": classification,
                "timing_ms": timing}
        return JSONResponse(body, headers={"Server-Timing": Timer.header(timing)})

    @router.get("/api/search/{image_id:int}")
    async def search_indexed(
        service: Service,
        image_id: Annotated[int, PathParam(ge=0, description="id of an indexed image")],
        k: int = Query(12, ge=1, le=max_k, description="number of results"),  # max_k: not in an annotation
        class_name: Annotated[str | None, Query(alias="class")] = None,
        fmt: Annotated[str, Query(alias="format", pattern="^(json|geojson)$", description=FORMAT_HELP)] = "json",
    ) -> JSONResponse:
        """Search the archive with an indexed image (the image itself is left out)."""
        await run_in_threadpool(service.refresh)
        timer = Timer()
        cls = class_param(class_name)
        record = service.record_or_404(image_id)
        service.check_class(cls)
        available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
        if cls is None or record.class_name == cls:
            available -= 1
        kk = clamp_k(k, available)
        t = time.perf_counter()
        try:
            hits = await run_in_threadpool(service.archive.search_id, image_id, kk, class_name=cls) if kk else []
        except LandlensError:
            if not service.archive.has(image_id):
                raise ServiceError(404, f"no image with id {image_id} in the archive") from None
            raise
        timer.add("search", t)
        if fmt == "geojson":
            return geojson_response(service, record.path, hits)
        timing = timer.finish()
        q = record.to_dict()
        body = {"k": kk, "class": cls,
                "query": {key: q[key] for key in ("id", "name", "class", "width", "height")},
                "results": await run_in_threadpool(service.hits_json, hits), "classification": None, "timing_ms": timing}
        return JSONResponse(body, headers={"Server-Timing": Timer.header(timing)})

    @router.get("/api/search/at")
    async def search_at(
        service: Service,
        lon: Annotated[float | None, Query(ge=-180, le=180, description="longitude, WGS84 degrees")] = None,
        lat: Annotated[float | None, Query(ge=-90, le=90, description="latitude, WGS84 degrees")] = None,
        scene: Annotated[int | None, Query(ge=0, description="instead of lon, lat: a scene (`/api/scenes` index)")] = None,
        col: Annotated[float | None, Query(ge=0, description="with scene: column on its chip grid")] = None,
        row: Annotated[float | None, Query(ge=0, description="with scene: row on its chip grid")] = None,
        k: int = Query(12, ge=1, le=max_k, description="number of results"),  # max_k: not in an annotation
        class_name: Annotated[str | None, Query(alias="class")] = None,
        fmt: Annotated[str, Query(alias="format", pattern="^(json|geojson)$", description=FORMAT_HELP)] = "json",
    ) -> JSONResponse:
        """Search an archive of scenes with a place, given as ``lon``, ``lat`` or as a position
        (``scene``, ``col``, ``row``) on a scene's chip grid: the query is the archive chip holding
        it (the one whose centre is nearest), else a chip of the archive's size centred on it, cut
        from the archive scene holding it; 404 when no scene of the archive holds the place."""
        from landlens.retrieval.generations import ArchiveError
        from landlens.retrieval.geo import grid_place, query_at

        await run_in_threadpool(service.refresh)
        timer = Timer()
        cls = class_param(class_name)
        service.check_class(cls)
        t = time.perf_counter()
        geo, grid = (lon, lat), (scene, col, row)
        by_grid = all(v is not None for v in grid) and all(v is None for v in geo)
        if not by_grid and not (all(v is not None for v in geo) and all(v is None for v in grid)):
            raise ServiceError(422, "give a place as lon and lat, or as scene, col and row")
        if by_grid:
            scenes = await run_in_threadpool(service.scenes)
            if scene >= len(scenes):  # type: ignore[operator]
                raise ServiceError(404, f"no scene {scene} in the archive ({len(scenes)} scenes)")
            try:
                lon, lat = grid_place(scenes[scene], col, row)  # type: ignore[index,arg-type]
            except LandlensError as exc:
                raise ServiceError(422, first_line(exc)) from None
        try:
            ref, what = await run_in_threadpool(query_at, service.archive, lon, lat)
        except ArchiveError as exc:
            raise ServiceError(404, first_line(exc)) from None
        image = await run_in_threadpool(service.archive.load_query, ref)
        t = timer.add("decode", t)
        vector = await asyncio.wrap_future(service.batcher.submit(image))
        t = timer.add("embed", t)
        available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
        kk = clamp_k(k, available)
        hits = (await run_in_threadpool(service.archive.search_vectors, np.asarray(vector)[None], kk,
                                        class_name=cls))[0] if kk else []
        timer.add("search", t)
        if fmt == "geojson":
            return geojson_response(service, ref, hits, (lon, lat))  # type: ignore[arg-type]
        place = await run_in_threadpool(service.place_of_ref, ref)
        query = {"id": None, "name": ref.rsplit("/", 1)[-1], "what": what, "at": [lon, lat], "place": place}
        query_token = service.queries.put(np.asarray(vector), query)  # for relevance feedback
        timing = timer.finish()
        body = {"k": kk, "class": cls, "query": query, "query_token": query_token,
                "results": await run_in_threadpool(service.hits_json, hits), "classification": None,
                "timing_ms": timing}
        return JSONResponse(body, headers={"Server-Timing": Timer.header(timing)})

    @router.post("/api/search/feedback")
    async def search_feedback(service: Service, body: FeedbackRequest) -> JSONResponse:
        """Relevance feedback: refine the query with the images marked relevant and not
        relevant (Rocchio: q' = a q + b mean(relevant) - c mean(not relevant), on L2-normalised
        embeddings; defaults a=1, b=0.75, c=0.15) and search again. The query is an indexed
        image (``{"id": N}``, left out of the results) or an upload (``{"vector_token": T}``,
        the ``query_token`` of its ``POST /api/search``; 410 once expired). Marked images stay
        in the results. Send the original query and every mark so far on each round."""
        await run_in_threadpool(service.refresh)
        timer = Timer()
        q = body.query
        if (q.id is None) == (q.vector_token is None):
            raise ServiceError(422, "query: give exactly one of 'id' (an indexed image) or 'vector_token'")
        relevant, irrelevant, cls, weights = read_marks(service, body, max_k, required=True)
        vector, query, query_id = await run_in_threadpool(service.query_vector, q)
        t = time.perf_counter()
        refined = await run_in_threadpool(service.refine, vector, relevant, irrelevant, weights)
        t = timer.add("refine", t)
        available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
        if query_id is not None and (cls is None or query.get("class") == cls):
            available -= 1
        kk = clamp_k(body.k, available)
        exclude = [query_id] if query_id is not None else None
        hits = (await run_in_threadpool(service.archive.search_vectors, refined[None], kk,
                                        class_name=cls, exclude=exclude))[0] if kk else []
        timer.add("search", t)
        timing = timer.finish()
        out = {"k": kk, "class": cls, "query": query,
               "query_token": q.vector_token if query_id is None else None,
               "results": await run_in_threadpool(service.hits_json, hits), "classification": None,
               "feedback": {"method": "rocchio", "weights": weights.to_dict(),
                            "relevant": relevant, "irrelevant": irrelevant},
               "timing_ms": timing}
        return JSONResponse(out, headers={"Server-Timing": Timer.header(timing)})

    return router


__all__ = ["geojson_response", "read_marks", "search_router"]
