"""The API docs at ``/docs``, served whole from the package: Swagger UI's files come from the
``swagger-ui-py`` package (``swagger_ui/static``), so the page renders on a machine without
internet (FastAPI's default loads them from a CDN).

The page is FastAPI's own (:func:`fastapi.openapi.docs.get_swagger_ui_html`) pointed at
``/docs/assets/``; its one inline start-up script is allowed by its SHA-256 in the page's own
Content-Security-Policy (:func:`docs_csp`), not by ``'unsafe-inline'``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from landlens.service.common import ServiceError

DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"

DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
"""The Swagger UI files the docs page loads, with their media types."""

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files in the installed ``swagger-ui-py`` package, or ``None``."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in DOCS_ASSETS) else None


def docs_html(title: str, openapi_url: str) -> str:
    """The HTML of the docs page, every URL in it on this server."""
    return get_swagger_ui_html(openapi_url=openapi_url, title=f"{title} - API docs",
                               swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                               swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
                               oauth2_redirect_url=OAUTH2_REDIRECT_URL).body.decode("utf-8")


def script_hashes(*pages: str) -> list[str]:
    """CSP sources (``'sha256-...'``) of the inline scripts of the HTML ``pages``."""
    out = []
    for page in pages:
        for script in _INLINE_SCRIPT.findall(page):
            digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
            out.append(f"'sha256-{digest}'")
    return out


def docs_csp(title: str, openapi_url: str) -> str:
    """The Content-Security-Policy of the docs pages: same-origin files, the inline start-up
    scripts by hash, inline styles (Swagger UI sets some), data: images (its icons)."""
    hashes = " ".join(script_hashes(docs_html(title, openapi_url),
                                    get_swagger_ui_oauth2_redirect_html().body.decode("utf-8")))
    return (f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def docs_router(title: str, openapi_url: str) -> APIRouter:
    """``GET /docs``, ``GET /docs/oauth2-redirect`` and ``GET /docs/assets/{name}``."""
    router = APIRouter(include_in_schema=False)
    assets = swagger_ui_dir()
    page = docs_html(title, openapi_url)

    @router.get(DOCS_URL)
    async def docs_page() -> HTMLResponse:
        if assets is None:
            raise ServiceError(404, "the API docs need the swagger-ui-py package (pip install swagger-ui-py)")
        return HTMLResponse(page)

    @router.get(OAUTH2_REDIRECT_URL)
    async def docs_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get(ASSETS_URL + "/{name}")
    async def docs_asset(name: str) -> Response:
        media = DOCS_ASSETS.get(name)
        if media is None or assets is None:
            raise ServiceError(404, "no such file")
        return FileResponse(assets / name, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    return router


__all__ = ["ASSETS_URL", "DOCS_ASSETS", "DOCS_URL", "OAUTH2_REDIRECT_URL", "docs_csp", "docs_html", "docs_router",
           "script_hashes", "swagger_ui_dir"]
