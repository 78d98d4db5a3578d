"""The API's interactive documentation at /docs (Swagger UI over /openapi.json), served from
this installation: Swagger UI's files come from the `fastapi-offline` wheel, the page and the
script that starts it from here, so that it works offline and inside the Content Security
Policy (no other origin, no inline script). FastAPI's own /docs and /redoc load Swagger UI
and ReDoc from a CDN with an inline script: both are off (api/app.py)."""

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
SWAGGER_UI = Path(str(files("fastapi_offline") / "static"))


def install(app: FastAPI) -> None:
    app.mount("/docs/swagger-ui", StaticFiles(directory=SWAGGER_UI), name="swagger-ui")
    app.mount("/docs/static", StaticFiles(directory=HERE / "static"), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(HERE / "static" / "docs.html", media_type="text/html")
