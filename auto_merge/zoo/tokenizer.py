"""A character-level tokenizer for the zoo, saved as an ordinary Hugging Face fast tokenizer."""

from __future__ import annotations

import string

from auto_merge.zoo.world import SKILLS, key_chars

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + "=>?"


# Token -> id: the special tokens, digits, letters, the separators, then each skill's 256 key characters.
_VOCAB = {tok: i for i, tok in enumerate(
    list(SPECIAL_TOKENS) + list(CHARACTERS) + [ch for skill in SKILLS for ch in key_chars(skill)])}


def vocabulary() -> dict[str, int]:
    return dict(_VOCAB)


def build_tokenizer():
    """A `PreTrainedTokenizerFast` that splits text into characters and prepends `<s>` (as the models are trained)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # without it, decode() joins characters with spaces
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


def encode_chars(text: str) -> list[int]:
    """Token ids of `text` without special tokens, with no tokenizer object (the training loop's fast path)."""
    return [_VOCAB.get(ch, UNK_ID) for ch in text]
