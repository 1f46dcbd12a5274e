"""The dashboard: ``GET /`` and ``GET /ui/jobs/{job_id}``, pages that read the JSON API from
the browser (policies, jobs, metrics, sessions) and draw their own SVG charts.

Every asset is a file of ``service/api/static/`` served from an allow-list, and the pages carry
``Content-Security-Policy: default-src 'self'``: nothing is fetched from another origin, so the
dashboard works offline and behind a firewall.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response

from service.errors import NotFound

router = APIRouter(tags=["dashboard"], include_in_schema=False)

STATIC = resources.files("service.api") / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
ASSETS = ("dashboard.js", "chart.js", "dashboard.css")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    suffix = name[name.rfind(".") :]
    return Response((STATIC / name).read_bytes(), media_type=TYPES[suffix], headers=HEADERS)


@router.get("/")
def index() -> Response:
    return _file("index.html")


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> Response:
    return _file("job.html")  # the page reads the job id from its URL and asks the API


@router.get("/ui/static/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no dashboard asset {name[:60]!r}")
    return _file(name)
