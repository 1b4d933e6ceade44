"""The reference stage: the frozen initial model's log-probs of each response (``stages.reference``)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import torch

from asyncrl.algorithms.logprobs import sequence_logprobs
from asyncrl.config import Config


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float = 1.0,
    device: str = "cpu",
) -> list[list[float]]:
    """Log-prob of every response token under ``model`` (at ``temperature``, as the trainer computes its own),
    one list per row, aligned with ``response_ids`` as ``behavior_logprobs`` are. One right-padded forward;
    only the positions from the earliest response token on get logits."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(lengths), width), dtype=torch.float32)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[row, : lengths[row]] = torch.tensor([*prompt, *response], dtype=torch.int64)
        attention_mask[row, : lengths[row]] = 1
        response_mask[row, len(prompt) : lengths[row]] = 1.0
    keep = width - min(len(p) for p in prompts) + 1
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=keep
    ).logits
    window = sequence_logprobs(
        logits, input_ids[:, -keep:].to(device), response_mask[:, -keep:].to(device), temperature
    )
    window = window.cpu()
    offset = width - keep
    return [window[row, len(prompt) - offset : lengths[row] - offset].tolist() for row, prompt in enumerate(prompts)]


class ReferenceStage:
    """``table -> ref_logprobs``: the log-probs of the model at ``model.path`` as the run started (never
    updated), in micro-batches of ``stages.batch_size``."""

    columns = ("prompt_ids", "response_ids")
    """The columns it reads."""
    adds = ("ref_logprobs",)

    def __init__(self, cfg: Config, model_path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.device = cfg.stages.device
        self.batch_size = cfg.stages.batch_size
        self.temperature = cfg.rollout.temperature
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)

    def __call__(self, table: pa.Table) -> pa.Table:
        prompts = table.column("prompt_ids").to_pylist()
        responses = table.column("response_ids").to_pylist()
        out: list[list[float]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out += reference_logprobs(self.model, prompts[chunk], responses[chunk], self.temperature, self.device)
        return pa.table({"ref_logprobs": pa.array(out, pa.list_(pa.float32()))})
