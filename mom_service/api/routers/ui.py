"""`/ui`: the web pages (an index, the playground, the usage dashboard), static files of the package
(`mom_service/ui`), served with a strict Content-Security-Policy. The pages load without a token and hold no
secret: each API call they make carries the token the user typed (kept in the tab's session storage)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response

from mom_service.errors import NotFound

# Scripts, styles and connections from this origin only: no inline script or style, no other origin, no frame.
# Images may be data: URLs (the playground's preview of an attached image); Chart.js draws on a canvas.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) each time, so an upgraded service serves its own pages
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGES = {"": "index.html", "playground": "playground.html", "dashboard": "dashboard.html"}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str

    @classmethod
    def read(cls, source: Traversable) -> StaticFile:
        body = source.read_bytes()
        suffix = "." + source.name.rsplit(".", 1)[-1]
        return cls(body, MEDIA_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, request: Request) -> Response:
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers={**HEADERS, "ETag": self.etag})
        return Response(self.body, media_type=self.media_type, headers={**HEADERS, "ETag": self.etag})


def _assets(folder: Traversable, prefix: str = "") -> dict[str, StaticFile]:
    """The servable files under `folder` by their path in it (the vendored library's README and license are not
    served: they are in the package for its readers)."""
    found: dict[str, StaticFile] = {}
    for entry in folder.iterdir():
        if entry.is_dir():
            found.update(_assets(entry, f"{prefix}{entry.name}/"))
        elif "." + entry.name.rsplit(".", 1)[-1] in MEDIA_TYPES:
            found[prefix + entry.name] = StaticFile.read(entry)
    return found


def ui_router() -> APIRouter:
    """The pages' routes, their files read once here (when the app is built with the UI on)."""
    root = files("mom_service.ui")
    pages = {path: StaticFile.read(root / name) for path, name in PAGES.items()}
    assets = _assets(root / "static")
    router = APIRouter(prefix="/ui")

    @router.get("", include_in_schema=False)
    async def index(request: Request) -> Response:
        return pages[""].response(request)

    @router.get("/{page}", include_in_schema=False)
    async def page(page: str, request: Request) -> Response:
        found = pages.get(page)
        if found is None or not page:
            raise NotFound(f"No page '/ui/{page}': see /ui.", code="not_found")
        return found.response(request)

    @router.get("/static/{path:path}", include_in_schema=False)
    async def asset(path: str, request: Request) -> Response:
        found = assets.get(path)
        if found is None:
            raise NotFound(f"No file '/ui/static/{path}'.", code="not_found")
        return found.response(request)

    return router
