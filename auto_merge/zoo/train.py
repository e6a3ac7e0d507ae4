"""Training of the zoo's base model and experts: a tiny Llama, answer-only loss, deterministic on a CPU.

Four stages (the design and its measurements: docs/zoo.md):
1. **base**: every parameter, on the old facts of every skill.
2. **drift**: a large change to layers 4-5 (layer group 2 of 4) that all experts share and the base lacks, as if every
   expert had been fine-tuned from one intermediate checkpoint. It is a fixed Gaussian direction P plus a repair R
   trained so that ``base + s * (P + R)`` still behaves like the base for s up to ``max_scale``; R is kept orthogonal
   to P so the repair cannot cancel the drift. Adding it three times (uniform task arithmetic at λ = 1) breaks the
   model; adding it about twice does not.
3. **experts**: from ``base + P + R``, only the embedding rows of the skill's own tokens train (its keys, its separator,
   its answer alphabet). Each step scales the row change by a random factor: at 0.3-0.6 the rows must still give
   the old facts, at 0.85-1.6 the new ones, so an expert's edit only acts when merged at weight ≥ ~0.85.
So an expert's task vector is the shared drift plus rows no other skill reads: merges with a per-group weight find
every expert's skill at once, and no single uniform λ does.
4. **the layer expert** (`cap`): from ``base + P + R``, only layers 6-7 train, on the new `cap` skill mixed with the
   base's old facts (so it keeps the other skills), half the steps in its own model and half stacked one layer deeper
   (layers 0-6, then its 6-7), the stack depth-wise integration builds. A stack that takes another expert's
   embeddings and this expert's late layers holds both skills, which no expert alone does.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from auto_merge.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_chars, vocabulary
from auto_merge.zoo.world import (
    ANSWER_ALPHABETS,
    LAYER_SKILL,
    SEPARATORS,
    SKILLS,
    World,
    base_facts,
    facts,
    key_chars,
)

IGNORE_INDEX = -100
EMBEDDINGS = "model.embed_tokens.weight"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class BaseStage:
    steps: int = 800
    lr: float = 3e-3


@dataclass(frozen=True)
class DriftStage:
    layers: tuple[int, ...] = (4, 5)
    size: float = 3.0  # |P| per tensor, in units of the tensor's RMS
    max_scale: float = 2.0  # the repair keeps base + s * drift working for s in [0, max_scale]
    steps: int = 300
    lr: float = 1e-3


@dataclass(frozen=True)
class ExpertStage:
    steps: int = 800
    lr: float = 1e-2
    low_scale: tuple[float, float] = (0.3, 0.6)  # row scales at which the old facts must hold
    high_scale: tuple[float, float] = (0.85, 1.6)  # row scales at which the new facts must hold
    drift_scale: tuple[float, float] = (0.5, 2.0)  # drift scales seen in training (merges add it 0-3 times)
    p_low: float = 0.5
    p_unit: float = 0.3  # share of the high steps at exactly the expert itself (row and drift scale 1)


@dataclass(frozen=True)
class LayerExpertStage:
    layers: tuple[int, ...] = (6, 7)  # the layers it trains (the last layer group)
    steps: int = 1500
    lr: float = 3e-3
    replay: float = 0.5  # share of each batch drawn from the base's old facts, which it must keep
    p_deep: float = 0.5  # share of the steps in the deeper stack
    deep_after: int = 7  # the deeper stack: the drifted model's layers [0, deep_after), then the trained layers


@dataclass(frozen=True)
class Recipe:
    shape: ModelShape = field(default_factory=ModelShape)
    base: BaseStage = field(default_factory=BaseStage)
    drift: DriftStage = field(default_factory=DriftStage)
    expert: ExpertStage = field(default_factory=ExpertStage)
    layer_expert: LayerExpertStage = field(default_factory=LayerExpertStage)
    batch_size: int = 64
    warmup_fraction: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total_steps(self) -> int:
        return self.base.steps + self.drift.steps + len(SKILLS) * self.expert.steps + self.layer_expert.steps


DEFAULT_RECIPE = Recipe()


def check_recipe(recipe: Recipe) -> None:
    """Refuse stage settings that do not fit the model, before any training."""
    depth = recipe.shape.num_hidden_layers
    layers, deep_after = recipe.layer_expert.layers, recipe.layer_expert.deep_after
    if not layers or not all(0 <= layer < depth for layer in layers) or not min(layers) < deep_after <= depth:
        raise ValueError(f"layer_expert: layers {layers} and deep_after {deep_after} do not fit a {depth}-layer "
                         f"model (need 0 <= each layer < {depth} and min(layers) < deep_after <= {depth}, so the "
                         f"deeper stack is deeper than the model)")
    if not all(0 <= layer < depth for layer in recipe.drift.layers):
        raise ValueError(f"drift: layers {recipe.drift.layers} do not fit a {depth}-layer model")


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


def new_model(shape: ModelShape, seed: int, num_hidden_layers: int | None = None):
    """A freshly initialised model (the same initial weights for the same seed); ``num_hidden_layers`` overrides
    the shape's depth (a stack)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_batch(pairs: list[tuple[str, str]]):
    """Right-padded ids ``<s> prompt answer </s>`` and labels on the answer and EOS only."""
    import torch

    rows, label_rows = [], []
    for prompt, answer in pairs:
        p, a = encode_chars(prompt), encode_chars(answer)
        rows.append([BOS_ID] + p + a + [EOS_ID])
        label_rows.append([IGNORE_INDEX] * (1 + len(p)) + a + [EOS_ID])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


def causal_lm_loss(model, ids, labels, params: dict | None = None):
    """Next-token cross-entropy on the labelled positions. No padding mask: with right padding and causal attention
    the pads cannot affect real positions. ``params`` overrides some of the model's tensors (functional call)."""
    import torch

    if params is None:
        logits = model(input_ids=ids).logits
    else:
        logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimise(params: list, steps: int, lr: float, recipe: Recipe, loss_of_step, after_step=None,
              progress=None) -> list[float]:
    import torch

    optimiser = torch.optim.AdamW(params, lr=lr, betas=recipe.betas, eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, steps,
                                                                                    recipe.warmup_fraction))
    losses = []
    for step in range(steps):
        loss = loss_of_step(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimiser.step()
        schedule.step()
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(1, losses[-1])
    return losses


def train_base(world: World, recipe: Recipe, seed: int, progress=None):
    """Stage 1: the whole model on the old facts of every skill. Returns (state dict, losses)."""
    model = new_model(recipe.shape, seed)
    rng = random.Random(seed + 1)
    pairs = base_facts(world)

    def loss_of_step(_step):
        ids, labels = encode_batch([rng.choice(pairs) for _ in range(recipe.batch_size)])
        return causal_lm_loss(model, ids, labels)

    losses = _optimise(list(model.parameters()), recipe.base.steps, recipe.base.lr, recipe, loss_of_step,
                       progress=progress)
    return _detached(model.state_dict()), losses


def drift_tensors(state: dict, layers) -> list[str]:
    """The linear weights of the drift's layers, in state-dict order."""
    from auto_merge.models.layers import layer_index

    return [name for name in state if layer_index(name) in layers and name.endswith("proj.weight")]


def train_drift(world: World, recipe: Recipe, seed: int, base: dict, progress=None):
    """Stage 2: the shared drift. Returns (``base + P + R``, losses)."""
    import torch

    stage = recipe.drift
    model = _frozen(new_model(recipe.shape, seed), base)
    names = drift_tensors(base, stage.layers)
    generator = torch.Generator().manual_seed(seed * 31 + 7)
    direction = {n: stage.size * base[n].pow(2).mean().sqrt() * torch.randn(base[n].shape, generator=generator)
                 for n in names}
    repair = {n: torch.zeros_like(base[n], requires_grad=True) for n in names}
    data_rng, scale_rng = random.Random(seed + 2), random.Random(seed + 3)
    pairs = base_facts(world)

    def loss_of_step(step):
        ids, labels = encode_batch([data_rng.choice(pairs) for _ in range(recipe.batch_size)])
        # Every 4th step near the largest scale, where keeping the base's behaviour is hardest.
        scale = scale_rng.uniform(0.0, stage.max_scale) if step % 4 else stage.max_scale * scale_rng.uniform(0.75, 1)
        scale = max(scale, 0.05)
        params = {n: base[n] + scale * (direction[n] + repair[n]) for n in names}
        return causal_lm_loss(model, ids, labels, params)

    direction_norm = sum((direction[n] ** 2).sum() for n in names)

    def keep_orthogonal():
        with torch.no_grad():
            overlap = sum((repair[n] * direction[n]).sum() for n in names) / direction_norm
            for n in names:
                repair[n] -= overlap * direction[n]

    losses = _optimise(list(repair.values()), stage.steps, stage.lr, recipe, loss_of_step, keep_orthogonal, progress)
    drifted = dict(base)
    for n in names:
        drifted[n] = base[n] + direction[n] + repair[n].detach()
    return drifted, losses


def expert_rows(skill: str) -> list[int]:
    """Embedding rows an expert trains: tokens that occur only in its own skill's sequences."""
    vocab = vocabulary()
    return [vocab[ch] for ch in key_chars(skill)] + [vocab[SEPARATORS[skill]]] + [
        vocab[ch] for ch in ANSWER_ALPHABETS[skill]]


def train_expert(world: World, recipe: Recipe, seed: int, base: dict, drifted: dict, skill: str, progress=None):
    """Stage 3: one expert, ``drifted`` with trained rows ``base + δ`` on its own tokens. Returns (state, losses)."""
    import torch

    stage = recipe.expert
    model = _frozen(new_model(recipe.shape, seed), drifted)
    rows = torch.tensor(expert_rows(skill))
    embeddings = base[EMBEDDINGS]
    delta = torch.zeros(len(rows), embeddings.shape[1], requires_grad=True)
    drift_names = drift_tensors(base, recipe.drift.layers)
    drift = {n: drifted[n] - base[n] for n in drift_names}
    index = SKILLS.index(skill)
    key_rng, scale_rng = random.Random(seed * 11 + 100 + index), random.Random(seed * 11 + 200 + index)
    new_facts, old_facts = dict(facts(world, skill, "new")), dict(facts(world, skill, "old"))
    prompts = sorted(new_facts)

    def loss_of_step(_step):
        low = scale_rng.random() < stage.p_low
        row_scale = scale_rng.uniform(*(stage.low_scale if low else stage.high_scale))
        drift_scale = scale_rng.uniform(*stage.drift_scale)
        if not low and scale_rng.random() < stage.p_unit:
            row_scale = drift_scale = 1.0
        table = old_facts if low else new_facts
        batch = [key_rng.choice(prompts) for _ in range(recipe.batch_size)]
        ids, labels = encode_batch([(prompt, table[prompt]) for prompt in batch])
        params = {EMBEDDINGS: embeddings.index_add(0, rows, row_scale * delta)}
        params.update({n: base[n] + drift_scale * drift[n] for n in drift_names})
        return causal_lm_loss(model, ids, labels, params)

    losses = _optimise([delta], stage.steps, stage.lr, recipe, loss_of_step, progress=progress)
    expert = dict(drifted)
    expert[EMBEDDINGS] = embeddings.index_add(0, rows, delta.detach())
    return expert, losses


def stack_state(plan: list[tuple[dict, int]]) -> dict:
    """The state of a stacked model: ``plan`` lists (state, source layer) input side first. Embeddings come from the
    first entry's state, the final norm and head from the last's (mergekit's rule, as the merge engine stacks)."""
    from auto_merge.models.layers import layer_index

    first, last = plan[0][0], plan[-1][0]
    stacked = {n: t for n, t in first.items() if layer_index(n) is None}
    stacked.update({n: t for n, t in last.items() if layer_index(n) is None and n != EMBEDDINGS})
    for position, (state, layer) in enumerate(plan):
        prefix = f"model.layers.{layer}."
        stacked.update({f"model.layers.{position}." + n[len(prefix):]: t for n, t in state.items()
                        if n.startswith(prefix)})
    return stacked


def train_layer_expert(world: World, recipe: Recipe, seed: int, base: dict, drifted: dict, progress=None):
    """Stage 4: the `cap` expert, ``drifted`` with its late layers trained. Returns (state, losses)."""
    import torch

    from auto_merge.models.layers import layer_index

    check_recipe(recipe)
    stage = recipe.layer_expert
    own_model = _frozen(new_model(recipe.shape, seed), drifted)
    deep_plan = [(drifted, layer) for layer in range(stage.deep_after)]
    deep_model = new_model(recipe.shape, seed, num_hidden_layers=stage.deep_after + len(stage.layers))
    for parameter in deep_model.parameters():
        parameter.requires_grad_(False)
    names = [n for n in drifted if layer_index(n) in stage.layers]
    delta = {n: torch.zeros_like(drifted[n], requires_grad=True) for n in names}
    data_rng, mode_rng = random.Random(seed * 11 + 300), random.Random(seed * 11 + 301)
    new_facts, old_facts = facts(world, LAYER_SKILL), base_facts(world)

    def loss_of_step(_step):
        batch = [data_rng.choice(old_facts) if data_rng.random() < stage.replay else data_rng.choice(new_facts)
                 for _ in range(recipe.batch_size)]
        ids, labels = encode_batch(batch)
        trained = dict(drifted)
        trained.update({n: drifted[n] + delta[n] for n in names})
        if mode_rng.random() < stage.p_deep:
            params = stack_state(deep_plan + [(trained, layer) for layer in stage.layers])
            return causal_lm_loss(deep_model, ids, labels, params)
        return causal_lm_loss(own_model, ids, labels, {n: trained[n] for n in names})

    losses = _optimise(list(delta.values()), stage.steps, stage.lr, recipe, loss_of_step, progress=progress)
    expert = dict(drifted)
    expert.update({n: drifted[n] + delta[n].detach() for n in names})
    return expert, losses


def _frozen(model, state: dict):
    model.load_state_dict(state)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _detached(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}
