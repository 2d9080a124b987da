"""The uniform method API (STYLE.md rule 5) and the checkpoint format every method shares.

A method composes L2-normalised queries (B, d) from reference-image features and texts, embeds gallery images
into the same space, declares its training stages (each with the kind of data it reads) and saves only what it
trained. Methods receive image *features* (``ImageFeatures``), so a frozen image encoder's outputs can come from
the feature cache; methods that fine-tune the image encoder set ``image_encoder_frozen = False`` and get pixels
encoded by their own (trainable) backbone.

Methods that describe the reference image with a captioner (CIReVL, LDRE, OSrCIR) need the image itself, not only
its features: they declare ``reads_reference_images`` (and, for a gallery-dependent query, ``reads_gallery``) and
``compose`` then receives a ``QueryContext`` holding what they declared; ``compose_with_context`` is how every
caller (the evaluation path, the index) calls ``compose``, so methods that read nothing more keep the plain
signature. Their generated texts go through ``text_cache``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.config import from_dict, to_dict
from cirlab.generation.cache import TextCache
from cirlab.io import atomic_path, atomic_write_json, read_json
from cirlab.registry import METHODS
from cirlab.types import ImageFeatures, QueryContext

if TYPE_CHECKING:
    from cirlab.data.pseudo_targets import PseudoTargetOptions

DataKind = Literal["images", "pairs", "captions", "triplets", "synthetic_triplets", "pseudo_triplets"]
BatchShape = Literal["images", "pairs", "captions", "triplets"]

DATA_KINDS: dict[str, BatchShape] = {
    "images": "images",
    "pairs": "pairs",
    "captions": "captions",
    "triplets": "triplets",
    "synthetic_triplets": "triplets",
    "pseudo_triplets": "triplets",
}
"""Every data kind a stage may read, and the shape of its batches (``training.data.make_batch_fn``): a new kind of
an existing shape is one entry here and a server in each training source that offers it."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Stage:
    """One training stage of a method.

    Attributes:
        name: stage name (``cirlab train --stage NAME``).
        data: what the stage reads (a key of ``DATA_KINDS``): ``images`` (images only), ``pairs`` (image +
            caption), ``captions`` (text only), ``triplets`` (the benchmark's supervised train triplets),
            ``synthetic_triplets`` or ``pseudo_triplets`` (train triplets with generated targets).
        zero_shot: True when the stage never sees a benchmark's human-annotated triplets.
    """

    name: str
    data: DataKind
    zero_shot: bool = True

    def __post_init__(self) -> None:
        if self.data not in DATA_KINDS:
            raise ValueError(f"stage {self.name!r}: unknown data kind {self.data!r}; known: {', '.join(DATA_KINDS)}")


@dataclass(frozen=True)
class DataRequest:
    """What one training stage reads, as its method states it (``CIRMethod.data_request``); every training data
    source serves it the same way (``training.sources.SplitSource.stage_data``).

    Attributes:
        kind: the stage's data kind (a key of ``DATA_KINDS``).
        backbone: whose cached features (or, with ``encode``, whose preprocessing) serve the images.
        tokens: cached image features include patch tokens.
        pair_embeddings: a ``pairs`` stage's rows are the (image, caption) pairs, each with the backbone's joint
            embedding ``z(I, T)`` (see ``CIRMethod.pair_embeddings``).
        pseudo_targets: where a ``pseudo_triplets`` stage's generated targets come from (None: the source's
            default, the Shapes renderer with its default noise).
        hard_negatives: mined hard negatives per triplet that the stage's batches carry.
        encode: a trainable image encoder (``CIRMethod.encode_images``): images are served as pixels it encodes at
            every access instead of cached features. None while the image encoder is frozen.
    """

    kind: DataKind
    backbone: Any
    tokens: bool = False
    pair_embeddings: bool = False
    pseudo_targets: PseudoTargetOptions | None = None
    hard_negatives: int = 0
    encode: Callable[[torch.Tensor], ImageFeatures] | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; known: {', '.join(DATA_KINDS)}")
        if self.kind == "pairs" and self.pair_embeddings and self.encode is not None:
            raise ValueError("pair embeddings come from a frozen backbone; this stage trains the image encoder")

    @property
    def batch_shape(self) -> BatchShape:
        """How the kind's batches are laid out (``DATA_KINDS``)."""
        return DATA_KINDS[self.kind]


@dataclass
class EmptyConfig:
    """Config of a method without settings."""


class CIRMethod(nn.Module):
    """Base class of every composed-retrieval method.

    Subclasses set ``name`` (via ``register_method``), ``config_class``, ``stages`` and implement ``compose``; trained
    methods also implement ``trainable_parameters`` and ``training_loss``. A method that adds modules inside the
    backbone (LoRA) or fine-tunes it must work on its own copy (``copy.deepcopy``): backbones are shared.

    Attributes:
        reads_reference_images: ``compose`` needs the reference images (``QueryContext.images``).
        reads_gallery: ``compose`` needs the gallery's embeddings (``QueryContext.gallery``).
        generators: config fields holding a text generator's spec (``hf-captioner:<id>``, ...), each with its role
            (``captioner``, ``rewriter``, ``reasoner``); a method with generators keeps its texts in ``text_cache``.
        optimises_per_query: ``compose`` runs an optimisation for each reference (SEARLE-OTI's textual inversion),
            so a query costs many backbone passes.
        text_cache: where generated texts are looked up and recorded (in memory unless a caller sets a file-backed
            ``cirlab.generation.TextCache``); None for methods without generators.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = EmptyConfig
    stages: ClassVar[tuple[Stage, ...]] = ()
    needs_image_tokens: ClassVar[bool] = False
    supervised: ClassVar[bool] = False
    reads_reference_images: ClassVar[bool] = False
    reads_gallery: ClassVar[bool] = False
    generators: ClassVar[dict[str, str]] = {}
    optimises_per_query: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, config: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        # Keys the backbone had before the method added anything (e.g. LoRA adapters); see trained_state_dict.
        self._backbone_keys = set(backbone.state_dict())
        self._finetuned_keys: set[str] = set()
        self._image_encoder_finetuned = False
        check_backbone(type(self), backbone)
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name}: expected {self.config_class.__name__}, got {type(self.config).__name__}")
        self.text_cache: TextCache | None = TextCache() if self.generators else None

    # -- inference -------------------------------------------------------------------------------------------------
    @property
    def image_encoder_frozen(self) -> bool:
        """Whether image features depend only on the (frozen) backbone, so cached features are valid."""
        return not self.image_encoder_training and not self._image_encoder_finetuned

    @property
    def image_encoder_training(self) -> bool:
        """Whether the image encoder has trainable parameters now (``prepare_stage`` decides). While it has none, an
        image's features do not change, even if an earlier stage fine-tuned the encoder."""
        return any(p.requires_grad for p in self.backbone.image_encoder_parameters())

    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        """Encodes pixels with the method's image encoder (the backbone's unless a method overrides it)."""
        return self.backbone.encode_image(pixels)

    def encode_gallery(self, images: ImageFeatures) -> torch.Tensor:
        """Gallery embeddings (N, d), L2-normalised; by default the backbone's image embedding."""
        return F.normalize(images.embeds.float(), dim=-1)

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        """Composed queries (B, d), L2-normalised, from reference-image features and modification texts.

        A method that declares ``reads_reference_images`` or ``reads_gallery`` takes a third argument,
        ``context: QueryContext``; call methods through ``compose_with_context``.
        """
        raise NotImplementedError

    # -- training --------------------------------------------------------------------------------------------------
    def stage(self, name: str) -> Stage:
        """The stage called ``name``; raises ``KeyError`` listing the method's stages."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{self.name} has no stage {name!r}; stages: {[s.name for s in self.stages] or 'none'}")

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        """Parameters trained in ``stage`` (everything else stays frozen)."""
        raise NotImplementedError(f"{self.name} has no trainable stage")

    def learning_rate_scales(self, stage: str) -> dict[int, float]:
        """Per-parameter multipliers of the stage's learning rate, keyed by ``id(param)``; unlisted ones train at 1x.

        The training loop turns distinct multipliers into optimizer parameter groups (e.g. TMCIR's fusion head
        trains faster than its encoders).
        """
        return {}

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss of one batch of ``stage``'s data: a dict with ``loss`` and optional logged scalars."""
        raise NotImplementedError(f"{self.name} has no trainable stage")

    def hard_negatives(self, stage: str) -> int:
        """Mined hard negatives per example a triplet stage wants in ``batch["hard_negatives"]`` (B * k images)."""
        return 0

    def pair_embeddings(self, stage: str) -> bool:
        """Whether a ``pairs`` stage wants the backbone's joint embedding of every (image, caption) pair.

        When True, the stage's rows are the pairs themselves and ``batch["image"]`` is ``PairFeatures`` with
        ``fused`` = ``z(I, T)``, computed once through the feature cache (the backbone must be a ``PairEncoder``).
        """
        return False

    def pseudo_targets(self, stage: str) -> PseudoTargetOptions | None:
        """Where a ``pseudo_triplets`` stage's pseudo-targets come from (None: the training source's default)."""
        return None

    def data_request(self, stage: str) -> DataRequest:
        """What ``stage`` reads (call after ``prepare_stage(stage)``, which decides whether the image encoder
        trains): its data kind, token and pair-embedding needs, pseudo-targets and hard negatives, and, when the
        image encoder is being fine-tuned, the encoder that turns served pixels into features."""
        return DataRequest(
            kind=self.stage(stage).data,
            backbone=self.backbone,
            tokens=self.needs_image_tokens,
            pair_embeddings=self.pair_embeddings(stage),
            pseudo_targets=self.pseudo_targets(stage),
            hard_negatives=self.hard_negatives(stage),
            encode=None if self.image_encoder_frozen else self.encode_images,
        )

    def prepare_data(self, stage: str, images: Any) -> Any:
        """Called by the trainer with ``stage``'s image table (``FeatureTable`` or pixels) before the stage trains;
        returns the table the stage trains on (by default ``images`` itself). Batches of an ``images`` stage carry
        ``batch["rows"]``, the rows of the returned table, so a method can keep per-image targets computed here
        (SEARLE's OTI tokens)."""
        return images

    def fashioniq_caption_join(self) -> str:
        """How the method reads a FashionIQ query's two captions: ``forward``, ``reverse`` or ``both`` (the two
        orders' normalised queries averaged); empty: as the split was loaded. Read from ``config.fashioniq_join``
        when the method's config has one."""
        return str(getattr(self.config, "fashioniq_join", "") or "")

    def prepare_stage(self, stage: str) -> None:
        """Sets ``requires_grad`` so that exactly ``trainable_parameters(stage)`` are trained; call before a stage."""
        trainable = {id(p) for p in self.trainable_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        backbone_trained = {id(p) for p in self.backbone.image_encoder_parameters()} & trainable
        if backbone_trained:
            self._image_encoder_finetuned = True

    # -- persistence -----------------------------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the method owns (not the backbone), plus backbone tensors it fine-tuned or added."""
        finetuned = self._finetuned_keys

        def owned(key: str) -> bool:
            return not key.startswith("backbone.") or key.removeprefix("backbone.") not in self._backbone_keys

        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if owned(k) or k in finetuned}

    def mark_backbone_finetuned(self, stage: str) -> None:
        """Records which backbone tensors ``stage`` trains, so checkpoints include them."""
        ids = {id(p) for p in self.trainable_parameters(stage)}
        names = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if id(p) in ids}
        self._finetuned_keys = self._finetuned_keys | names

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Writes ``config.json`` (method, backbone, config) and ``model.safetensors`` (trained parts only)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(self.trained_state_dict(), str(tmp), metadata={"method": self.name})
        meta = {
            "method": self.name,
            "backbone": self.backbone.name,
            "config": to_dict(self.config),
            "finetuned_backbone_keys": sorted(self._finetuned_keys),
            **(extra or {}),
        }
        atomic_write_json(path / CONFIG_FILE, meta)


def needs_context(method: Any) -> bool:
    """Whether ``method.compose`` takes a ``QueryContext`` (it reads reference images or the gallery)."""
    return bool(getattr(method, "reads_reference_images", False) or getattr(method, "reads_gallery", False))


def compose_with_context(
    method: Any, reference: ImageFeatures, texts: list[str], context: QueryContext | None = None
) -> torch.Tensor:
    """``method.compose``, with ``context`` when the method reads one.

    Raises:
        ValueError: the method reads reference images or the gallery and ``context`` lacks them.
    """
    if not needs_context(method):
        return method.compose(reference, texts)
    context = context or QueryContext()
    if method.reads_reference_images and (context.images is None or len(context.images) != len(texts)):
        got = "none" if context.images is None else len(context.images)
        raise ValueError(f"{method.name} reads the reference images: give one per query ({len(texts)}), got {got}")
    if method.reads_gallery and context.gallery is None:
        raise ValueError(f"{method.name} reads the gallery's embeddings; the context holds none")
    return method.compose(reference, texts, context)


def register_method(name: str):
    """Class decorator: registers a ``CIRMethod`` subclass under ``name`` and sets its ``name``."""

    def decorator(cls: type[CIRMethod]) -> type[CIRMethod]:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return decorator


def create_method(name: str, backbone: nn.Module, config: Any = None) -> CIRMethod:
    """Builds registered method ``name`` around ``backbone``; ``config`` may be a dataclass, a dict or None."""
    cls = METHODS.get(name)
    check_backbone(cls, backbone)  # before the method is built: some copy the backbone first
    if isinstance(config, dict):
        config = from_dict(cls.config_class, config)
    return cls(backbone, config)


def check_backbone(cls: type[CIRMethod], backbone: Any) -> None:
    """Raises ``ValueError`` when ``backbone`` cannot serve method class ``cls`` (patch tokens it lacks)."""
    if cls.needs_image_tokens and not backbone.has_image_tokens:
        raise ValueError(
            f"{cls.name} reads patch tokens, which the backbone {backbone.name} does not serve (it gives one embedding"
            " per image); use a CLIP backbone (hf-clip, open-clip)"
        )


def load_method(path: str | Path, backbone: nn.Module | None = None, device: str | torch.device = "cpu") -> CIRMethod:
    """Loads a checkpoint directory written by ``CIRMethod.save`` (the backbone is rebuilt from its spec).

    Raises:
        FileNotFoundError / ValueError: naming the directory and the missing or mismatched tensors.
    """
    from cirlab.backbones import create_backbone

    path = Path(path)
    meta = read_json(path / CONFIG_FILE)
    if not isinstance(meta, dict):
        raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(meta).__name__}")
    for key in ("method", "backbone", "config"):
        if key not in meta:
            raise ValueError(f"{path / CONFIG_FILE}: missing key {key!r}")
    if backbone is None:
        backbone = create_backbone(meta["backbone"])
    method = create_method(meta["method"], backbone.freeze(), meta["config"])
    weights = path / WEIGHTS_FILE
    state = read_weights(weights)
    own = method.trained_state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{weights}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    wrong = sorted(k for k in own if tuple(state[k].shape) != tuple(own[k].shape))
    if wrong:
        more = " ..." if len(wrong) > 5 else ""
        raise ValueError(f"{weights}: tensors whose shapes do not fit {meta['method']}: {wrong[:5]}{more}")
    result = method.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{weights}: unexpected tensors {result.unexpected_keys[:5]}")
    method._finetuned_keys = set(meta.get("finetuned_backbone_keys", []))
    return method.to(device).eval()


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file.

    Raises:
        FileNotFoundError / ValueError: naming the file when it is missing, truncated or not safetensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None


def load_weights(method: CIRMethod, path: str | Path) -> None:
    """Loads the trained tensors of checkpoint directory ``path`` into ``method`` (in place).

    Raises:
        ValueError: naming the directory when it was written by another method, or its tensors do not fit.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        written_by = read_json(path / CONFIG_FILE).get("method")
        if written_by != method.name:
            raise ValueError(f"{path}: a checkpoint of method {written_by!r}, not of {method.name!r}")
    state = read_weights(path / WEIGHTS_FILE)
    own = method.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or wrong:
        raise ValueError(
            f"{path / WEIGHTS_FILE}: tensors that do not fit {method.name}: "
            f"{(unexpected + wrong)[:5]}{' ...' if len(unexpected) + len(wrong) > 5 else ''}"
        )
    method.load_state_dict(state, strict=False)


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())
