"""The peer baselines as their public code ships them: one test per bug found against the reference repositories,
SEARLE's OTI and distillation, and the departures that became config fields."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cirlab
from cirlab.data.fashioniq import load_fashioniq, training_captions
from cirlab.evaluation.evaluate import compose_queries, method_view
from cirlab.features.table import FeatureTable
from cirlab.methods import create_method
from cirlab.methods.base import CIRMethod
from cirlab.methods.lincir import LinCIR, LinCIRConfig
from cirlab.methods.pic2word import Pic2Word
from cirlab.methods.searle import Searle, SearleConfig
from cirlab.modules.oti import ConceptBank, ConceptConfig, OTIConfig, oti_invert
from cirlab.modules.pseudo_word import encode_with_pseudo
from cirlab.training.data import Triplet, make_batch_fn
from cirlab.training.loop import TrainConfig, train
from cirlab.training.run import validation_splits
from cirlab.training.run_config import load_run_config
from cirlab.types import ImageFeatures

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
CAPTIONS = ["a large red circle", "a small blue square", "a green star at the top", "two yellow triangles",
            "a purple cross on the left", "a white diamond", "a dog on the beach", "a cat in the kitchen"]  # fmt: skip


@pytest.fixture(scope="module")
def reachable(tiny_backbone) -> torch.Tensor:
    """Raw "image" embeddings the tiny text tower can reach: its own embeddings of distinct captions (a random tiny
    ViT maps noise images to nearly one direction, which no token could tell apart)."""
    with torch.no_grad():
        return tiny_backbone.encode_text(tiny_backbone.tokenize(CAPTIONS)).embeds.float()


# --- bug 1: Pic2Word's IM2TEXT has n_layer = 2 ------------------------------------------------------------------------


def test_pic2word_mapper_has_two_hidden_blocks_and_reads_the_raw_embedding(tiny_backbone):
    method = Pic2Word(tiny_backbone)
    linears = [m for m in method.phi.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3, "IM2TEXT: n_layer = 2 hidden blocks, then the output layer"
    raw = torch.randn(2, tiny_backbone.embed_dim) * 7
    torch.testing.assert_close(method.phi_input(raw), raw)


# --- bug 2: SEARLE = OTI + phi distilled from OTI tokens --------------------------------------------------------------


def test_oti_loss_falls_and_the_token_retrieves_its_own_image(tiny_backbone, reachable):
    bank = ConceptBank(tiny_backbone, ConceptConfig())
    config = OTIConfig(steps=100, batch_size=8, templates=["{}"])

    def cos_loss(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = encode_with_pseudo(tiny_backbone, ["$"] * len(tokens), tokens).embeds
        return 1 - F.cosine_similarity(t, reachable, dim=-1)

    init = torch.randn(tiny_backbone.token_dim, generator=torch.Generator().manual_seed(0)) * config.init_std
    tokens = oti_invert(tiny_backbone, reachable, bank, config)
    assert tokens.shape == (len(CAPTIONS), tiny_backbone.token_dim)
    before, after = cos_loss(init.expand(len(CAPTIONS), -1)).mean(), cos_loss(tokens).mean()
    assert after < 0.5 * before, f"OTI loss {before:.3f} -> {after:.3f}"
    with torch.no_grad():
        t = F.normalize(encode_with_pseudo(tiny_backbone, ["$"] * len(tokens), tokens).embeds, dim=-1)
    ranks = (t @ F.normalize(reachable, dim=-1).t()).argmax(dim=1)
    assert ranks.tolist() == list(range(len(CAPTIONS))), "each token retrieves its own image"
    # A token depends on its image only, not on the batch it was optimised in.
    alone = oti_invert(tiny_backbone, reachable[3:4], bank, config)
    torch.testing.assert_close(alone, tokens[3:4], atol=1e-4, rtol=1e-3)


def test_searle_distillation_moves_phi_towards_given_oti_tokens(tiny_backbone, reachable, tmp_path):
    method = Searle(tiny_backbone, SearleConfig(lambda_gpt=0.0))
    given = torch.randn(len(CAPTIONS), tiny_backbone.token_dim, generator=torch.Generator().manual_seed(1))
    method.teacher = given
    table = FeatureTable([f"i{i}" for i in range(len(CAPTIONS))], reachable)
    batch_fn = make_batch_fn("images", len(CAPTIONS), seed=0, images=table)

    def agreement() -> float:
        method.eval()
        with torch.no_grad():
            return F.cosine_similarity(method.phi(method.phi_input(reachable)), given, dim=-1).mean().item()

    before = agreement()
    cfg = TrainConfig(steps=60, batch_size=len(CAPTIONS), lr=3e-3, warmup=0.0, progress=False, log_every=100)
    params = method.trainable_parameters("mapping")
    train(method, params, batch_fn, lambda b: method.training_loss("mapping", b), cfg, tmp_path / "run", resume=False)
    assert agreement() > before + 0.3, "phi moved towards the OTI tokens"
    assert set(method.training_loss("mapping", batch_fn(0, 0))) == {"loss", "distil", "gpt"}


def test_searle_prepare_data_inverts_the_first_images_and_batches_carry_rows(tiny_backbone, reachable):
    config = SearleConfig(oti_images=3, oti=OTIConfig(steps=2, batch_size=2))
    method = Searle(tiny_backbone, config)
    table = FeatureTable([f"i{i}" for i in range(len(CAPTIONS))], reachable)
    kept = method.prepare_data("mapping", table)
    assert len(kept) == 3 and method.teacher.shape == (3, tiny_backbone.token_dim)
    batch = make_batch_fn("images", 2, seed=0, images=kept)(0, 0)
    assert batch["rows"].max() < 3 and torch.isfinite(method.training_loss("mapping", batch)["loss"])


def test_searle_oti_is_registered_and_listed(capsys):
    from cirlab.cli.main import main

    assert "searle-oti" in cirlab.list_methods()
    assert main(["list"]) == 0 and "searle-oti" in capsys.readouterr().out


# --- bug 3: the SEARLE presets' temperature is the distillation's -----------------------------------------------------


def test_both_searle_presets_distil_at_the_reference_temperature():
    presets = [load_run_config("searle", p).method for p in ("imagenet-vitl14", "shapes")]
    assert [c.temperature for c in presets] == [0.25, 0.25]
    assert [c.lambda_gpt for c in presets] == [0.75, 0.75]


# --- bug 4: LinCIR's noise on the raw embedding, plain MSE ------------------------------------------------------------


def test_lincir_adds_noise_to_the_raw_text_embedding_and_trains_on_plain_mse(tiny_backbone, monkeypatch):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=["circle", "square"], noise_max=0.0)).eval()
    captions = ["a large red circle at the top", "a small blue square"]
    seen = {}
    phi = method.phi.forward
    monkeypatch.setattr(method.phi, "forward", lambda x: seen.setdefault("x", x) is not None and phi(x))
    loss = method.training_loss("mapping", {"caption": captions})["loss"]
    with torch.no_grad():
        raw = tiny_backbone.encode_text(tiny_backbone.tokenize(captions)).embeds.float()
        pred = encode_with_pseudo(tiny_backbone, ["a large red $ at the top", "a small blue $"], phi(raw)).embeds
    torch.testing.assert_close(seen["x"], raw)  # sigma = 0: phi reads the raw embedding itself
    assert raw.norm(dim=-1).sub(1).abs().max() > 0.05, "the test needs embeddings that are not unit-norm"
    torch.testing.assert_close(loss, F.mse_loss(pred.float(), raw))


# --- bug 5: FashionIQ caption_join="both" averages the two normalised queries -----------------------------------------


class _TextHash(CIRMethod):
    """Queries that depend only on the text (a fixed random embedding per word), for checking how texts are read."""

    name = "text-hash"

    def __init__(self, backbone, join: str = "") -> None:
        super().__init__(backbone)
        self.join = join
        self.words: dict[str, torch.Tensor] = {}

    def fashioniq_caption_join(self) -> str:
        return self.join

    def embed(self, text: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(len(self.words))
        vectors = [self.words.setdefault(w, torch.randn(4, generator=g)) for w in text.split()]
        weights = torch.arange(1, len(vectors) + 1, dtype=torch.float32)  # order matters
        return F.normalize(sum(w * v for w, v in zip(weights, vectors, strict=True)), dim=-1)

    def compose(self, reference, texts):
        return torch.stack([self.embed(t) for t in texts])


def test_fashioniq_both_averages_the_normalised_queries_of_both_orders(tiny_backbone):
    split = load_fashioniq(FIXTURES / "fashioniq", None, "val", category="dress", caption_join="both")
    feats = FeatureTable(split.gallery, torch.randn(len(split.gallery), 4))
    method = _TextHash(tiny_backbone)
    queries = compose_queries(method, split, feats)
    for q, got in zip(split.queries, queries, strict=True):
        forward, reverse = q.extra["text_variants"]
        expected = F.normalize(method.embed(forward) + method.embed(reverse), dim=-1)
        torch.testing.assert_close(got, expected)
    # A method's own convention re-joins a split loaded in the default (forward) order.
    forward_split = load_fashioniq(FIXTURES / "fashioniq", None, "val", category="dress")
    view = method_view(_TextHash(tiny_backbone, "both"), forward_split)
    assert [q.extra["text_variants"] for q in view.queries] == [q.extra["text_variants"] for q in split.queries]
    assert "averaged" in view.describe()
    assert (
        method_view(Pic2Word(tiny_backbone), forward_split).queries[0].text == "fit and flare and is shiny and silver"
    )
    assert Searle(tiny_backbone).fashioniq_caption_join() == "both" == LinCIR(tiny_backbone).fashioniq_caption_join()


# --- bug 6: LinCIR truncates first, falls back to "a photo of $", strips literal $ ------------------------------------


def test_lincir_survives_captions_longer_than_the_context(tiny_backbone):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=["circle"]))
    long = " ".join(["left"] * 60) + " and a red circle"  # the only keyword lies past the 32-token context
    assert torch.isfinite(method.training_loss("mapping", {"caption": [long, "a circle"]})["loss"])
    cleaned, masked = method.training_texts([long, "costs $5 and a circle"])
    assert "$" not in cleaned[1] and masked[1].count("$") == 1
    ids = tiny_backbone.tokenize(masked).input_ids
    assert (ids == tiny_backbone.placeholder_token_id).any(dim=1).all()
    assert len(tiny_backbone.tokenize([cleaned[0]]).input_ids[0]) <= 32


def test_lincir_falls_back_to_its_prompt_when_the_placeholder_is_cut(tiny_backbone, monkeypatch):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=["circle"]))
    monkeypatch.setattr(method, "mask_keywords", lambda c, generator=None: " ".join(["left"] * 60) + " $")
    assert method.training_texts(["a circle"])[1] == ["a photo of $"]


# --- departures made config fields ------------------------------------------------------------------------------------


def test_lincir_masks_part_of_speech_runs_with_a_spacy_pipeline(tiny_backbone, tmp_path):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for pos, words in {
        "DET": ["a", "the"],
        "ADJ": ["large", "red", "blue"],
        "NOUN": ["circle", "top", "square"],
    }.items():
        ruler.add([[{"LOWER": {"IN": words}}]], {"POS": pos})
    nlp.to_disk(tmp_path / "pos")
    method = LinCIR(tiny_backbone, LinCIRConfig(tagger=str(tmp_path / "pos")))
    assert method.masked_runs("a large red circle at the top") == ["a large red circle", "the top"]
    assert method.mask_keywords("a large red circle at the top") == "$ at $"
    assert method.mask_keywords("a red circle near a blue square") == "$ near $"


def test_lincir_without_a_run_masks_one_random_word(tiny_backbone):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=["circle"]))
    masked = method.mask_keywords("photo of nothing", torch.Generator().manual_seed(0))
    assert masked.count("$") == 1 and len(masked.split()) == 3


def test_searle_splices_the_token_at_the_first_placeholder_only(tiny_backbone):
    token = torch.randn(1, tiny_backbone.token_dim)
    first = encode_with_pseudo(tiny_backbone, ["$ and $"], token, first_only=True).embeds
    every = encode_with_pseudo(tiny_backbone, ["$ and $"], token).embeds
    ids = tiny_backbone.tokenize(["$ and $"]).input_ids
    embeds = tiny_backbone.token_embeddings(ids)
    embeds[0, (ids[0] == tiny_backbone.placeholder_token_id).nonzero()[0, 0]] = token[0]
    torch.testing.assert_close(
        first, tiny_backbone.encode_text_embeds(embeds, tiny_backbone.tokenize(["$ and $"])).embeds
    )
    assert not torch.allclose(first, every)


def test_combiner_is_clip4cirs_with_a_residual_over_the_raw_features(tiny_backbone):
    method = create_method("combiner", tiny_backbone, {"finetune": "none"}).eval()
    d = tiny_backbone.embed_dim
    assert method.text_projection[0].out_features == 4 * d and method.combiner_layer[0].out_features == 8 * d
    assert [s.name for s in method.stages] == ["combiner"] and method.backbone is tiny_backbone
    torch.nn.init.zeros_(method.output_layer.weight)
    torch.nn.init.zeros_(method.output_layer.bias)
    v, t = torch.randn(2, d) * 5, torch.randn(2, d) * 5
    joint = torch.cat([method.text_projection(t), method.image_projection(v)], dim=-1)
    lam = torch.sigmoid(method.dynamic_scalar(joint))
    torch.testing.assert_close(method.combine(v, t), F.normalize(lam * t + (1 - lam) * v, dim=-1))
    tuned = create_method("combiner", tiny_backbone)  # the reference's stage 1 fine-tunes both encoders
    assert [s.name for s in tuned.stages] == ["finetune", "combiner"] and tuned.backbone is not tiny_backbone
    assert not tuned.image_encoder_frozen


def test_the_combiners_text_fine_tuning_leaves_the_image_embedding_alone(tiny_backbone):
    method = create_method("combiner", tiny_backbone, {"finetune": "text"})
    trained = {id(p) for p in method.trainable_parameters("finetune")}
    projection = {id(p) for p in method.backbone.model.visual_projection.parameters()}
    assert trained and not trained & projection  # the projection is part of the image encoder, as in CLIP
    method.prepare_stage("finetune")
    assert method.image_encoder_frozen  # so cached image features stay valid


def test_the_combiner_stage_encodes_each_text_once_and_forgets_at_a_new_stage(tiny_backbone):
    tuned = create_method("combiner", tiny_backbone).eval()
    tuned.prepare_stage("combiner")
    texts = ["make it red", "a blue circle", "make it red"]
    calls: list[list[str]] = []
    encode = tuned.text_features
    tuned.text_features = lambda batch: calls.append(list(batch)) or encode(batch)
    cached = tuned._frozen_text_features(texts)
    torch.testing.assert_close(cached, encode(texts))
    tuned._frozen_text_features(["a blue circle", "a green star"])
    assert calls == [["make it red", "a blue circle"], ["a green star"]]  # each text once per stage
    with torch.no_grad():  # stage 1 changes the text encoder: a new stage must not serve stale features
        for q in tuned.backbone.parameters():
            q.add_(0.01)
    tuned.prepare_stage("combiner")
    torch.testing.assert_close(tuned._frozen_text_features(texts), encode(texts))
    assert not torch.allclose(tuned._frozen_text_features(texts), cached)


def test_fashioniq_training_text_is_drawn_from_four_combinations():
    options = training_captions(["is red.", " has sleeves "])
    assert options == ["is red and has sleeves", "has sleeves and is red", "is red", "has sleeves"]
    triplets = [Triplet("a", options[0], "b", tuple(options))]
    feats = FeatureTable(["a", "b"], torch.randn(2, 4))
    batch = make_batch_fn("triplets", 1, seed=0, images=feats, triplets=triplets)
    assert {batch(step, 0)["text"][0] for step in range(40)} == set(options)


def test_fashioniq_validation_covers_the_three_categories():
    assert validation_splits("fashioniq/val") == [f"fashioniq/val/{c}" for c in ("dress", "shirt", "toptee")]
    assert validation_splits("fashioniq/val/dress") == ["fashioniq/val/dress"]
    assert validation_splits("cirr/val") == ["cirr/val"] and validation_splits(None) == []
    assert load_run_config("combiner", "fashioniq-vitl14").data.val == "fashioniq/val"


def test_targetpad_travels_with_the_backbone_spec(tiny_backbone, tmp_path):
    from PIL import Image

    padded = cirlab.create_backbone("tiny#targetpad=1.25")
    assert padded.name == "tiny#targetpad=1.25" and padded.image_transform.pad_ratio == 1.25
    assert padded.identity() != tiny_backbone.identity()
    assert padded.image_transform.target_pad(Image.new("RGB", (100, 40))).size == (100, 80)
    assert padded.image_transform.target_pad(Image.new("RGB", (50, 45))).size == (50, 45)  # below the ratio
    padded.save_pretrained(tmp_path / "clip")
    assert cirlab.create_backbone(f"hf-clip:{tmp_path / 'clip'}").image_transform.pad_ratio == 1.25
    with pytest.raises(ValueError, match="unknown option"):
        cirlab.create_backbone("tiny#centrepad")


def test_optimizer_settings_reach_the_optimizer(tiny_backbone, tmp_path):
    from cirlab.training.loop import make_optimizer, param_groups

    layer = torch.nn.Linear(3, 3)
    named = dict(layer.named_parameters())
    cfg = TrainConfig(optimizer="adam", betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    opt = make_optimizer(param_groups(named, cfg, {}), cfg)
    assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    decay_all = param_groups(named, TrainConfig(decay_all=True), {})
    assert [g["weight_decay"] for g in decay_all] == [0.01]


PEER_PRESETS = [("cc3m-vitl14", "pic2word"), ("imagenet-vitl14", "searle"), ("cc3m-vitl14", "lincir"),
                ("cirr-vitl14", "combiner"), ("fashioniq-vitl14", "combiner")]  # fmt: skip


@pytest.mark.parametrize(("preset", "method"), PEER_PRESETS)
def test_peer_presets_follow_the_reference_and_say_where_from(preset, method):
    cfg = load_run_config(method, preset)
    text = (Path(cirlab.__file__).parent / "configs" / preset / f"{method}.yaml").read_text()
    assert "github.com/" in text and ".py" in text, "the comment names the reference file or command"
    stages = [getattr(cfg, s.name) for s in cirlab.methods.METHODS.get(method).stages]
    assert all(s.max_grad_norm == 0 for s in stages), "no peer clips gradients"
    assert not getattr(cfg.method, "normalize_input", False) and not getattr(cfg.method, "normalize_inputs", False)


def test_circo_digit_string_ids_are_accepted_with_a_note(tmp_path, capsys):
    from cirlab.cli.main import main
    from cirlab.data.circo import load_circo
    from cirlab.evaluation import submission as S

    split = load_circo(FIXTURES / "circo", None, "val")
    ints = S.circo_submission_object(split, torch.rand(len(split.queries), 8), torch.rand(len(split.gallery), 8))
    strings = {k: [str(i) for i in v] for k, v in ints.items()}
    path = tmp_path / "strings.json"
    path.write_text(json.dumps(strings))
    args = ["--dataset", "circo", "--split", "val", "--annotations", str(FIXTURES / "circo")]
    assert main(["check-submission", str(path), *args]) == 0
    assert "digit strings" in capsys.readouterr().out
    (tmp_path / "ints.json").write_text(json.dumps(ints))
    assert S.score_submission([path], "circo", "val", FIXTURES / "circo") == S.score_submission(
        [tmp_path / "ints.json"], "circo", "val", FIXTURES / "circo"
    )
    strings["0"][1] = strings["0"][0]
    path.write_text(json.dumps(strings))
    assert any("duplicate" in p for p in S.check_submission(path, "circo", "val", FIXTURES / "circo"))


def test_other_methods_train_on_the_stage_images_as_given(tiny_backbone):
    method = create_method("pic2word", copy.deepcopy(tiny_backbone))
    feats = FeatureTable(["x"], torch.randn(1, tiny_backbone.embed_dim))
    assert method.prepare_data("mapping", feats) is feats
    assert isinstance(feats.gather(torch.tensor([0])), ImageFeatures)


def test_searle_phrase_loss_draws_from_the_top_150_concepts_as_train_phi_does(tiny_backbone, reachable):
    """SEARLE's train_phi.py draws the phrase loss's concept from an image's top 150 (``--top-k-concepts``), OTI from
    its top 15 (``--top-k``): the two pools differ."""
    method = Searle(tiny_backbone)
    assert method.config.top_k_concepts == 150 and method.config.concepts.top_k == 15
    bank = method.concept_bank()
    drawn = set()
    pair = bank.phrase_pair

    def recording(concept, phrase, first_only):
        drawn.add(concept)
        return pair(concept, phrase, first_only)

    bank.phrase_pair = recording
    image = reachable[:1].expand(64, -1)
    for _ in range(8):
        method._phrase_loss(image, torch.zeros(64, tiny_backbone.token_dim))
    assert len(drawn) > bank.top_k, f"{len(drawn)} concepts drawn: only OTI's top {bank.top_k} were used"
    assert drawn <= set(bank.candidates(image[:1], top_k=150)[0])


def test_pic2word_splices_the_token_at_the_prompts_placeholder_only(tiny_backbone):
    """IM2TEXT's encode_text_img_retrieval inserts the token at the first placeholder; a "$" in the modification
    text is an ordinary word there."""
    from cirlab.modules.pseudo_word import prompt_query

    method = Pic2Word(tiny_backbone).eval()
    reference = ImageFeatures(torch.randn(1, tiny_backbone.embed_dim), None)
    texts = ["costs $ 5 less"]
    with torch.no_grad():
        pseudo = method.phi(method.phi_input(reference.embeds))
        first = prompt_query(tiny_backbone, method.config.prompt, texts, pseudo, first_only=True)
        every = prompt_query(tiny_backbone, method.config.prompt, texts, pseudo)
        got = method.compose(reference, texts)
    assert not torch.allclose(first, every)
    torch.testing.assert_close(got, first)


def test_lincir_masks_with_a_placeholder_that_punctuation_cannot_swallow(tiny_backbone):
    """LinCIR inserts "[$]", a token of its own, so "[$]." still holds it; CLIP's BPE merges "$." and "$)" into one
    token that is not the placeholder, so a bare "$" next to punctuation lost it (and the caption fell back to
    "a photo of $"). The placeholder must stand as a word of its own."""
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=["dog", "park", "cat", "kitten"]))
    for caption, want in [("a dog in the park.", "$ in $ ."), ("a cat (a kitten)", "$ ( $ )")]:
        masked = method.mask_keywords(caption)
        assert masked == want, masked
        assert all(word == "$" or "$" not in word for word in masked.split()), masked
