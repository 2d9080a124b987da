"""The pseudo-word placeholder convention, owned by this one module.

Textual-inversion methods (Pic2Word, SEARLE, LinCIR, Map-to-Compose) write prompts such as
``"a photo of $ that is red"`` and replace the *input embedding* of the ``$`` token with a learned pseudo-word
token. Everything about that convention (the character, how prompts are filled, how the embedding is spliced)
lives here so no other file hard-codes a token id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PLACEHOLDER = "$"
DEFAULT_PROMPT = "a photo of $ that {text}"


def fill_prompt(template: str, text: str = "") -> str:
    """Fills ``{text}`` in a prompt template that contains exactly one placeholder.

    Raises:
        ValueError: if the template does not contain the placeholder exactly once.
    """
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"prompt template {template!r} must contain the placeholder {PLACEHOLDER!r} exactly once")
    return template.replace("{text}", text.strip()).strip()


def placeholder_token_id(tokenizer: Any) -> int:
    """The single token id a (Hugging Face) tokenizer gives the placeholder: what a backbone splices at.

    Raises:
        ValueError: the tokenizer splits the placeholder into several tokens.
    """
    ids = tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} into {len(ids)} tokens: {ids}")
    return int(ids[0])


def placeholder_positions(input_ids: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """Boolean mask (B, L) of placeholder positions; every row must hold at least one.

    Raises:
        ValueError: naming the rows without a placeholder (e.g. it was truncated away).
    """
    mask = input_ids == placeholder_id  # (B, L)
    missing = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"no placeholder token {PLACEHOLDER!r} in rows {missing} (was the prompt truncated?)")
    return mask


def splice_pseudo_tokens(
    token_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    placeholder_id: int,
    pseudo: torch.Tensor,
    first_only: bool = False,
) -> torch.Tensor:
    """Replaces the input embedding at every placeholder position with the row's pseudo-word token.

    Args:
        token_embeds: input token embeddings, (B, L, w).
        input_ids: token ids, (B, L).
        placeholder_id: the id the tokenizer gives to ``PLACEHOLDER``.
        pseudo: one token per row (B, w); a row with several placeholders gets the same token at each.
        first_only: replace only each row's first placeholder; later ones keep the embedding of the ``$`` word
            itself (SEARLE's public encoder does this; LinCIR's replaces every placeholder).

    Returns:
        New embeddings (B, L, w); gradients flow into ``pseudo``.
    """
    if pseudo.dim() != 2 or pseudo.shape[0] != token_embeds.shape[0] or pseudo.shape[1] != token_embeds.shape[2]:
        want = (token_embeds.shape[0], token_embeds.shape[2])
        raise ValueError(f"pseudo tokens must be (B, w) = {want}, got {tuple(pseudo.shape)}")
    import torch

    mask = placeholder_positions(input_ids, placeholder_id)  # (B, L)
    if first_only:
        mask = mask & (mask.cumsum(dim=1) == 1)
    mask = mask.unsqueeze(-1)  # (B, L, 1)
    return torch.where(mask, pseudo.unsqueeze(1).to(token_embeds.dtype), token_embeds)
