"""The demo page at /demo (``GET /`` redirects there): one HTML page, its script and its stylesheet,
served from the package (``app/static/demo``), so it works with no internet. The page holds no data
and stays public; the API calls it makes carry the key the user types into it."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse
from starlette.exceptions import HTTPException

PAGE_DIR = files("app") / "static" / "demo"
# No inline script or style, and nothing from another origin: the page's own files and its API calls.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Served again after an upgrade without a stale copy, revalidated by ETag.
NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
PAGE_HEADERS = {**NO_CACHE, "Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"}
ASSET_TYPES = {"demo.js": "text/javascript; charset=utf-8", "demo.css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/demo", status_code=307)


@router.api_route("/demo", methods=["GET", "HEAD"])
async def demo_page() -> FileResponse:
    return FileResponse(str(PAGE_DIR.joinpath("index.html")), media_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)


@router.api_route("/demo/assets/{name}", methods=["GET", "HEAD"])
async def demo_asset(name: str) -> FileResponse:
    """The page's script or stylesheet; any other name is 404 (no directory is exposed)."""
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        raise HTTPException(404)
    return FileResponse(str(PAGE_DIR.joinpath(name)), media_type=media_type, headers=NO_CACHE)
