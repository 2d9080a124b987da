"""The search service: page, JSON API, only indexed images served, limits, malformed uploads, concurrency."""

from __future__ import annotations

import io
import random
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("python_multipart", reason="the [serve] extra is not installed")

from fastapi.testclient import TestClient

from cirlab.features.cache import FeatureCache
from cirlab.index import build_index, load_index
from cirlab.serve import create_app
from imagefiles import make_gallery

MAX_UPLOAD = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_gallery(root / "images", 24)
    build_index(
        root / "images", root / "index", backbone="tiny", cache=FeatureCache(root / "cache"), log=lambda m: None
    )
    return load_index(root / "index")


@pytest.fixture(scope="module")
def client(index):
    app = create_app(index, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    with TestClient(app, base_url="http://localhost") as c:
        yield c


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_page_static_files_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/info", "/api/gallery", "/api/images/{item_id}"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_info_and_gallery_pages(client, index):
    info = client.get("/api/info").json()
    assert info["count"] == 24 and info["method"] == "sum" and info["search"] == "exact"
    assert info["methods"] == ["sum", "image-only", "text-only"]
    page = client.get("/api/gallery", params={"offset": 20, "limit": 10}).json()
    assert page["total"] == 24 and [it["id"] for it in page["items"]] == [20, 21, 22, 23]
    assert page["items"][0]["path"] == index.paths[20]


def test_only_indexed_images_are_served(client, index):
    image = client.get("/api/images/3")
    assert image.status_code == 200 and image.content == index.file(3).read_bytes()
    thumb = client.get("/api/thumbs/3")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    for url in (
        "/api/images/24",
        "/api/images/-1",
        "/api/images/..%2F..%2Fpyproject.toml",
        "/api/images/%2e%2e/%2e%2e/pyproject.toml",
        "/api/images/../../pyproject.toml",
        "/api/thumbs/999",
        "/static/../../../pyproject.toml",
        "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2F..%2F..%2Fpyproject.toml",
        "/etc/passwd",
    ):
        response = client.get(url)
        assert 400 <= response.status_code < 500, url
        assert b"[project]" not in response.content and b"root:" not in response.content, url


def test_search_by_upload_matches_the_python_api(client, index):
    data = index.file(7).read_bytes()
    response = client.post("/api/search", files={"image": ("ref.png", data)}, data={"text": "a red circle", "k": "5"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = index.search(index.compose(index.file(7), "a red circle"), k=5)
    assert body["excluded"] == [7]  # the uploaded bytes are gallery image 7: left out of its own results
    assert [r["id"] for r in body["results"]] == [h.id for h in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert body["results"][0]["thumb_url"].startswith(f"/api/thumbs/{expected[0].id}?v=")


def test_search_by_gallery_id_with_another_method(client, index):
    response = client.post("/api/search", data={"gallery_id": "2", "text": "blue", "method": "image-only", "k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = index.search(index.compose(2, "blue", method="image-only"), k=3)
    assert body["method"] == "image-only" and body["reference"] == "gallery:2"
    assert [r["id"] for r in body["results"]] == [h.id for h in expected] and 2 not in body["excluded"][1:]


def test_request_bodies_over_the_limit_get_413(client):
    big = b"\0" * (MAX_UPLOAD + 1)
    response = client.post("/api/search", files={"image": ("big.png", big)}, data={"text": "x"})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the limit must hold for chunked uploads too
        for _ in range(4):
            yield b"x" * (MAX_UPLOAD // 2)

    response = client.post(
        "/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert response.status_code == 413


def _bomb() -> bytes:
    """A small PNG file that decodes to more pixels than the server accepts."""
    return png_bytes(Image.new("1", (1500, 1500)))


MALFORMED = {
    "empty file": {"files": {"image": ("a.png", b"")}, "data": {"text": "x"}},
    "text file": {"files": {"image": ("a.png", b"hello, not an image")}, "data": {"text": "x"}},
    "truncated png": {"files": {"image": ("a.png", png_bytes(Image.new("RGB", (64, 64), "red"))[:60])}},
    "decompression bomb": {"files": {"image": ("a.png", _bomb())}},
    "no reference": {"data": {"text": "x"}},
    "two references": {"files": {"image": ("a.png", b"x")}, "data": {"gallery_id": "1"}},
    "gallery id out of range": {"data": {"gallery_id": "99"}},
    "gallery id not a number": {"data": {"gallery_id": "../../etc/passwd"}},
    "k zero": {"data": {"gallery_id": "1", "k": "0"}},
    "k huge": {"data": {"gallery_id": "1", "k": "100000"}},
    "text too long": {"data": {"gallery_id": "1", "text": "x" * 5000}},
    "unknown method": {"data": {"gallery_id": "1", "method": "nope"}},
    "broken multipart": {
        "content": b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nabc',
        "headers": {"content-type": "multipart/form-data; boundary=zz"},
    },
    "json instead of a form": {"json": {"gallery_id": 1, "text": "x"}},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_4xx_never_5xx(client, case):
    response = client.post("/api/search", **MALFORMED[case])
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert "detail" in response.json()


def test_concurrent_requests_never_mix_results(client):
    rng = random.Random(0)
    queries = [
        {"gallery_id": str(i), "text": text, "method": method, "k": "6"}
        for i, text, method in [
            (rng.randrange(24), rng.choice(["red", "a green square", "two blue circles", ""]), m)
            for m in ["sum", "image-only", "text-only"] * 4
        ]
    ]
    expected = [client.post("/api/search", data=q).json()["results"] for q in queries]
    jobs = [i for i in range(len(queries)) for _ in range(3)]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: (i, client.post("/api/search", data=queries[i])), jobs))
    for i, response in answers:
        assert response.status_code == 200
        got = response.json()["results"]
        assert [r["id"] for r in got] == [r["id"] for r in expected[i]]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected[i]], abs=1e-6)


def _small_index(root, n: int = 6):
    make_gallery(root / "images", n)
    build_index(
        root / "images", root / "index", backbone="tiny", cache=FeatureCache(root / "cache"), log=lambda m: None
    )
    return load_index(root / "index")


def test_other_host_names_are_refused_so_dns_rebinding_reads_nothing(index):
    app = create_app(index)
    with TestClient(app, base_url="http://attacker.example") as rebound:
        for url in ("/", "/api/gallery", "/api/images/3", "/api/thumbs/3"):
            response = rebound.get(url)
            assert response.status_code == 400 and b"host name" in response.content, url
        assert rebound.post("/api/search", data={"gallery_id": "1"}).status_code == 400
    for host in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"):
        with TestClient(app, base_url=host) as local:
            assert local.get("/api/info").status_code == 200, host
    lan = create_app(index, allowed_hosts=["photos.lan", "*.home.arpa"])
    with TestClient(lan, base_url="http://box.home.arpa:8000") as c:
        assert c.get("/api/info").status_code == 200


def test_cross_origin_api_requests_are_refused(client):
    evil = {"Origin": "http://attacker.example"}
    assert client.post("/api/search", data={"gallery_id": "1"}, headers=evil).status_code == 403
    assert client.get("/api/gallery", headers=evil).status_code == 403
    same = {"Origin": "http://localhost"}
    assert client.post("/api/search", data={"gallery_id": "1"}, headers=same).status_code == 200


def test_a_token_is_required_when_set(index):
    app = create_app(index, token="s3cret")
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/api/info").status_code == 401 and c.get("/").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        opened = c.get("/?token=s3cret", follow_redirects=False)  # the link a user opens once
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=Strict" in opened.headers["set-cookie"]
        assert c.get("/api/info").status_code == 200  # the cookie now carries it
        assert c.post("/api/search", data={"gallery_id": "1"}).status_code == 200


def test_head_is_answered_like_get_without_a_body(client, index):
    for url in ("/", "/api/info", "/api/images/3", "/api/thumbs/3", "/static/app.js"):
        head, get = client.head(url), client.get(url)
        assert head.status_code == get.status_code == 200, url
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], url
    assert int(client.head("/api/images/3").headers["content-length"]) == index.file(3).stat().st_size


def test_api_docs_load_their_assets_from_this_server(client):
    for url in ("/docs", "/redoc"):
        page = client.get(url)
        assert page.status_code == 200 and "cdn." not in page.text and "http" not in page.text.split("<body")[1], url
        for asset in re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', page.text):
            assert client.get(asset).status_code == 200, asset


def test_a_decompression_bomb_upload_gets_413(client):
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 400 M pixels: over twice PIL's own limit

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"\0" * 64)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    response = client.post("/api/search", files={"image": ("bomb.png", bomb)})
    assert response.status_code == 413, response.text


def test_an_indexed_file_replaced_since_is_not_served(tmp_path):
    index = _small_index(tmp_path)
    with TestClient(create_app(index), base_url="http://localhost") as c:
        assert c.get("/api/images/1").status_code == 200
        secret = tmp_path / "secret.txt"
        secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
        index.file(1).unlink()
        index.file(1).symlink_to(secret)  # swapped for a link to a file outside the gallery
        index.file(2).write_bytes(b"root:x:0:0:" + index.file(2).read_bytes()[11:])  # rewritten in place
        for i in (1, 2):
            for url in (f"/api/images/{i}", f"/api/thumbs/{i}"):
                response = c.get(url)
                assert response.status_code == 404 and b"root:" not in response.content, (url, response.content)
                assert str(tmp_path) not in response.text, response.text  # no absolute server path in details
            answer = c.post("/api/search", data={"gallery_id": str(i)})
            assert answer.status_code == 400 and str(tmp_path) not in answer.text, answer.text
        assert c.get("/api/images/3").status_code == 200


def test_concurrent_thumbnail_requests_decode_once_and_a_few_at_a_time(tmp_path, monkeypatch):
    import threading
    import time

    index = _small_index(tmp_path)
    for i in range(len(index)):  # big enough that decoding takes a moment
        Image.fromarray(np.full((900, 900, 3), i * 30, np.uint8)).save(index.file(i), format="PNG")
    build_index(tmp_path / "images", tmp_path / "index", backbone="tiny", cache=FeatureCache(tmp_path / "cache"),
                log=lambda m: None)  # fmt: skip
    index.refresh()
    running, peak, decodes = [0], [0], []
    lock = threading.Lock()
    real = Image.Image.load

    def counted_load(self, *args, **kwargs):
        if getattr(self, "fp", None) is None or self.size[0] < 900:  # only the gallery decodes
            return real(self, *args, **kwargs)
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            decodes.append(self.size)
        time.sleep(0.05)
        try:
            return real(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Image.Image, "load", counted_load)
    with TestClient(create_app(index, thumb_workers=2), base_url="http://localhost") as c:
        with ThreadPoolExecutor(max_workers=8) as pool:
            same = list(pool.map(lambda _: c.get("/api/thumbs/0"), range(8)))
        assert all(r.status_code == 200 for r in same) and len({r.content for r in same}) == 1
        assert len(decodes) == 1, f"{len(decodes)} decodes for 8 requests of one thumbnail"
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda i: c.get(f"/api/thumbs/{i}"), range(6)))
    assert peak[0] <= 2, f"{peak[0]} thumbnails decoded at once"


def test_thumbnails_are_upright_and_small(tmp_path):
    make_gallery(tmp_path / "images", 2)
    stored = Image.fromarray(np.zeros((40, 600, 3), np.uint8))  # 600 x 40, stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "images" / "phone.jpg", format="JPEG", exif=exif)
    build_index(tmp_path / "images", tmp_path / "index", backbone="tiny", cache=FeatureCache(tmp_path / "cache"),
                log=lambda m: None)  # fmt: skip
    index = load_index(tmp_path / "index")
    with TestClient(create_app(index), base_url="http://localhost") as c:
        thumb = Image.open(io.BytesIO(c.get(f"/api/thumbs/{index.paths.index('phone.jpg')}").content))
        assert thumb.size == (17, 256)  # portrait: the orientation was applied; the long side is the cap


def test_a_rebuilt_index_is_served_without_a_restart(tmp_path):
    index = _small_index(tmp_path, 4)
    with TestClient(create_app(index), base_url="http://localhost") as c:
        assert c.get("/api/info").json()["count"] == 4
        make_gallery(tmp_path / "images", 3, start=50)
        build_index(tmp_path / "images", tmp_path / "index", backbone="tiny", cache=FeatureCache(tmp_path / "cache"),
                    log=lambda m: None)  # fmt: skip
        assert c.get("/api/info").json()["count"] == 7
        assert c.get("/api/gallery").json()["total"] == 7
        assert c.get("/api/images/6").status_code == 200
        assert c.post("/api/search", data={"gallery_id": "6", "k": "7"}).status_code == 200


def test_a_slow_upload_is_decoded_outside_the_model_lock(index, monkeypatch):
    """Decoding and preprocessing an upload must not hold up other queries (they once ran under the model lock)."""
    import threading

    reference = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    model = index.method
    preprocessed = threading.Event()
    real = model.backbone.preprocess

    def watched(images):
        preprocessed.set()
        return real(images)

    monkeypatch.setattr(model.backbone, "preprocess", watched)
    with index._lock:  # another query is running the model
        worker = threading.Thread(target=index.compose, args=(reference, "red"), daemon=True)
        worker.start()
        assert preprocessed.wait(10), "preprocessing waited for the model lock"
    worker.join(10)
