"""Prompt sources. A source is indexable by a cursor, so the same seed and cursor give the same prompt."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrl.config import ConfigError, DataConfig

_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


@dataclass(frozen=True, kw_only=True)
class Prompt:
    prompt_id: str
    text: str
    answer: str
    prompt_ids: tuple[int, ...] = ()  # token ids of the text (``TokenizedPrompts``); empty: the worker encodes it


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


class FilePrompts:
    """Rows of a JSONL or Parquet file; cursor ``i`` is row ``order(epoch)[i % rows]`` with ``epoch = i // rows``.

    Each epoch visits every row once, in file order or in a permutation that depends only on (seed, epoch), so a
    cursor always maps to the same row and a regenerated prompt is the same prompt.
    """

    _CACHED_EPOCHS = 4  # the cursor moves forward; regenerated prompts reach back at most an epoch or so

    def __init__(self, cfg: DataConfig) -> None:
        self.path = Path(cfg.path)
        self.seed = cfg.seed
        self.shuffle = cfg.shuffle
        table = _read_table(self.path, cfg.kind)
        columns = {}
        for key, name in (("data.prompt_field", cfg.prompt_field), ("data.answer_field", cfg.answer_field)):
            if name not in table.column_names:
                raise ConfigError(
                    f"{key}: field {name!r} not in {self.path}; fields that exist: {', '.join(table.column_names)}"
                )
            columns[key] = table.column(name).to_pylist()
        if table.num_rows == 0:
            raise ConfigError(f"data.path: {self.path} has no rows")
        self.texts = columns["data.prompt_field"]
        bad = next((i for i, text in enumerate(self.texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise ConfigError(
                f"data.prompt_field: {cfg.prompt_field!r} in {self.path} must be text; row {bad} is {self.texts[bad]!r}"
            )
        self.answers = ["" if answer is None else str(answer) for answer in columns["data.answer_field"]]
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Prompt:
        epoch, offset = divmod(index, len(self.texts))
        row = self._order(epoch)[offset] if self.shuffle else offset
        return Prompt(prompt_id=prompt_id(index), text=self.texts[row], answer=self.answers[row])

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.texts)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            if len(self._orders) >= self._CACHED_EPOCHS:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return self._orders[epoch]


def _read_table(path: Path, kind: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"data.path: prompt file not found: {path}")
    import pyarrow as pa

    try:
        if kind == "jsonl":
            import pyarrow.json

            return pyarrow.json.read_json(str(path))
        import pyarrow.parquet

        return pyarrow.parquet.read_table(str(path))
    except pa.ArrowException as err:
        raise ConfigError(f"data.path: cannot read {path} as {kind}: {err}") from None


SOURCES = {"arithmetic": ArithmeticPrompts, "jsonl": FilePrompts, "parquet": FilePrompts}


def build_prompt_source(cfg: DataConfig) -> Any:
    return SOURCES[cfg.kind](cfg)


class TokenizedPrompts:
    """A prompt source whose prompts carry their token ids (``encode_prompt``), encoded once per cursor where the
    source lives (the driver), as a dataset is tokenised ahead of generation: a rollout worker's loop, which also
    steps the engine, does not tokenise, and a prompt issued again (a regenerated group) is not encoded again."""

    _CACHED = 1 << 16  # the cursor moves forward; regenerated prompts reach back a few steps' prompts

    def __init__(self, source: Any, tokenizer: Any, cfg: DataConfig) -> None:
        self.source, self.tokenizer, self.cfg = source, tokenizer, cfg
        self._ids: dict[int, tuple[int, ...]] = {}

    def __getitem__(self, index: int) -> Prompt:
        prompt = self.source[index]
        ids = self._ids.get(index)
        if ids is None:
            ids = self._ids[index] = tuple(encode_prompt(self.tokenizer, prompt.text, self.cfg))
            if len(self._ids) > self._CACHED:
                del self._ids[next(iter(self._ids))]  # the oldest cursor
        return dataclasses.replace(prompt, prompt_ids=ids)


def tokenized_prompts(source: Any, cfg: Any, model_path: str) -> Any:
    """``source`` as ``TokenizedPrompts`` for single-turn rollouts; with ``rollout.env`` unchanged (an episode's
    environment builds its first context from the text)."""
    if cfg.rollout.env is not None:
        return source
    from transformers import AutoTokenizer

    return TokenizedPrompts(source, AutoTokenizer.from_pretrained(model_path), cfg.data)


def encode_prompt(tokenizer: Any, text: str, cfg: DataConfig) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when asked and available."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [int(i) for i in tokenizer(text)["input_ids"]]
