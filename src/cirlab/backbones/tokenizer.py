"""Offline tokenizers for the tiny and Shapes backbones: a small byte-level BPE trained with ``tokenizers``.

Byte-level BPE never produces an unknown token, so any text (including user queries) tokenizes. The placeholder
``$`` is an added token that absorbs the spaces around it, so ``"of $ that"`` gives exactly one ``$`` token.
"""

from __future__ import annotations

from collections.abc import Iterable

from cirlab.placeholder import PLACEHOLDER

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"

# A small built-in corpus so the ``tiny`` test backbone has a sensible vocabulary without any data.
BASIC_CORPUS = (
    "a photo of a cat . a photo of a dog . a picture of the same shirt but red and sleeveless . "
    "make the red circle blue . remove the small square . add a large green star at the top left . "
    "circle square triangle diamond cross star heart hexagon red green blue yellow purple orange cyan white "
    "black pink brown grey small large big little top bottom left right center middle that is with and "
    "the same but instead change colour color shape size move add remove there are is an of in on at to it"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 77):
    """Trains a lower-casing byte-level BPE on ``texts`` and wraps it as a transformers tokenizer.

    Args:
        texts: training corpus (one string per caption).
        vocab_size: target vocabulary size (the 256 byte symbols and special tokens included).
        max_length: the model's context length; longer inputs are truncated keeping the end token.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with BOS/EOS/PAD and the placeholder as a single token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # EOS must not get id 2: transformers pools legacy CLIP configs (eos id 2) at the highest token id instead.
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens([AddedToken(PLACEHOLDER, lstrip=True, rstrip=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
