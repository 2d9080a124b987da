"""The search service: page, JSON API, only indexed images served, limits, malformed uploads, concurrency."""

from __future__ import annotations

import io
import random
from concurrent.futures import ThreadPoolExecutor

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
    with TestClient(app) as c:
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
    assert body["results"][0]["thumb_url"] == f"/api/thumbs/{expected[0].id}"


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
