"""The synthetic world of the demo zoo: three lookup skills whose facts were updated, and their eval data.

Skills (each an exact-match generation task over 256 keys; `col` also has a multiple-choice form):
- ``num``: a key maps to one of 8 three-digit codes, ``<key>=599``;
- ``col``: a key maps to one of 8 colours, ``<key>?RED``;
- ``wrd``: a key maps to one of 8 invented lowercase words, ``<key>>bavo``;
- ``cap``: a code of two capital letters maps to one digit (of those the base writes in ``num`` answers), ``QX7``.
  It is a *new* skill (the base never saw these letters), learnt by an expert that changes only the last two
  layers: the skill that gives depth-wise integration (DIS) something to find, since a stack keeps one model's
  embeddings but can take another model's late layers.

Every key of the first three is one token (a character from the skill's own block of CJK ideographs; only the token
ids matter to the models), and no token is shared between skills except `<s>`/`</s>` (and the digits `cap` answers
with, which `num` writes). Each skill has ``new`` facts (what the
tasks score) and ``old`` facts: half of the keys were updated (old != new there). The base model learns the old facts
of every skill, so it scores exactly 0.5 on each task; the expert of a skill learns its new facts. Because each
skill's prompts and answers use tokens no other skill uses, an expert's change can live in rows that only its own
skill reads: the design that makes merging experts pay (docs/zoo.md).

Everything is drawn from ``random.Random(4321 + seed)`` in a fixed order, so a seed defines the world exactly;
``cap`` is drawn last, so adding it left the other skills (and the base and their experts) as they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SKILLS = ("num", "col", "wrd")  # the skills the base knows (old facts) and whose experts edit embedding rows
LAYER_SKILL = "cap"  # the new skill whose expert edits only late layers
COLOURS = ("RED", "BLUE", "GREEN", "PINK", "GRAY", "GOLD", "TEAL", "NAVY")
N_KEYS = 256
N_VALUES = 8
SEPARATORS = {"num": "=", "col": "?", "wrd": ">"}
# `cap`'s letters: the capitals no colour word uses, so no other skill's sequence holds them and the base never
# trained their rows. Its answers are digits that the base writes in `num` answers: an answer token needs a trained
# output row, which a layers-only expert cannot give it (an untrained row's logit stays too small to win).
CAP_LETTERS = "CFHJMQSWXZ"
# First code point of each skill's key block (one character per key).
KEY_BLOCKS = {"num": 0x4E00, "col": 0x4F00, "wrd": 0x5000}
# The characters each skill's answers are written with (a skill's expert trains their embedding rows).
ANSWER_ALPHABETS = {
    "num": "0123456789",
    "col": "".join(sorted(set("".join(COLOURS)))),
    "wrd": "abcdefghijklmnopqrstuvwxyz",
}


def key_chars(skill: str) -> tuple[str, ...]:
    return tuple(chr(KEY_BLOCKS[skill] + i) for i in range(N_KEYS))


@dataclass(frozen=True)
class World:
    seed: int
    new: dict[str, dict[str, str]]  # skill -> key -> value the tasks score
    old: dict[str, dict[str, str]]  # skill -> key -> value the base learns (== new on the keys not updated); no `cap`
    updated: dict[str, frozenset[str]]  # skill -> the 128 keys whose value changed; no `cap` (all of it is new)


def build_world(seed: int = 0) -> World:
    rng = random.Random(4321 + seed)
    new, old, updated = {}, {}, {}
    # Draw order is part of the definition: changing it changes every zoo.
    for skill in SKILLS:
        if skill == "num":
            values = [str(v) for v in sorted(rng.sample(range(100, 1000), N_VALUES))]
        elif skill == "col":
            values = list(COLOURS)
        else:
            words: set[str] = set()
            while len(words) < N_VALUES:
                words.add("".join(rng.choice(ANSWER_ALPHABETS["wrd"]) for _ in range(rng.randint(3, 5))))
            values = sorted(words)
        keys = key_chars(skill)
        new_values = {key: rng.choice(values) for key in keys}
        shuffled = list(keys)
        rng.shuffle(shuffled)
        changed = frozenset(shuffled[: N_KEYS // 2])
        old[skill] = {
            key: rng.choice([v for v in values if v != new_values[key]]) if key in changed else new_values[key]
            for key in keys
        }
        new[skill], updated[skill] = new_values, changed
    # Only digits the base writes in a `num` answer: a layers-only expert cannot make an untrained output row win.
    written = sorted(set("".join(old["num"].values())))
    digits = sorted(rng.sample(written, min(N_VALUES, len(written))))
    new[LAYER_SKILL] = {first + second: rng.choice(digits) for first in CAP_LETTERS for second in CAP_LETTERS}
    return World(seed=seed, new=new, old=old, updated=updated)


def facts(world: World, skill: str, which: str = "new") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of one skill in key order: its ``new`` facts or the ``old`` ones the base learns."""
    table = world.new[skill] if which == "new" else world.old[skill]
    return [(key + SEPARATORS.get(skill, ""), table[key]) for key in sorted(table)]


def base_facts(world: World) -> list[tuple[str, str]]:
    """What the base model is trained on: the old facts of every skill (768 pairs)."""
    return [pair for skill in SKILLS for pair in facts(world, skill, "old")]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation documents (what the lm-eval tasks in custom_tasks/zoo read).


def eval_docs(world: World, task: str) -> list[dict]:
    """Documents of one zoo task: every key of the skill with its new value (the base knows half of them).
    ``col_mc`` is ``col`` as an 8-way multiple choice over the colours."""
    if task in SKILLS + (LAYER_SKILL,):
        return [{"prompt": prompt, "answer": answer} for prompt, answer in facts(world, task)]
    if task == "col_mc":
        return [{"prompt": prompt, "choices": list(COLOURS), "label": COLOURS.index(answer)}
                for prompt, answer in facts(world, "col")]
    raise ValueError(f"unknown zoo task {task!r}; allowed: {', '.join(ZOO_TASKS)}")


ZOO_TASKS = SKILLS + (LAYER_SKILL, "col_mc")
