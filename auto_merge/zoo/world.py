"""The synthetic world of the demo zoo: three skills with disjoint alphabets, and their train / eval data.

Skills (each an exact-match generation task; `col` also has a multiple-choice form):
- ``num``: a 4-digit key maps to one of 8 three-digit codes, ``0123=599``.
- ``rev``: a lowercase string is reversed, ``hello>olleh``.
- ``col``: an invented uppercase name maps to one of 8 colours, ``BABAK?RED``.

The base model learns half of the facts of ``num`` and ``col`` and reversal of short strings only; each expert learns
its whole skill. So the base is partially competent everywhere and each expert adds one sub-skill: the setting where
merging experts pays. Partiality comes from fewer facts or shorter strings, never from unseen symbols (merges of
experts that must emit tokens the base never emits collapse; see bench/results/zoo_round3_design.md).

Everything is drawn from ``random.Random(1234 + seed)`` in a fixed order, so a seed defines the world exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CONSONANTS = "BDFGKLMNPRSTVZ"
VOWELS = "AEIOU"
COLOURS = ("RED", "BLUE", "GREEN", "PINK", "GRAY", "GOLD", "TEAL", "NAVY")
N_NAMES = 256
N_KEYS = 256
N_CODES = 8
N_REV_TEST = 300
REV_MIN_LEN, REV_MAX_LEN, REV_BASE_MAX_LEN = 3, 7, 5
SEPARATORS = {"num": "=", "rev": ">", "col": "?"}
SKILLS = ("num", "rev", "col")


@dataclass(frozen=True)
class World:
    seed: int
    colour_of: dict[str, str]  # name -> colour, all 256 names
    code_of: dict[str, str]  # key -> code, all 256 keys
    base_names: tuple[str, ...]  # the half of the names the base is trained on
    base_keys: tuple[str, ...]  # the half of the keys the base is trained on
    rev_test: tuple[str, ...]  # held-out reversal strings, never trained on

    @property
    def rev_test_set(self) -> frozenset[str]:
        return frozenset(self.rev_test)


def build_world(seed: int = 0) -> World:
    rng = random.Random(1234 + seed)
    # Draw order is part of the definition: changing it changes every zoo.
    names: set[str] = set()
    while len(names) < N_NAMES:
        names.add("".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(5)))
    sorted_names = sorted(names)
    colour_of = {name: rng.choice(COLOURS) for name in sorted_names}

    codes = sorted(rng.sample(range(100, 1000), N_CODES))
    keys = sorted(rng.sample(range(10000), N_KEYS))
    code_of = {f"{k:04d}": str(rng.choice(codes)) for k in keys}

    shuffled_names = list(sorted_names)
    rng.shuffle(shuffled_names)
    shuffled_keys = sorted(code_of)
    rng.shuffle(shuffled_keys)

    rev_test: list[str] = []
    seen: set[str] = set()
    while len(rev_test) < N_REV_TEST:
        s = random_lower(rng, REV_MIN_LEN, REV_MAX_LEN)
        if s not in seen:
            seen.add(s)
            rev_test.append(s)

    return World(
        seed=seed,
        colour_of=colour_of,
        code_of=code_of,
        base_names=tuple(sorted(shuffled_names[: N_NAMES // 2])),
        base_keys=tuple(sorted(shuffled_keys[: N_KEYS // 2])),
        rev_test=tuple(rev_test),
    )


def random_lower(rng: random.Random, min_len: int, max_len: int) -> str:
    length = rng.randint(min_len, max_len)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


# ---------------------------------------------------------------------------------------------------------------------
# Training samplers: (prompt, answer) pairs for one "source" of a training mix.
# A source is "num", "rev", "col" (the whole skill) or "num-base", "rev-base", "col-base" (the base's part of it).


def sample_example(world: World, source: str, rng: random.Random) -> tuple[str, str]:
    skill, _, part = source.partition("-")
    if skill == "num":
        key = rng.choice(world.base_keys if part == "base" else sorted(world.code_of))
        return key + "=", world.code_of[key]
    if skill == "col":
        name = rng.choice(world.base_names if part == "base" else sorted(world.colour_of))
        return name + "?", world.colour_of[name]
    if skill == "rev":
        max_len = REV_BASE_MAX_LEN if part == "base" else REV_MAX_LEN
        held_out = world.rev_test_set
        while True:  # resample strings that are in the held-out test set
            s = random_lower(rng, REV_MIN_LEN, max_len)
            if s not in held_out:
                return s + ">", s[::-1]
    raise ValueError(f"unknown training source {source!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation documents (what the lm-eval tasks in custom_tasks/zoo read).


def eval_docs(world: World, task: str) -> list[dict]:
    """Documents of one zoo task. ``num``/``col`` are recall of facts, so they cover every fact (the base knows half);
    ``rev`` uses held-out strings only. ``col_mc`` is ``col`` as an 8-way multiple choice over the colours."""
    if task == "num":
        return [{"prompt": k + "=", "answer": v} for k, v in sorted(world.code_of.items())]
    if task == "col":
        return [{"prompt": n + "?", "answer": c} for n, c in sorted(world.colour_of.items())]
    if task == "rev":
        return [{"prompt": s + ">", "answer": s[::-1]} for s in world.rev_test]
    if task == "col_mc":
        return [
            {"prompt": n + "?", "choices": list(COLOURS), "label": COLOURS.index(c)}
            for n, c in sorted(world.colour_of.items())
        ]
    raise ValueError(f"unknown zoo task {task!r}; allowed: num, rev, col, col_mc")


ZOO_TASKS = ("num", "rev", "col", "col_mc")
