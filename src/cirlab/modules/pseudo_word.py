"""Reading a prompt that holds a pseudo-word: ``q = t(prompt with $ := s)``, shared by textual-inversion methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cirlab.placeholder import fill_prompt, splice_pseudo_tokens
from cirlab.types import TextFeatures


def encode_with_pseudo(backbone, prompts: list[str], pseudo: torch.Tensor, first_only: bool = False) -> TextFeatures:
    """Encodes ``prompts`` (each with at least one ``$``) with ``pseudo`` (B, w_t) spliced at the placeholder (every
    one, or with ``first_only`` the first of each prompt)."""
    tokens = backbone.tokenize(prompts)
    embeds = backbone.token_embeddings(tokens.input_ids)  # (B, L, w_t)
    embeds = splice_pseudo_tokens(embeds, tokens.input_ids, backbone.placeholder_token_id, pseudo, first_only)
    return backbone.encode_text_embeds(embeds, tokens)


def prompt_query(
    backbone, template: str, texts: list[str], pseudo: torch.Tensor, first_only: bool = False
) -> torch.Tensor:
    """``norm(t(template with {text} filled and $ := pseudo))``, shape (B, d).

    A modification text may itself hold a ``$``; with ``first_only`` only the template's (first) one is replaced.
    """
    prompts = [fill_prompt(template, t) for t in texts]
    return F.normalize(encode_with_pseudo(backbone, prompts, pseudo, first_only).embeds.float(), dim=-1)


def text_embeds(backbone, texts: list[str]) -> torch.Tensor:
    """``norm(t(texts))``, shape (B, d)."""
    return F.normalize(backbone.encode_text(backbone.tokenize(texts)).embeds.float(), dim=-1)
