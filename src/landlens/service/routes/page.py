"""The web page: ``GET /`` (``static/index.html``) and its assets under ``/static/``
(:class:`PageFiles`, Starlette's ``StaticFiles`` with ``Cache-Control: no-cache``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from landlens.service.common import ServiceError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
"""Folder of the web page (``index.html``, ``app.js``, ``style.css``)."""

NO_CACHE = {"Cache-Control": "no-cache"}
"""The page and its assets are revalidated on every load (ETag / Last-Modified), so an
upgraded package is seen at once."""


class PageFiles(StaticFiles):
    """``StaticFiles`` (which refuses paths that leave its folder) answering with
    ``Cache-Control: no-cache``, and 404 ``no such file`` in the service's JSON form."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Any,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(NO_CACHE)
        return response

    async def get_response(self, path: str, scope: Any) -> Response:
        try:
            return await super().get_response(path, scope)
        except StarletteHTTPException as exc:
            if exc.status_code in (401, 404):
                raise ServiceError(404, "no such file") from None
            raise


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index_page() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise ServiceError(404, "the web page is not installed (static/index.html missing)")
    return FileResponse(page, media_type="text/html; charset=utf-8", headers=NO_CACHE)


__all__ = ["NO_CACHE", "STATIC_DIR", "PageFiles", "router"]
