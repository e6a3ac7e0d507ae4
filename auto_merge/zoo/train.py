"""Training of the zoo's base model and experts: a tiny Llama, answer-only loss, deterministic on a CPU."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from auto_merge.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_chars, vocabulary
from auto_merge.zoo.world import World, sample_example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class Stage:
    """One training run: from scratch (`init_from` None) or fine-tuning a finished stage."""

    name: str
    mix: dict[str, float]  # training source -> sampling weight
    steps: int
    lr: float
    data_seed_offset: int
    init_from: str | None = None


@dataclass(frozen=True)
class Recipe:
    shape: ModelShape = field(default_factory=ModelShape)
    stages: tuple[Stage, ...] = ()
    batch_size: int = 64
    warmup_fraction: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


# Replay of the other skills' base data (about 29 % of each expert's examples) keeps experts from forgetting them
# and keeps task vectors small enough to merge.
DEFAULT_RECIPE = Recipe(
    stages=(
        Stage("base", {"num-base": 1.0, "col-base": 1.0, "rev-base": 1.0}, steps=800, lr=3e-3, data_seed_offset=1),
        Stage("num", {"num": 1.0, "col-base": 0.2, "rev-base": 0.2}, steps=300, lr=5e-4, data_seed_offset=10,
              init_from="base"),
        Stage("rev", {"rev": 1.0, "num-base": 0.2, "col-base": 0.2}, steps=300, lr=5e-4, data_seed_offset=11,
              init_from="base"),
        Stage("col", {"col": 1.0, "num-base": 0.2, "rev-base": 0.2}, steps=300, lr=5e-4, data_seed_offset=12,
              init_from="base"),
    )
)


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def make_batch(world: World, stage: Stage, rng: random.Random, batch_size: int):
    """A right-padded batch `<s> prompt answer </s>` with the loss on answer tokens and EOS only."""
    import torch

    sources = list(stage.mix)
    weights = [stage.mix[s] for s in sources]
    rows, label_rows = [], []
    for _ in range(batch_size):
        source = rng.choices(sources, weights)[0]
        prompt, answer = sample_example(world, source, rng)
        p, a = encode_chars(prompt), encode_chars(answer)
        rows.append([BOS_ID] + p + a + [EOS_ID])
        label_rows.append([IGNORE_INDEX] * (1 + len(p)) + a + [EOS_ID])
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), PAD_ID, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return ids, mask, labels


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_stage(model, world: World, stage: Stage, recipe: Recipe, seed: int, progress=None) -> list[float]:
    """Train `model` in place for one stage; returns the loss per step."""
    import torch

    rng = random.Random(seed + stage.data_seed_offset)
    optimiser = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=recipe.betas, eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, stage.steps, recipe.warmup_fraction)
    )
    model.train()
    losses = []
    for _ in range(stage.steps):
        ids, mask, labels = make_batch(world, stage, rng, recipe.batch_size)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(1, losses[-1])
    model.eval()
    return losses
