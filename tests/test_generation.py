"""Text generators (captioners, rewriters), their cache and prompts: the real transformers paths on tiny random
models saved to a temp dir, and the cache keyed by everything that determines a text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.generation import (
    CAPTIONERS,
    REWRITERS,
    GeneratorOptions,
    Request,
    SamplingConfig,
    TextCache,
    create_generator,
    generate_cached,
    resolve_prompt,
)
from cirlab.generation.identity import directory_digest, split_revision, weights_identity
from cirlab.generation.prompts import PROMPTS, parse_answer
from cirlab.generation.steps import relevance_weights
from cirlab.types import ReferenceImage

GREEDY = SamplingConfig(max_new_tokens=5)


def _images(n: int, size: tuple[int, int] = (40, 48)) -> list[ReferenceImage]:
    rng = np.random.default_rng(0)
    return [
        ReferenceImage.from_image(Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))) for _ in range(n)
    ]


def test_registries_list_the_generators():
    assert {"hf-captioner", "mllm"} <= set(CAPTIONERS.list())
    assert "hf-rewriter" in REWRITERS.list()
    with pytest.raises(KeyError, match="registered"):
        create_generator("no-such:x", "captioner")
    with pytest.raises(ValueError, match="names no model"):
        create_generator("hf-rewriter", "rewriter")


@pytest.mark.parametrize("kind", ["captioner", "blip2", "llava"])
def test_captioners_generate_by_directory(kind, tiny_generators):
    model = create_generator(f"hf-captioner:{tiny_generators[kind]}", "captioner")
    requests = [
        Request(user=u, image=im) for u, im in zip(["", "describe the image:", "a photo of"], _images(3), strict=True)
    ]
    out = model.generate(requests, GREEDY, [0, 0, 0])
    assert len(out) == 3 and all(len(o) == 1 and isinstance(o[0], str) for o in out)
    beams = model.generate(requests[:2], SamplingConfig(num_beams=2, num_return_sequences=2, max_new_tokens=4), [0, 0])
    assert [len(o) for o in beams] == [2, 2]
    assert model.loads == 1 and model.calls >= 2


def test_mllm_reasoner_generates(tiny_mllm_dir):
    model = create_generator(f"mllm:{tiny_mllm_dir}", "reasoner", GeneratorOptions(dtype="float32"))
    prompt = resolve_prompt("osrcir")
    requests = [
        prompt.request(text=t, image=im)
        for t, im in zip(["make it red", "add a star"], _images(2, (56, 56)), strict=True)
    ]
    out = model.generate(requests, SamplingConfig(max_new_tokens=4), [0, 0])
    assert len(out) == 2 and all(len(o) == 1 for o in out)


def test_rewriter_uses_the_chat_template(tiny_generators):
    model = create_generator(f"hf-rewriter:{tiny_generators['rewriter']}", "rewriter")
    requests = [Request(user="make the circle red", system="be brief"), Request(user="a")]
    out = model.generate(requests, GREEDY, [0, 0])
    assert len(out) == 2
    rendered = model.tokenizer.apply_chat_template(requests[0].messages(), tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|system|>be brief") and rendered.endswith("<|assistant|>")
    with pytest.raises(ValueError, match="text only"):
        model.generate([Request(user="x", image=_images(1)[0])], GREEDY, [0])


def test_batched_and_single_generation_agree(tiny_generators):
    model = create_generator(f"hf-rewriter:{tiny_generators['rewriter']}", "rewriter")
    requests = [Request(user=t) for t in ["make the circle red", "remove it", "a much longer instruction for padding"]]
    batched = model.generate(requests, GREEDY, [0, 0, 0])
    single = [model.generate([r], GREEDY, [0])[0] for r in requests]
    assert batched == single
    sampling = SamplingConfig(do_sample=True, num_return_sequences=2, max_new_tokens=5)
    # A sampled answer depends on its own seed only, not on the other requests.
    assert model.generate(requests, sampling, [1, 2, 3])[1] == model.generate([requests[1]], sampling, [2])[0]


def test_cache_hits_on_second_call_and_changed_settings_miss(tiny_generators, tmp_path):
    model = create_generator(f"hf-captioner:{tiny_generators['captioner']}", "captioner")
    cache = TextCache(tmp_path / "texts.jsonl")
    requests = [Request(user="", image=im) for im in _images(3)]
    first = generate_cached(model, requests, GREEDY, 0, cache, "caption")
    assert model.calls == 1
    assert generate_cached(model, requests, GREEDY, 0, cache, "caption") == first
    assert model.calls == 1  # all hits
    generate_cached(model, requests, GREEDY, 7, cache, "caption")
    assert model.calls == 1  # the seed does not change a greedy answer, so it is not part of its key
    generate_cached(model, requests, SamplingConfig(max_new_tokens=6), 0, cache, "caption")
    assert model.calls == 2  # a changed setting is a new key
    sampled = SamplingConfig(do_sample=True, max_new_tokens=5)
    generate_cached(model, requests, sampled, 0, cache, "caption")
    calls = model.calls
    generate_cached(model, requests, sampled, 1, cache, "caption")
    assert model.calls > calls  # when sampling, the seed is part of the key
    generate_cached(model, [Request(user="describe the image:", image=requests[0].image)], GREEDY, 0, cache, "caption")
    assert model.calls == calls + 3 + 1  # a changed prompt misses (sampled requests run one by one)
    # A new cache object over the same file, with a model that is never loaded, answers everything.
    fresh = create_generator(f"hf-captioner:{tiny_generators['captioner']}", "captioner")
    again = TextCache(tmp_path / "texts.jsonl")
    assert generate_cached(fresh, requests, GREEDY, 0, again, "caption") == first
    assert fresh.calls == 0 and fresh.loads == 0


def test_a_changed_model_is_a_changed_key(tiny_generators, tmp_path):
    import shutil

    from cirlab.generation.tiny import save_tiny_captioner

    other = save_tiny_captioner(tmp_path / "other", seed=1)
    assert directory_digest(other) != directory_digest(tiny_generators["captioner"])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_generators["captioner"], copy)
    assert directory_digest(copy) == directory_digest(tiny_generators["captioner"])
    cache = TextCache()
    requests = [Request(user="", image=_images(1)[0])]
    a = create_generator(f"hf-captioner:{tiny_generators['captioner']}", "captioner")
    b = create_generator(f"hf-captioner:{other}", "captioner")
    generate_cached(a, requests, GREEDY, 0, cache, "caption")
    generate_cached(b, requests, GREEDY, 0, cache, "caption")
    assert a.calls == 1 and b.calls == 1 and len(cache) == 2
    c = create_generator(f"hf-captioner:{copy}", "captioner")
    generate_cached(c, requests, GREEDY, 0, cache, "caption")
    assert c.calls == 0  # identical weights in another folder: the same model


def test_hub_identity_without_weights(monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert split_revision(f"org/model@{commit}") == ("org/model", commit)
    # A pinned commit needs neither weights nor network.
    assert weights_identity(f"org/model@{commit}") == f"hub:org/model@{commit}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pin it"):
        weights_identity("org/not-cached-anywhere")


def test_cache_file_is_readable_jsonl_and_export(tiny_generators, tmp_path):
    model = create_generator(f"hf-rewriter:{tiny_generators['rewriter']}", "rewriter")
    cache = TextCache(tmp_path / "texts.jsonl")
    prompt = resolve_prompt("ldre")
    requests = [prompt.request(caption="a dog", text="make it two dogs"), prompt.request(caption="a cat", text="red")]
    generate_cached(model, requests, GREEDY, 0, cache, "rewrite")
    lines = [json.loads(x) for x in (tmp_path / "texts.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["kind"] == "rewrite" and lines[0]["model"].startswith("dir:")
    assert "Image Content: a dog\nInstruction: make it two dogs" in lines[0]["messages"][-1]["content"]
    assert lines[0]["messages"][0] == {"role": "system", "content": PROMPTS["ldre"].system}
    reread = TextCache(tmp_path / "texts.jsonl")
    reread.get(lines[1]["key"])
    assert reread.export(tmp_path / "shipped.jsonl") == 1
    assert json.loads((tmp_path / "shipped.jsonl").read_text())["key"] == lines[1]["key"]


def test_malformed_cache_file_names_file_and_line(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"key": "a"}\n')
    with pytest.raises(ValueError, match=r"texts.jsonl:1: a generated-text record without"):
        len(TextCache(path))
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"texts.jsonl:1: not a JSON record"):
        len(TextCache(path))


def test_concurrent_writers_merge(tmp_path):
    record = {"model": "m", "kind": "caption", "messages": [], "image": None, "image_position": None, "sampling": {}}
    a, b = TextCache(tmp_path / "t.jsonl"), TextCache(tmp_path / "t.jsonl")
    len(a), len(b)  # both read the (empty) file before either writes
    a.put({**record, "key": "a", "outputs": ["x"]})
    b.put({**record, "key": "b", "outputs": ["y"]})
    a.flush()
    b.flush()
    assert set(TextCache(tmp_path / "t.jsonl")._records) == {"a", "b"}


def test_sampling_config_is_checked():
    with pytest.raises(ValueError, match="must not exceed num_beams"):
        SamplingConfig(num_return_sequences=3)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(do_sample=True, temperature=0)
    assert "seed" not in SamplingConfig().effective(3) and SamplingConfig(do_sample=True).effective(3)["seed"] == 3


@pytest.mark.parametrize(
    ("parser", "raw", "expected"),
    [
        ("cirevl", "Sure.\nEdited Description: two red dogs\nmore", "two red dogs"),
        ("cirevl", "Edited Description: at 10: noon", "at 10"),  # cut at the second colon, as the reference does
        ("cirevl", "no description here", "FALLBACK"),
        ("ldre", "Edited Description: a woman adjusting a man's tie.\n", "a woman adjusting a man's tie."),
        ("ldre", "  a cat on a mat", "a cat on a mat"),
        ("ldre", "", "FALLBACK"),
        (
            "osrcir",
            '<Response>\n{"Thoughts": "x", "Target Image Description": "a red star"}\n</Response>',
            "a red star",
        ),
        ("osrcir", '```json\n{"Target Image Description": "two dogs"}\n```', "two dogs"),
        ("osrcir", 'Here it is: {"Target Image Description": "a boat"} done', "a boat"),
        ("osrcir", '{"Thoughts": "no target"}', "FALLBACK"),
        ("plain", "\n a large red circle at the top left\nrest", "a large red circle at the top left"),
    ],
)
def test_parsers(parser, raw, expected):
    assert parse_answer(raw, parser, "FALLBACK") == expected


def test_prompts_fill_placeholders_literally():
    request = resolve_prompt("osrcir").request(text="make it {blue}", image=None)
    assert '"Manipulation text": make it {blue}.' in request.user and request.image_position == "after"
    assert (
        resolve_prompt("cirevl-structural")
        .request(caption="c", text="t")
        .user.endswith("Image Content: c\nInstruction: t")
    )
    assert resolve_prompt("my own {caption} / {text}").request(caption="a", text="b").user == "my own a / b"


def test_relevance_weights():
    d = 4
    gallery = torch.eye(d)  # (N, d)
    reference = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]]), dim=-1)
    edited = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]), dim=-1)
    # Caption 0 lowers no similarity, caption 1 drops the first gallery item from 1 to 0: it gets the weight.
    w = relevance_weights(edited, reference, gallery, topk=2, temperature=0.04)
    assert w.shape == (1, 2) and torch.allclose(w.sum(), torch.tensor(1.0)) and w[0, 1] > 0.99
    # No drop at all: uniform weights.
    same = relevance_weights(reference, reference, gallery, topk=2, temperature=0.04)
    assert torch.allclose(same, torch.full((1, 2), 0.5))
    # A memory-mapped style numpy gallery read in chunks gives the same weights.
    rng = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=rng), dim=-1)
    r = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=rng), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(40, 8, generator=rng), dim=-1)
    import cirlab.generation.steps as steps

    whole = relevance_weights(e, r, g, 5, 0.04)
    chunk, steps.GALLERY_CHUNK = steps.GALLERY_CHUNK, 7
    try:
        torch.testing.assert_close(relevance_weights(e, r, g.numpy(), 5, 0.04), whole)
    finally:
        steps.GALLERY_CHUNK = chunk
