"""Output vocabulary and embedding-row alignment (``tokenizer_source``).

Rows of vocabulary tensors (input embeddings, the LM head) are matched **by token string**, never by id, so models
whose tokenizers number tokens differently still merge row by row.

- ``base`` (default) or a model reference: the output tokenizer is that model's, copied file by file; the output has
  that model's number of embedding rows.
- ``union``: the base's vocabulary, then every other model's tokens the base lacks, in a fixed order (models in recipe
  order, each model's tokens in its id order). The output tokenizer is the base's with those tokens added.

For each model feeding a vocabulary tensor, a :class:`RowMap` says which of its rows fills each output row. An output
token a model does not know gets mergekit 0.1.5's default row (its ``PermutedVocabulary``), taken over the models that
feed the tensor (:func:`align_rows`): the row of the only model that has the token, else the base model's row when the
base has it, else the mean of the rows of the models that have it; zeros when none has it. Padding rows beyond a
tokenizer's length (vocabularies rounded up to a multiple) keep their position; one a model lacks gets the mean of
that model's rows. When a model's tokenizer files are byte-identical to the
output's and its row count equals, no map is built and no tokenizer is loaded (the common case, e.g. the demo zoo).

mergekit's ``tokenizer:`` block (``source``: base, union (its default) or a model; ``tokens``; ``pad_to_multiple_of``)
builds the same vocabulary, then appends the ``tokens`` it lacks; the output has one row per token (mergekit drops a
tokenizer's padding rows), rounded up to ``pad_to_multiple_of`` (those rows get the mean of each model's token rows
before the merge). A token's ``source`` replaces the default row where a model lacks the token, or in every model with
``force: true``: a model (its row of the token; the model must feed that tensor and have the token),
``{kind: model_token, model, token | token_id}`` (that model's row of another token) or ``{kind: zero}``. Union order
is deterministic here (models in recipe order); mergekit's follows Python set order, so a union of several models'
new tokens may number them differently there.

``chat_template`` (mergekit 0.1.5's key) replaces the output tokenizer's chat template: ``auto`` takes the template
most of the merged models have (ties: the first in recipe order, base first; no model has one: the output keeps its
tokenizer's), a name (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``) takes mergekit's template of that
name, and any other text is the Jinja template itself (mergekit's rule: it must contain ``{`` and be at least 20
characters long). It is written as ``chat_template.jinja`` and as the ``chat_template`` key of the output's
``tokenizer_config.json`` (and of ``chat_template.json`` when the tokenizer has one), so every transformers version
reads the same template; no tokenizer is loaded for it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from auto_merge.errors import AutoMergeError
from auto_merge.models.inspect import CHAT_TEMPLATE_FILE, model_chat_template
from auto_merge.merge.io import TOKENIZER_FILES, copy_files

UNION = "union"
BASE = "base"


class VocabularyError(AutoMergeError, ValueError):
    """Vocabularies that cannot be aligned (e.g. a model without a tokenizer whose row count differs)."""


MISSING = -1  # the model lacks the row's token: mergekit's default row (align_rows)
PADDING = -2  # a padding row the model lacks: the mean of the model's rows
PAD_MEAN = -3  # a row added by `pad_to_multiple_of`: the mean of the model's aligned token rows (mergekit's rule)


@dataclass(frozen=True)
class TokenRule:
    """A `tokenizer.tokens` entry on output row ``row``: the embedding is model ``model``'s row of that token
    (``kind`` "model"), its stored row ``source_row`` ("model_token") or zeros ("zero"); it fills the rows of the
    models that lack the token, and of every model with ``force``."""

    row: int
    force: bool
    kind: str
    model: str | None = None
    source_row: int | None = None


@dataclass(frozen=True)
class TokenRules:
    """The tokenizer block's per-token rules, shared by every vocabulary tensor's row maps."""

    rules: tuple[TokenRule, ...] = ()
    digest: str = ""

    def __post_init__(self):
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.blake2b(repr(self.rules).encode(), digest_size=12).hexdigest())


@dataclass(frozen=True)
class RowMap:
    """Output row r ← source row ``index[r]``; ``MISSING`` (-1): the token's default row across the models
    (:func:`align_rows`); ``PADDING`` (-2): the mean of the source's rows."""

    index: tuple[int, ...] = field(compare=False, repr=False)
    digest: str = field(default="")
    rules: TokenRules | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.digest:
            data = ",".join(map(str, self.index)) + (self.rules.digest if self.rules is not None else "")
            object.__setattr__(self, "digest", hashlib.blake2b(data.encode(), digest_size=12).hexdigest())

    @property
    def rows(self) -> int:
        return len(self.index)

    @property
    def missing(self) -> int:
        return sum(1 for value in self.index if value < 0)

    def apply(self, tensor):
        """This model's rows alone: rows it lacks (missing tokens or padding) get the mean of its rows; a merge uses
        :func:`align_rows`, which gives missing tokens mergekit's default across the models."""
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
    extra_tokens: tuple[str, ...] = ()  # `tokenizer.tokens` the vocabulary lacked, added after `added_tokens`
    padded_rows: int = 0  # rows added by `pad_to_multiple_of`

    def row_map(self, model: str) -> RowMap | None:
        return self.row_maps.get(model)

    def describe(self) -> str:
        aligned = [f"{model} ({row_map.missing} row(s) it lacks)"
                   for model, row_map in sorted(self.row_maps.items()) if row_map is not None]
        text = f"{self.mode} tokenizer of {self.tokenizer_model}, {self.rows} embedding rows"
        if self.added_tokens or self.extra_tokens:
            text += f", {len(self.added_tokens) + len(self.extra_tokens)} token(s) added"
        if self.padded_rows:
            text += f" ({self.padded_rows} padding row(s))"
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
    *,
    block: bool = False,
    tokens: Mapping[str, Any] | None = None,
    pad_to_multiple_of: int | None = None,
) -> VocabularyPlan:
    """Output vocabulary for ``tokenizer_source`` and a row map for each model of ``vocab_models``.

    ``target_model`` is the model whose tokenizer the output starts from (the base for ``base`` and ``union``, the
    named model otherwise); ``embedding_rows`` gives each model's number of vocabulary rows. ``block``: mergekit's
    ``tokenizer:`` block, with its ``tokens`` (token → setting with ``source`` and ``force``) and
    ``pad_to_multiple_of``: the output has one row per token (rounded up to the multiple; those rows get the mean of
    each model's token rows) and every model's rows are mapped.
    """
    if block:
        return _plan_block(tokenizer_source, target_model, folders, embedding_rows, vocab_models, tokens or {},
                           pad_to_multiple_of)
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


def _union_tokens(target_model: str, folders: Mapping[str, Path], vocab_models: Sequence[str],
                  target_tokens: Sequence[str | None]) -> tuple[str, ...]:
    """The tokens a union adds to the target's: every other model's tokens it lacks, models in order, ids in order."""
    target_fingerprint = tokenizer_fingerprint(folders[target_model])
    known = {token for token in target_tokens if token is not None}
    extra: list[str] = []
    for model in vocab_models:
        if model == target_model or tokenizer_fingerprint(folders[model]) == target_fingerprint:
            continue
        for token in vocabulary(folders[model])[0]:
            if token is not None and token not in known:
                known.add(token)
                extra.append(token)
    return tuple(extra)


def _plan_block(tokenizer_source: str, target_model: str, folders: Mapping[str, Path],
                embedding_rows: Mapping[str, int], vocab_models: Sequence[str], tokens: Mapping[str, Any],
                pad_to_multiple_of: int | None) -> VocabularyPlan:
    """The vocabulary of a `tokenizer:` block (see plan_vocabulary)."""
    mode = "union" if tokenizer_source == UNION else "copy"
    target_tokens = tuple(vocabulary(folders[target_model])[0])
    added = _union_tokens(target_model, folders, vocab_models, target_tokens) if mode == "union" else ()
    output_tokens = target_tokens + added
    present = set(output_tokens)
    extra = tuple(token for token in tokens if token not in present)
    output_tokens += extra
    count = len(output_tokens)
    rows = count
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows = (rows // pad_to_multiple_of + 1) * pad_to_multiple_of
    row_of = {token: row for row, token in enumerate(output_tokens) if token is not None}
    model_vocabs = {model: {token: token_id for token_id, token in enumerate(vocabulary(folders[model])[0])
                            if token is not None and token_id < embedding_rows[model]}
                    for model in vocab_models}
    rules = []
    for token, setting in tokens.items():
        source = setting.source
        where = f"tokens[{token!r}].source"
        model = source if isinstance(source, str) else getattr(source, "model", None)
        if model is not None and model not in model_vocabs:
            raise VocabularyError(f"{where}: {model} does not feed the embeddings or the head; allowed: one of "
                                  f"{', '.join(vocab_models)}")
        if isinstance(source, str):
            if token not in model_vocabs[model]:
                raise VocabularyError(f"{where}: {model} has no token {token!r} (to take another token's row: "
                                      "{kind: model_token, model, token})")
            rules.append(TokenRule(row_of[token], setting.force, "model", model))
        elif getattr(source, "kind", None) == "model_token":
            if source.token is not None:
                if source.token not in model_vocabs[model]:
                    raise VocabularyError(f"{where}: {model} has no token {source.token!r}")
                source_row = model_vocabs[model][source.token]
            else:
                source_row = source.token_id
                if source_row >= embedding_rows[model]:
                    raise VocabularyError(f"{where}: token_id {source_row} is beyond {model}'s "
                                          f"{embedding_rows[model]} rows")
            rules.append(TokenRule(row_of[token], setting.force, "model_token", model, source_row))
        else:
            rules.append(TokenRule(row_of[token], setting.force, "zero"))
    shared = TokenRules(tuple(rules))
    row_maps: dict[str, RowMap | None] = {}
    for model in vocab_models:
        index = [model_vocabs[model].get(token, MISSING) if token is not None else MISSING
                 for token in output_tokens] + [PAD_MEAN] * (rows - count)
        row_maps[model] = RowMap(tuple(index), rules=shared)
    return VocabularyPlan(mode=mode, tokenizer_model=target_model, rows=rows, added_tokens=added,
                          first_added_id=len(target_tokens), row_maps=row_maps, extra_tokens=extra,
                          padded_rows=rows - count)


def _row_map(output_tokens: Sequence[str | None], rows: int, source_tokens: Sequence[str | None],
             source_rows: int) -> RowMap | None:
    source_ids = {token: token_id for token_id, token in enumerate(source_tokens)
                  if token is not None and token_id < source_rows}
    index = []
    for row in range(rows):
        token = output_tokens[row] if row < len(output_tokens) else None
        if token is not None:
            index.append(source_ids.get(token, MISSING))
        else:  # padding row: keep the position when the source has it
            index.append(row if row < source_rows else PADDING)
    if rows == source_rows and index == list(range(rows)):
        return None
    return RowMap(tuple(index))


def align_rows(tensors: Sequence, row_maps: Sequence[RowMap | None], base: int | None = None,
               models: Sequence[str] = ()) -> list:
    """The vocabulary tensors of the models feeding one output tensor, each with the output's rows (mergekit 0.1.5's
    ``PermutedVocabulary``). ``row_maps[i]`` maps ``tensors[i]`` (None: its rows are the output's already);
    ``base``: the index of the base model among them. A row whose token a model lacks gets the token's default: the
    row of the only model that has it, else the base's row when the base has it, else the mean of the rows of the
    models that have it (summed in model order, then divided, as mergekit does), zeros when none has it. The
    tokenizer block's rules (on the row maps; ``models`` names the tensors' models) replace that default for their
    tokens, and rows added by ``pad_to_multiple_of`` get the mean of each model's token rows."""
    import torch

    rows = next(row_map.rows for row_map in row_maps if row_map is not None)
    gathered, present, padding = [], [], []
    for tensor, row_map in zip(tensors, row_maps):
        if row_map is None:
            if tensor.shape[0] != rows:
                raise VocabularyError(f"a tensor with {tensor.shape[0]} rows has no row map to {rows} rows")
            gathered.append(tensor)
            present.append(torch.ones(rows, dtype=torch.bool, device=tensor.device))
            padding.append(None)
            continue
        index = torch.tensor(row_map.index, dtype=torch.long, device=tensor.device)
        gathered.append(tensor[index.clamp(min=0)])
        present.append(index >= 0)
        padding.append(index == PADDING)
    count = torch.stack(present).sum(dim=0)
    needed = ~torch.stack(present).all(dim=0)
    default = None
    if bool(needed.any()):
        default = torch.zeros_like(gathered[0])
        for rows_of, has in zip(gathered, present):
            default = default + torch.where(_rows(has, rows_of), rows_of, torch.zeros_like(rows_of))
        default = default / _rows(count.clamp(min=1), default).to(default.dtype)
        if base is not None:
            default = torch.where(_rows(present[base], default), gathered[base], default)
    out = []
    for tensor, rows_of, has, pad in zip(tensors, gathered, present, padding):
        if default is not None and not bool(has.all()):
            rows_of = torch.where(_rows(has, rows_of), rows_of, default)
            if pad is not None and bool(pad.any()):
                rows_of[pad] = tensor.mean(dim=0)
        out.append(rows_of)
    shared = next((row_map.rules for row_map in row_maps if row_map is not None and row_map.rules is not None), None)
    if shared is None:
        return out
    for rule in shared.rules:
        if rule.kind == "zero":
            value = torch.zeros_like(out[0][rule.row])
        else:
            if rule.model not in models:
                raise VocabularyError(f"the token rule for row {rule.row} needs {rule.model}, which does not feed "
                                      "this tensor")
            donor = list(models).index(rule.model)
            value = (gathered[donor][rule.row] if rule.kind == "model" else tensors[donor][rule.source_row]).clone()
        for rows_of, has in zip(out, present):
            if rule.force or not bool(has[rule.row]):
                rows_of[rule.row] = value
    for position, row_map in enumerate(row_maps):
        if row_map is not None and row_map.index and row_map.index[-1] == PAD_MEAN:
            count = row_map.index.index(PAD_MEAN)
            out[position][count:] = out[position][:count].mean(dim=0)
    return out


def _rows(mask, like):
    """A per-row vector shaped to broadcast over ``like``'s other dimensions."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def write_tokenizer(plan: VocabularyPlan, folders: Mapping[str, Path], out_dir: Path) -> list[str]:
    """Write the output tokenizer into ``out_dir``; returns the files written."""
    source = Path(folders[plan.tokenizer_model])
    if not plan.added_tokens and not plan.extra_tokens:
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
    tokenizer.add_tokens(list(plan.extra_tokens))  # the tokenizer block's new tokens, as mergekit adds them
    added = list(plan.added_tokens + plan.extra_tokens)
    ids = tokenizer.convert_tokens_to_ids(added)
    expected = list(range(plan.first_added_id, plan.first_added_id + len(added)))
    if ids != expected:
        raise VocabularyError(f"the output tokenizer numbered its added tokens {ids[:5]}..., expected {expected[:5]}...")
    before = {path.name for path in out_dir.iterdir()}
    tokenizer.save_pretrained(str(out_dir))
    return sorted({path.name for path in out_dir.iterdir()} - before)


# ------------------------------------------------------------------------------------------------ chat templates
AUTO_TEMPLATE = "auto"
# The chat formats mergekit 0.1.5 names, written for this project: each renders a conversation exactly as
# mergekit's template of that name does under transformers' Jinja settings (trim_blocks, lstrip_blocks), except
# exaone, whose mergekit template also emits its own source indentation; this one renders the EXAONE format alone.
CHAT_TEMPLATES = {
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}\n"
        "{{ systems[-1]['content'] | trim if systems else '' }}\n"
        "\n"
        "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}\n"
        "{% for message in messages %}\n"
        "{% if message['role'] in headers %}\n"
        "{{ headers[message['role']] }}\n"
        "{{ message['content'] | trim -}}\n"
        "{% if not loop.last %}\n"
        "\n"
        "\n"
        "{% endif %}\n"
        "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n"
        "### Response:\n"
        "{% endif %}\n"),
    "chatml": (
        "{% for message in messages %}\n"
        "<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}\n"),
    "exaone": (
        "{% for message in messages %}\n"
        "{% if loop.first and message['role'] != 'system' %}[|system|][|endofturn|]\n"
        "{% endif %}\n"
        "[|{{ message['role'] }}|]{{ message['content'] }}{% if message['role'] == 'user' %}\n"
        "\n"
        "{% else %}[|endofturn|]\n"
        "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[|assistant|]{% endif %}\n"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}\n"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n"
        "\n"
        "{{ message['content'] | trim }}<|eot_id|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n"
        "\n"
        "{% endif %}\n"),
    "mistral": (
        "{% set has_system = messages and messages[0]['role'] == 'system' %}\n"
        "{% set turns = messages[1:] if has_system else messages %}\n"
        "{{- bos_token -}}\n"
        "{% for message in turns %}\n"
        "{% if message['role'] not in ('user', 'assistant') %}\n"
        "{{- raise_exception('only user and assistant turns after an optional first system message') }}\n"
        "{% elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "{{- raise_exception('user and assistant turns must alternate, starting with the user') }}\n"
        "{% elif message['role'] == 'user' %}\n"
        "{{- ' [INST] ' + (messages[0]['content'] + '\\n\\n' if loop.first and has_system else '')"
        " + message['content'] + ' [/INST]' -}}\n"
        "{% else %}\n"
        "{{- ' ' + message['content'] + eos_token -}}\n"
        "{% endif %}\n"
        "{% endfor %}\n"),
}


def chat_template_kind(value: str) -> str:
    """``auto``, ``name`` or ``literal`` for a recipe's ``chat_template`` (mergekit's rule); ValueError if neither a
    known name nor a plausible Jinja template."""
    if value == AUTO_TEMPLATE:
        return "auto"
    if len(value) < 256 and "\n" not in value and "{" not in value and value in CHAT_TEMPLATES:
        return "name"
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"{value!r} is neither a template name nor a Jinja template (a literal template contains "
                         "'{' and is at least 20 characters long)")
    return "literal"


def resolve_chat_template(value: str, folders: Sequence[Path]) -> tuple[str | None, str]:
    """(template text or None to keep the tokenizer's, a description) for a recipe's ``chat_template``.
    ``folders``: the merged models' folders in recipe order (for ``auto``)."""
    kind = chat_template_kind(value)
    if kind == "name":
        return CHAT_TEMPLATES[value], f"{value} (mergekit's)"
    if kind == "literal":
        return value, f"the recipe's ({len(value)} characters)"
    found = [template.strip() for template in (model_chat_template(folder) for folder in folders) if template]
    if not found:
        return None, "auto: no model has one, the tokenizer's is kept"
    template, votes = Counter(found).most_common(1)[0]  # ties: the first seen (recipe order)
    return template, f"auto: the template of {votes} of {len(folders)} model(s)"


def write_chat_template(folder: Path, template: str) -> list[str]:
    """Set the output tokenizer's chat template in ``folder`` (see the module's docstring); returns the files written."""
    folder = Path(folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    written = [CHAT_TEMPLATE_FILE]
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        data["chat_template"] = template
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(name)
    return written
