"""The search service: a FastAPI app over one ``GalleryIndex``, with a web page and a JSON API beside it.

Safety rules, each tested in ``tests/test_serve.py``:

- only indexed images are served, addressed by their integer id (never by a client-supplied path);
- request bodies above ``max_upload_bytes`` get 413 before any parsing, uploads above ``max_pixels`` get 413
  before decoding (decompression bombs), and anything that is not a readable image gets 400: malformed input is a
  4xx, never a 5xx;
- the model runs one request at a time (``GalleryIndex`` holds a lock around composition), so concurrent requests
  never mix results.
"""

import io
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from PIL import Image

from cirlab._optional import require
from cirlab.data.images import ImageReadError
from cirlab.features.hashing import hash_bytes

# FastAPI reads endpoint signatures at runtime, so this module keeps real (not postponed) annotations and imports
# the web stack at the top; a missing one names the [serve] extra.
fastapi = require("fastapi", extra="serve", purpose="cirlab serve")
require("python_multipart", extra="serve", purpose="image uploads in cirlab serve")
from fastapi import File, Form, HTTPException, Query, UploadFile  # noqa: E402
from fastapi.responses import FileResponse, HTMLResponse, Response  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel  # noqa: E402

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 << 20
MAX_PIXELS = 40_000_000
"""Largest uploaded image (width x height) decoded; ~6300 x 6300, far above what any CLIP looks at."""
MAX_TEXT_CHARS = 1000
MAX_K = 100
THUMB_SIZE = 256


class _BodyLimit:
    """ASGI middleware: rejects request bodies over ``limit`` bytes with 413, before the app parses them.

    The body (at most ``limit`` bytes) is read here and replayed to the app, so a chunked upload without a
    Content-Length cannot slip past the limit either.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _reject(self, send: Any) -> None:
        body = b'{"detail":"request body too large"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._reject(send)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Info(BaseModel):
    """What the index holds and how it searches."""

    count: int
    dim: int
    backbone: str
    method: str
    methods: list[str]
    search: str
    recall: float | None
    description: str
    max_upload_bytes: int
    max_k: int


class GalleryItem(BaseModel):
    """An indexed image and where to fetch it."""

    id: int
    path: str
    image_url: str
    thumb_url: str


class GalleryPage(BaseModel):
    """A page of the gallery."""

    total: int
    offset: int
    items: list[GalleryItem]


class SearchHit(GalleryItem):
    """A result: an indexed image with its rank and score."""

    rank: int
    score: float


class SearchResponse(BaseModel):
    """Results of one composed query."""

    method: str
    text: str
    k: int
    reference: str
    excluded: list[int]
    elapsed_ms: float
    results: list[SearchHit]


def create_app(
    index: Any,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_k: int = MAX_K,
) -> fastapi.FastAPI:
    """The FastAPI app serving ``index`` (a ``cirlab.index.GalleryIndex``).

    Args:
        index: the loaded index.
        max_upload_bytes: largest request body accepted (413 above).
        max_pixels: largest uploaded image, width x height (413 above).
        max_text_chars: longest modification text (422 above).
        max_k: most results per query.
    """
    app = fastapi.FastAPI(
        title="cirlab search",
        description="Composed image retrieval over an indexed gallery: a reference image plus a modification text.",
        version="1",
    )
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    methods = index.methods()
    ann = index.manifest.get("approximate")

    def item(i: int) -> dict[str, Any]:
        return {"id": i, "path": index.paths[i], "image_url": f"/api/images/{i}", "thumb_url": f"/api/thumbs/{i}"}

    def checked_id(item_id: int) -> Path:
        try:
            return index.file(item_id)
        except IndexError:
            raise HTTPException(404, f"no gallery image with id {item_id}") from None

    @lru_cache(maxsize=4096)
    def thumbnail(item_id: int) -> bytes:
        with Image.open(checked_id(item_id)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=88)
        return buf.getvalue()

    def decode_upload(data: bytes) -> Image.Image:
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise HTTPException(413, f"image of {im.width}x{im.height} pixels exceeds {max_pixels} pixels")
                im.load()
                return im.convert("RGB")
        except HTTPException:
            raise
        except Exception as err:  # any decoder failure is the upload's fault: say so with a 400, never a 500
            raise HTTPException(400, f"the uploaded file is not a readable image ({type(err).__name__})") from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return page

    @app.get("/api/info", response_model=Info, summary="What this index holds and how it searches")
    def info() -> dict[str, Any]:
        return {
            "count": len(index),
            "dim": int(index.manifest["dim"]),
            "backbone": index.manifest["model"]["backbone"],
            "method": index.method_name,
            "methods": methods,
            "search": ann["kind"] if ann else "exact",
            "recall": ann["recall"] if ann else None,
            "description": index.describe(),
            "max_upload_bytes": max_upload_bytes,
            "max_k": max_k,
        }

    @app.get("/api/gallery", response_model=GalleryPage, summary="A page of indexed images")
    def gallery(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 60
    ) -> dict[str, Any]:
        stop = min(len(index), offset + limit)
        return {"total": len(index), "offset": offset, "items": [item(i) for i in range(offset, stop)]}

    @app.get("/api/images/{item_id}", summary="An indexed image, by id", response_class=FileResponse)
    def image(item_id: int) -> FileResponse:
        path = checked_id(item_id)
        if not path.is_file():
            raise HTTPException(404, f"gallery image {item_id} is no longer on disk; rebuild the index")
        return FileResponse(path)

    @app.get("/api/thumbs/{item_id}", summary="A JPEG thumbnail of an indexed image, by id")
    def thumb(item_id: int) -> Response:
        try:
            data = thumbnail(item_id)
        except HTTPException:
            raise
        except Exception:
            raise HTTPException(404, f"gallery image {item_id} cannot be read; rebuild the index") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/search", response_model=SearchResponse, summary="Compose a query and search the gallery")
    def search(
        text: Annotated[str, Form(max_length=max_text_chars, description="The modification text.")] = "",
        image: Annotated[UploadFile | None, File(description="Reference image to upload.")] = None,
        gallery_id: Annotated[int | None, Form(description="Or: a gallery image as the reference.")] = None,
        method: Annotated[str | None, Form(description="One of /api/info's methods.")] = None,
        k: Annotated[int, Form(ge=1, le=max_k, description="How many results.")] = 10,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        if (image is None) == (gallery_id is None):
            raise HTTPException(422, "give exactly one reference: an uploaded image or a gallery_id")
        if method is not None and method not in methods:
            raise HTTPException(422, f"unknown method {method!r}; choose one of {methods}")
        if image is not None:
            data = image.file.read()
            reference, exclude, label = decode_upload(data), index.same_content(hash_bytes(data)), "upload"
        else:
            checked_id(gallery_id)
            reference, exclude, label = gallery_id, [], f"gallery:{gallery_id}"
        try:
            query = index.compose(reference, text, method)
        except ImageReadError as err:
            raise HTTPException(400, str(err)) from None
        exclude = sorted(set(exclude) | set(query.exclude))
        query.exclude = exclude
        hits = index.search(query, k)
        return {
            "method": query.method,
            "text": text,
            "k": k,
            "reference": label,
            "excluded": exclude,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
            "results": [{**item(h.id), "rank": h.rank, "score": h.score} for h in hits],
        }

    return app
