"""Prompt sources. A source is indexable by a cursor, so the same seed and cursor give the same prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from asyncrl.config import DataConfig

_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


@dataclass(frozen=True, kw_only=True)
class Prompt:
    prompt_id: str
    text: str
    answer: str


def prompt_id(index: int) -> str:
    """The id of the prompt at cursor ``index``; ``prompt_index`` inverts it."""
    return f"p{index}"


def prompt_index(prompt_id: str) -> int:
    return int(prompt_id.removeprefix("p"))


class ArithmeticPrompts:
    """Seeded synthetic sums and differences; prompt ``i`` depends only on (seed, i)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.seed = cfg.seed
        self.max_operand = cfg.max_operand

    def __getitem__(self, index: int) -> Prompt:
        rng = random.Random(f"{self.seed}:{index}")
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice(tuple(_OPERATORS))
        if op == "-" and b > a:
            a, b = b, a
        return Prompt(
            prompt_id=prompt_id(index),
            text=f"What is {a} {op} {b}? Reply with only the number.",
            answer=str(_OPERATORS[op](a, b)),
        )


SOURCES = {"arithmetic": ArithmeticPrompts}


def build_prompt_source(cfg: DataConfig) -> Any:
    return SOURCES[cfg.kind](cfg)


def encode_prompt(tokenizer: Any, text: str, cfg: DataConfig) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when asked and available."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [int(i) for i in tokenizer(text)["input_ids"]]
