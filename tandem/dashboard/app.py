"""The status page (`/dashboard`) of `tandem serve` and `tandem route`: static files from the
package and a JSON view the page polls. The files hold no data, so they are public; the data
needs an API key like the rest of the API, unless the server runs with --dashboard-public."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).parent / "static"
_FILES = {"/": ("index.html", "text/html"), "/dashboard.js": ("dashboard.js", "text/javascript"),
          "/dashboard.css": ("dashboard.css", "text/css")}


def dashboard_app(data: Callable[[], Awaitable[dict]],
                  authorized: Callable[[str], bool] | None) -> Starlette:
    """`authorized(authorization_header)`; None: the data is public."""
    def static(path: str) -> Callable[[Request], Awaitable[Response]]:
        name, media = _FILES[path]

        async def serve(request: Request) -> Response:
            # no-cache: a page left open across an upgrade picks up the new script
            return FileResponse(STATIC / name, media_type=media,
                                headers={"Cache-Control": "no-cache"})
        return serve

    async def view(request: Request) -> Response:
        if authorized is not None and not authorized(request.headers.get("authorization", "")):
            return JSONResponse({"error": {"message": "invalid or missing API key",
                                           "type": "authentication_error", "param": None,
                                           "code": "invalid_api_key"}}, status_code=401)
        return JSONResponse(await data(), headers={"Cache-Control": "no-store"})

    return Starlette(routes=[*(Route(p, static(p)) for p in _FILES), Route("/data", view)])


def slash_redirect(request: Request) -> Response:
    """/dashboard -> /dashboard/, where the page's relative URLs resolve."""
    return RedirectResponse(str(request.url.replace(path=request.url.path + "/")), 307)
