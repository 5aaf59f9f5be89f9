"""Scene routes: the scenes an archive's chips come from, and each scene's overview image, for
the page's scene view (the hits drawn on the scene, a click searching at that place)."""

from __future__ import annotations

import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from landlens.service.common import ServiceError
from landlens.service.state import SearchService, get_service

OVERVIEW_SIDE = 1024
"""Longest side of a scene's overview image, in pixels."""

Service = Annotated[SearchService, Depends(get_service)]

router = APIRouter(tags=["scenes"])


@router.get("/api/scenes")
async def scenes(service: Service) -> dict[str, Any]:
    """The scenes of the archive's chips (none for an archive of image files): ``index``,
    ``name``, ``chips``, the chip grid's ``width`` and ``height`` in pixels, ``crs``, ``gsd``
    and the URL of the scene's ``overview`` (no server path)."""
    await run_in_threadpool(service.refresh)
    listed = await run_in_threadpool(service.scenes)
    return {"scenes": [{"index": sc["index"], "name": sc["name"], "chips": sc["chips"], "width": sc["width"],
                        "height": sc["height"], "crs": sc["crs"], "gsd": sc["gsd"],
                        "overview": f"/api/scenes/{sc['index']}/overview.png"} for sc in listed]}


def _overview_png(ref: str) -> bytes:
    from PIL import Image

    from landlens.scenes.reader import Scene
    from landlens.scenes.refs import parse_chip_ref

    with Scene.from_ref(parse_chip_ref(ref)) as sc:  # type: ignore[arg-type]
        rgb = sc.overview(OVERVIEW_SIDE)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@router.get("/api/scenes/{index:int}/overview.png", responses={200: {"content": {"image/png": {}}}})
async def overview(service: Service, index: Annotated[int, PathParam(ge=0)]) -> Response:
    """The whole scene as a PNG, longest side at most 1024 pixels, read as the archive reads its
    chips (bands, stretch, GSD); it covers the chip grid exactly, so a window ``(col, row, w,
    h)`` is drawn at ``col * image width / grid width`` and so on."""
    listed = await run_in_threadpool(service.scenes)
    if index >= len(listed):
        raise ServiceError(404, f"no scene {index} in the archive ({len(listed)} scenes)")
    sc = listed[index]
    key = (sc["path"], sc["ref"])
    data = service.overviews.get(key)
    if data is None:
        data = await run_in_threadpool(_overview_png, sc["ref"])
        service.overviews[key] = data
        while len(service.overviews) > 8:
            service.overviews.pop(next(iter(service.overviews)))
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


__all__ = ["router"]
