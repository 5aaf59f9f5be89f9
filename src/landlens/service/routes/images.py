"""Archive image routes: one image's record and thumbnail, adding and removing images (token)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from landlens.service.auth import check_token
from landlens.service.common import ServiceError, Timer, class_param, etag_matches
from landlens.service.state import SearchService, get_service
from landlens.service.thumbnails import thumbnail_size

THUMBNAIL_MIN, THUMBNAIL_MAX, THUMBNAIL_DEFAULT = 32, 512, 256
THUMBNAIL_CACHE_CONTROL = "public, max-age=3600"

Service = Annotated[SearchService, Depends(get_service)]


def require_token(service: Service, authorization: Annotated[str | None, Header()] = None) -> None:
    """FastAPI dependency of the write routes: 401/403 without a valid token."""
    refused = check_token(service.token, authorization)
    if refused is not None:
        raise ServiceError(refused[0], refused[1])


router = APIRouter(tags=["archive"])


@router.get("/api/images/{image_id:int}")
async def image_record(service: Service, image_id: Annotated[int, PathParam(ge=0)]) -> dict[str, Any]:
    """The record of one indexed image (no server path)."""
    await run_in_threadpool(service.refresh)
    return service.record_or_404(image_id).to_dict()


@router.get("/api/images/{image_id:int}/thumbnail",
            responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "not modified"}})
async def thumbnail(
    service: Service,
    image_id: Annotated[int, PathParam(ge=0)],
    size: Annotated[int, Query(ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX)] = THUMBNAIL_DEFAULT,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A JPEG thumbnail of an indexed image, longest side at most ``size`` pixels: ``size`` is
    served at the smallest of the fixed sizes 128, 256, 512 that is at least as large (the
    ETag names the size served); an image smaller than that is not enlarged."""
    timer = Timer()
    record = service.record_or_404(image_id)
    served = thumbnail_size(size)
    etag = f'"{record.sha256}-{served}"'
    headers = {"ETag": etag, "Cache-Control": THUMBNAIL_CACHE_CONTROL}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    t = time.perf_counter()
    data = await service.thumbnails.get(record, served)
    timer.add("thumbnail", t)
    headers["Server-Timing"] = Timer.header(timer.finish())
    return Response(data, media_type="image/jpeg", headers=headers)


@router.post("/api/images", status_code=201, dependencies=[Depends(require_token)])
async def add_image(
    service: Service,
    file: Annotated[UploadFile, File(description="image to add")],
    class_name: Annotated[str | None, Form(alias="class", description="its class (optional)")] = None,
) -> JSONResponse:
    """Add an uploaded image to the archive (needs the token). 409 when it is already there."""
    timer = Timer()
    cls = class_param(class_name)
    saved = await service.receive(file, timer)
    try:
        t = time.perf_counter()
        async with service.decoding(saved):  # the decode budget (the upload is decoded to check it, then indexed)
            t = timer.add("wait", t)
            record = await run_in_threadpool(service.add_upload, saved, cls)
            timer.add("add", t)
    finally:
        await run_in_threadpool(saved.remove)
    timing = timer.finish()
    return JSONResponse({**record.to_dict(), "thumbnail": f"/api/images/{record.id}/thumbnail"},
                        status_code=201,
                        headers={"Location": f"/api/images/{record.id}", "Server-Timing": Timer.header(timing)})


@router.delete("/api/images/{image_id:int}", dependencies=[Depends(require_token)])
async def delete_image(service: Service, image_id: Annotated[int, PathParam(ge=0)]) -> dict[str, int]:
    """Remove an image from the archive (needs the token)."""
    removed = await run_in_threadpool(service.remove, image_id)
    return {"removed": removed}


__all__ = ["THUMBNAIL_CACHE_CONTROL", "THUMBNAIL_DEFAULT", "THUMBNAIL_MAX", "THUMBNAIL_MIN", "require_token",
           "router"]
