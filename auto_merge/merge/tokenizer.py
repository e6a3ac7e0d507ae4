"""Output vocabulary and embedding-row alignment (``tokenizer_source``).

Rows of vocabulary tensors (input embeddings, the LM head) are matched **by token string**, never by id, so models
whose tokenizers number tokens differently still merge row by row.

- ``base`` (default) or a model reference: the output tokenizer is that model's, copied file by file; the output has
  that model's number of embedding rows.
- ``union``: the base's vocabulary, then every other model's tokens the base lacks, in a fixed order (models in recipe
  order, each model's tokens in its id order). The output tokenizer is the base's with those tokens added.

For each model feeding a vocabulary tensor, a :class:`RowMap` says which of its rows fills each output row; an
output token the model does not know gets the mean of that model's rows. Padding rows beyond a tokenizer's length
(vocabularies rounded up to a multiple) keep their position. When a model's tokenizer files are byte-identical to the
output's and its row count equals, no map is built and no tokenizer is loaded (the common case, e.g. the demo zoo).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from auto_merge.errors import AutoMergeError
from auto_merge.merge.io import TOKENIZER_FILES, copy_files

UNION = "union"
BASE = "base"


class VocabularyError(AutoMergeError, ValueError):
    """Vocabularies that cannot be aligned (e.g. a model without a tokenizer whose row count differs)."""


@dataclass(frozen=True)
class RowMap:
    """Output row r ← source row ``index[r]``; -1 means the mean of all source rows."""

    index: tuple[int, ...] = field(compare=False, repr=False)
    digest: str = field(default="")

    def __post_init__(self):
        if not self.digest:
            data = ",".join(map(str, self.index)).encode()
            object.__setattr__(self, "digest", hashlib.blake2b(data, digest_size=12).hexdigest())

    @property
    def rows(self) -> int:
        return len(self.index)

    @property
    def missing(self) -> int:
        return sum(1 for value in self.index if value < 0)

    def apply(self, tensor):
        import torch

        index = torch.tensor(self.index, dtype=torch.long, device=tensor.device)
        valid = index >= 0
        out = tensor.new_empty((len(self.index), *tensor.shape[1:]))
        out[valid] = tensor[index[valid]]
        if not bool(valid.all()):
            out[~valid] = tensor.mean(dim=0)
        return out


@dataclass(frozen=True)
class VocabularyPlan:
    """The output vocabulary: whose tokenizer, how many rows, tokens added by a union, and each model's row map."""

    mode: str  # "copy" or "union"
    tokenizer_model: str
    rows: int
    added_tokens: tuple[str, ...] = ()
    first_added_id: int = 0
    row_maps: Mapping[str, RowMap | None] = field(default_factory=dict)

    def row_map(self, model: str) -> RowMap | None:
        return self.row_maps.get(model)

    def describe(self) -> str:
        aligned = [f"{model} ({row_map.missing} row(s) filled with its mean row)"
                   for model, row_map in sorted(self.row_maps.items()) if row_map is not None]
        text = f"{self.mode} tokenizer of {self.tokenizer_model}, {self.rows} embedding rows"
        if self.added_tokens:
            text += f", {len(self.added_tokens)} token(s) added"
        if aligned:
            text += f"; rows re-mapped by token for {', '.join(aligned)}"
        return text


def tokenizer_fingerprint(folder: Path) -> str:
    """A digest of the tokenizer files' contents (recomputed only when a file's size or mtime changes)."""
    stats = []
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            stat = path.stat()
            stats.append((name, stat.st_size, stat.st_mtime_ns))
    return _content_digest(str(folder), tuple(stats))


@lru_cache(maxsize=256)
def _content_digest(folder: str, stats: tuple) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in stats:
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes() + b"\0")
    return digest.hexdigest()


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


@lru_cache(maxsize=64)
def _vocabulary(folder: str, fingerprint: str) -> tuple[tuple[str | None, ...], frozenset[str]]:
    """Token string of each id (None for unused ids) and the special added tokens; cached by file content."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id: dict[int, str] = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    size = max(by_id) + 1 if by_id else 0
    tokens = tuple(by_id.get(token_id) for token_id in range(size))
    special = frozenset(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return tokens, special


def vocabulary(folder: Path) -> tuple[tuple[str | None, ...], frozenset[str]]:
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise VocabularyError(f"{folder} has no tokenizer files, so its embedding rows cannot be matched by token")
    return _vocabulary(str(folder), tokenizer_fingerprint(folder))


def plan_vocabulary(
    tokenizer_source: str,
    target_model: str,
    folders: Mapping[str, Path],
    embedding_rows: Mapping[str, int],
    vocab_models: Sequence[str],
) -> VocabularyPlan:
    """Output vocabulary for ``tokenizer_source`` and a row map for each model of ``vocab_models``.

    ``target_model`` is the model whose tokenizer the output starts from (the base for ``base`` and ``union``, the
    named model otherwise); ``embedding_rows`` gives each model's number of vocabulary rows.
    """
    mode = "union" if tokenizer_source == UNION else "copy"
    target_rows = embedding_rows[target_model]
    fingerprints = {model: tokenizer_fingerprint(folders[model]) for model in {target_model, *vocab_models}}
    differing = [m for m in vocab_models
                 if fingerprints[m] != fingerprints[target_model] or embedding_rows[m] != target_rows]
    added: tuple[str, ...] = ()
    if mode == "union":
        target_tokens = vocabulary(folders[target_model])[0] if differing else ()
        known = {token for token in target_tokens if token is not None}
        extra: list[str] = []
        for model in vocab_models:
            if model == target_model or fingerprints[model] == fingerprints[target_model]:
                continue
            for token in vocabulary(folders[model])[0]:
                if token is not None and token not in known:
                    known.add(token)
                    extra.append(token)
        added = tuple(extra)
        if added:
            output_tokens: tuple[str | None, ...] = tuple(target_tokens) + added
            rows = max(target_rows, len(output_tokens))
            differing = list(vocab_models)  # every model's rows need a map when the row count grows
        else:
            output_tokens, rows = target_tokens, target_rows
    else:
        output_tokens = vocabulary(folders[target_model])[0] if differing else ()
        rows = target_rows

    row_maps: dict[str, RowMap | None] = {model: None for model in vocab_models}
    for model in differing:
        if not has_tokenizer(folders[model]) or not has_tokenizer(folders[target_model]):
            raise VocabularyError(
                f"{model} has {embedding_rows[model]} embedding rows and the output {rows}, and without tokenizers "
                f"on both sides the rows cannot be matched by token")
        source_tokens = vocabulary(folders[model])[0]
        row_maps[model] = _row_map(output_tokens, rows, source_tokens, embedding_rows[model])
    return VocabularyPlan(mode=mode, tokenizer_model=target_model, rows=rows, added_tokens=added,
                          first_added_id=len(output_tokens) - len(added), row_maps=row_maps)


def _row_map(output_tokens: Sequence[str | None], rows: int, source_tokens: Sequence[str | None],
             source_rows: int) -> RowMap | None:
    source_ids = {token: token_id for token_id, token in enumerate(source_tokens)
                  if token is not None and token_id < source_rows}
    index = []
    for row in range(rows):
        token = output_tokens[row] if row < len(output_tokens) else None
        if token is not None:
            index.append(source_ids.get(token, -1))
        else:  # padding row: keep the position when the source has it
            index.append(row if row < source_rows else -1)
    if rows == source_rows and index == list(range(rows)):
        return None
    return RowMap(tuple(index))


def write_tokenizer(plan: VocabularyPlan, folders: Mapping[str, Path], out_dir: Path) -> list[str]:
    """Write the output tokenizer into ``out_dir``; returns the files written."""
    source = Path(folders[plan.tokenizer_model])
    if not plan.added_tokens:
        return copy_files(source, out_dir, TOKENIZER_FILES)
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    special = set()
    for model, folder in folders.items():
        if has_tokenizer(folder) and model != plan.tokenizer_model:
            special |= vocabulary(folder)[1]
    tokenizer.add_tokens([AddedToken(token, special=token in special, normalized=token not in special)
                          for token in plan.added_tokens])
    ids = tokenizer.convert_tokens_to_ids(list(plan.added_tokens))
    expected = list(range(plan.first_added_id, plan.first_added_id + len(plan.added_tokens)))
    if ids != expected:
        raise VocabularyError(f"the union tokenizer numbered its added tokens {ids[:5]}..., expected {expected[:5]}...")
    before = {path.name for path in out_dir.iterdir()}
    tokenizer.save_pretrained(str(out_dir))
    return sorted({path.name for path in out_dir.iterdir()} - before)
