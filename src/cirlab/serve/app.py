"""The search service: a FastAPI app over one ``GalleryIndex``, with a web page and a JSON API beside it.

Safety rules, each tested in ``tests/test_serve.py``:

- **who may ask**: requests must name an allowed host (``Host``; loopback names by default), which defeats DNS
  rebinding (a web page whose domain was re-pointed at 127.0.0.1 still sends its own name); API and state-changing
  requests that carry an ``Origin`` must come from the page's own origin (no cross-site form posts or reads);
  with a token set, every request must carry it (``Authorization: Bearer <token>``, or the cookie the page gets
  from opening ``/?token=<token>`` once);
- **what is served**: only indexed images, addressed by their integer id (never by a client-supplied path), and
  only while the file on disk is still the indexed file (``GalleryIndex.open_item``: a regular file inside the
  gallery folder with the indexed content), so a symbolic link or another file swapped in is refused; error
  details name gallery images by id and indexed (relative) path, never by the server's absolute paths;
- **bounded work**: request bodies above ``max_upload_bytes`` get 413 before any parsing; uploads above
  ``max_pixels`` get 413 before decoding (decompression bombs included); anything that is not a readable image
  gets 400: malformed input is a 4xx, never a 5xx. Decoding runs a few at a time (``decode_workers`` uploads and
  ``thumb_workers`` thumbnails at once); a thumbnail is made once per image content and kept in a small
  least-recently-used cache, and concurrent requests for the same one wait for that single decode; JPEGs are
  decoded at a reduced scale (``draft``), and images still over ``max_pixels`` get no thumbnail (413);
- **one model call at a time**: ``GalleryIndex`` holds a lock around the forward pass only, so concurrent requests
  never mix results, and a slow upload's decoding never holds up other queries;
- **a rebuilt index is picked up**: every request first checks ``index.json`` (``GalleryIndex.refresh``).

``HEAD`` is answered wherever ``GET`` is. ``/docs`` and ``/redoc`` serve Swagger UI and ReDoc from the files the
``fastapi-offline`` package ships (in the ``[serve]`` extra), so they work with no network.
"""

import hmac
import io
import json
import mimetypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import anyio
from PIL import Image

from cirlab._optional import require
from cirlab.data.images import ImageReadError, ImageTooLargeError, decode_image
from cirlab.features.hashing import hash_bytes

# FastAPI reads endpoint signatures at runtime, so this module keeps real (not postponed) annotations and imports
# the web stack at the top; a missing one names the [serve] extra.
fastapi = require("fastapi", extra="serve", purpose="cirlab serve")
require("python_multipart", extra="serve", purpose="image uploads in cirlab serve")
fastapi_offline = require("fastapi_offline", extra="serve", purpose="the API docs pages without a CDN")
from fastapi import File, Form, HTTPException, Query, UploadFile  # noqa: E402
from fastapi.responses import HTMLResponse, Response, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel  # noqa: E402

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 << 20
MAX_PIXELS = 40_000_000
"""Largest image (width x height) decoded for an upload or a thumbnail; ~6300 x 6300, far above what any CLIP sees."""
MAX_TEXT_CHARS = 1000
MAX_K = 100
THUMB_SIZE = 256
THUMB_CACHE_ITEMS = 2048
"""Thumbnails kept in memory (about 10-20 KB each)."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names a server accepts by default: only what a browser on the same machine sends."""
TOKEN_COOKIE = "cirlab_token"
READ_CHUNK = 1 << 20


def _host_name(value: str) -> str:
    """The host part of a ``Host`` header or an allowed-host entry, lower-case, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether a request's ``Host`` header names one of ``allowed`` (``*`` allows any; ``*.lan`` any under lan)."""
    name = _host_name(host)
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or _host_name(entry) == name:
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]):
            return True
    return False


class _Guard:
    """ASGI middleware: answers HEAD as GET without a body, checks Host, Origin and the token, adds nosniff."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str], token: str | None) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.token = token

    @staticmethod
    async def _send_json(send: Any, status: int, detail: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _has_token(self, headers: dict[bytes, bytes]) -> bool:
        token = self.token.encode()
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), token):
            return True
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == TOKEN_COOKIE.encode() and hmac.compare_digest(value, token):
                return True
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host or not host_allowed(host, self.allowed_hosts):
            await self._send_json(
                send, 400, "this server does not answer to that host name (see cirlab serve --allowed-host)"
            )
            return
        method, path = scope["method"], scope["path"]
        origin = headers.get(b"origin")
        if origin is not None and (path.startswith("/api/") or method not in ("GET", "HEAD", "OPTIONS")):
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
            if netloc != host.lower():
                await self._send_json(send, 403, "cross-origin request refused")
                return
        if self.token is not None and not self._has_token(headers):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [""])[0].encode()
            if path == "/" and method == "GET" and given and hmac.compare_digest(given, self.token.encode()):
                # The page's link carries the token once; it moves into a cookie and out of the address bar.
                cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()
                redirect = [(b"location", b"/"), (b"set-cookie", cookie), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 303, "headers": redirect})
                await send({"type": "http.response.body", "body": b""})
                return
            await self._send_json(
                send, 401, "a token is required: open /?token=<token> or send Authorization: Bearer <token>",
                [(b"www-authenticate", b"Bearer")],
            )  # fmt: skip
            return
        head = method == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, guarded_send)


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


class _SingleFlight:
    """A small least-recently-used cache whose misses are computed once, however many threads ask at once, and at
    most ``workers`` at a time."""

    def __init__(self, capacity: int, workers: int) -> None:
        self._capacity = capacity
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._done: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, tuple[threading.Event, list[Any]]] = {}

    def get(self, key: str, make: Callable[[], bytes]) -> bytes:
        """The value of ``key``, made by ``make()`` unless cached or being made (then this waits for it)."""
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
            flight = self._running.get(key)
            owner = flight is None
            if owner:
                flight = self._running[key] = (threading.Event(), [])
        event, outcome = flight
        if not owner:
            event.wait()
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            return outcome[0]
        try:
            with self._slots:
                value = make()
            outcome.append(value)
            with self._lock:
                self._done[key] = value
                while len(self._done) > self._capacity:
                    self._done.popitem(last=False)
            return value
        except BaseException as err:
            outcome.append(err)
            raise
        finally:
            with self._lock:
                self._running.pop(key, None)
            event.set()


def _thumbnail(f: Any, name: str, max_pixels: int) -> bytes:
    """A JPEG thumbnail of an open image file, decoding as little as the format allows."""
    small = decode_image(f, name, max_pixels, draft=THUMB_SIZE)
    small.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _stream(f: Any) -> Iterator[bytes]:
    with f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


def create_app(
    index: Any,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_k: int = MAX_K,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    token: str | None = None,
    decode_workers: int = 2,
    thumb_workers: int = 2,
    thumb_cache_items: int = THUMB_CACHE_ITEMS,
) -> fastapi.FastAPI:
    """The FastAPI app serving ``index`` (a ``cirlab.index.GalleryIndex``).

    Args:
        index: the loaded index.
        max_upload_bytes: largest request body accepted (413 above).
        max_pixels: largest uploaded image and largest decoded thumbnail source, width x height (413 above).
        max_text_chars: longest modification text (422 above).
        max_k: most results per query.
        allowed_hosts: host names the server answers to (``Host`` header); ``*`` for any, ``*.lan`` for a domain.
        token: when set, every request must carry it (bearer header or the cookie ``/?token=`` sets).
        decode_workers: uploads decoded at once.
        thumb_workers: thumbnails made at once.
        thumb_cache_items: thumbnails kept in memory.
    """
    if token is not None and (not token or not token.isprintable() or any(c in token for c in ' ;,"\\')):
        raise ValueError("the token must be non-empty printable text without spaces, quotes, commas or semicolons")
    app = fastapi_offline.FastAPIOffline(
        title="cirlab search",
        description="Composed image retrieval over an indexed gallery: a reference image plus a modification text.",
        version="1",
    )
    app.add_middleware(_Refresh, index=index)
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts, token=token)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    thumbnails = _SingleFlight(thumb_cache_items, thumb_workers)
    upload_slots = threading.BoundedSemaphore(decode_workers)

    def item(i: int, path: str, digest: str) -> dict[str, Any]:
        return {
            "id": i,
            "path": path,
            "image_url": f"/api/images/{i}",
            "thumb_url": f"/api/thumbs/{i}?v={digest[:12]}",  # a rebuilt index gives ids new content: new URLs
        }

    def open_item(item_id: int) -> Any:
        try:
            return index.open_item(item_id)
        except IndexError:
            raise HTTPException(404, f"no gallery image with id {item_id}") from None
        except ImageReadError as err:
            raise HTTPException(404, str(err)) from None

    def decode_upload(data: bytes) -> Image.Image:
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:
            with upload_slots:
                return decode_image(data, "the uploaded image", max_pixels)
        except ImageTooLargeError as err:
            raise HTTPException(413, str(err)) from None
        except Exception as err:  # any decoder failure is the upload's fault: say so with a 400, never a 500
            raise HTTPException(400, f"the uploaded file is not a readable image ({type(err).__name__})") from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return page

    @app.get("/api/info", response_model=Info, summary="What this index holds and how it searches")
    def info() -> dict[str, Any]:
        manifest = index.manifest
        ann = manifest.get("approximate")
        return {
            "count": int(manifest["count"]),
            "dim": int(manifest["dim"]),
            "backbone": manifest["model"]["backbone"],
            "method": manifest["model"]["method"],
            "methods": index.methods(),
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
        paths, digests = index.paths, index.digests  # one generation, even if a rebuild lands meanwhile
        stop = min(len(paths), offset + limit)
        return {
            "total": len(paths),
            "offset": offset,
            "items": [item(i, paths[i], digests[i]) for i in range(offset, stop)],
        }

    @app.get("/api/images/{item_id}", summary="An indexed image, by id", response_class=Response)
    def image(item_id: int) -> Response:
        f = open_item(item_id)
        size = os.fstat(f.fileno()).st_size
        media = mimetypes.guess_type(index.paths[item_id])[0] or "application/octet-stream"
        headers = {"content-length": str(size), "cache-control": "no-cache"}
        return StreamingResponse(_stream(f), media_type=media, headers=headers)

    @app.get("/api/thumbs/{item_id}", summary="A JPEG thumbnail of an indexed image, by id")
    def thumb(item_id: int) -> Response:
        digest = index.digests[item_id] if 0 <= item_id < len(index) else None

        def make() -> bytes:
            with open_item(item_id) as f:
                return _thumbnail(f, f"gallery image {item_id}", max_pixels)

        try:
            data = thumbnails.get(digest or f"missing-{item_id}", make)
        except HTTPException:
            raise
        except ImageTooLargeError as err:
            raise HTTPException(413, f"gallery image {item_id} is too large for a thumbnail ({err})") from None
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
        methods = index.methods()
        if method is not None and method not in methods:
            raise HTTPException(422, f"unknown method {method!r}; choose one of {methods}")
        if image is not None:
            data = image.file.read()
            reference, exclude, label = decode_upload(data), index.same_content(hash_bytes(data)), "upload"
        else:
            if not 0 <= gallery_id < len(index):
                raise HTTPException(404, f"no gallery image with id {gallery_id}")
            reference, exclude, label = gallery_id, [], f"gallery:{gallery_id}"
        try:
            query = index.compose(reference, text, method)
        except ImageReadError as err:  # gallery references: the message names the id and the indexed path
            raise HTTPException(400, str(err)) from None
        except IndexError as err:
            raise HTTPException(404, str(err)) from None
        exclude = sorted(set(exclude) | set(query.exclude))
        query.exclude = exclude
        hits = index.search(query, k)
        digests = index.digests
        return {
            "method": query.method,
            "text": text,
            "k": k,
            "reference": label,
            "excluded": exclude,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
            "results": [
                {**item(h.id, h.path, digests[h.id] if h.id < len(digests) else ""), "rank": h.rank, "score": h.score}
                for h in hits
            ],
        }

    return app


class _Refresh:
    """ASGI middleware: before a request, switches to a generation a rebuild committed since the last one.

    Checking costs one ``stat`` in the event loop; only a changed ``index.json`` is read, on a worker thread. A
    generation that cannot be read is ignored (the one in use stays; the next request tries again).
    """

    def __init__(self, app: Any, index: Any) -> None:
        self.app = app
        self.index = index

    def _reload(self) -> None:
        try:
            self.index.refresh()
        except Exception:
            return

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.index.changed():
            await anyio.to_thread.run_sync(self._reload)
        await self.app(scope, receive, send)
