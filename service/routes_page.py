"""The page at ``/``: static HTML, CSS and JS from ``service/static`` (no build step, no framework).

The page calls the same API as any client (``/v1/model``, ``/predict``), with the API key the user
types, so it needs no route of its own and no key of its own. Only the files present when the app is
built are served, by exact name.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from service.errors import ServiceError

STATIC_DIR = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


class NotFound(ServiceError):
    status = 404
    error_type = "not_found"


def page_router() -> APIRouter:
    files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in _TYPES}
    router = APIRouter(tags=["page"])

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(files["index.html"], media_type=_TYPES[".html"])

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise NotFound(f"no static file {name!r}")
        return FileResponse(path, media_type=_TYPES[path.suffix], headers={"cache-control": "no-cache"})

    return router
