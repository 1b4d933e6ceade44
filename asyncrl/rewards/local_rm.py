"""A local sequence-classification reward model (``reward.fn=local_rm``), scored with torch in this process.

The folder holds a Hugging Face ``AutoModelForSequenceClassification`` with one label (``num_labels=1``)
and its tokenizer; a sample's reward is the model's logit on the prompt and response. With
``chat_template`` and a tokenizer that has a template, the text is the chat ``[user: prompt,
assistant: response]``; otherwise the prompt, a newline and the response. An input longer than
``max_length`` tokens loses its beginning, so the end of the response, which the classification head
reads, is always scored. Nothing is downloaded: the folder must be local.

torch and transformers are imported when a model is built, so importing this module stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncrl.config import LocalRewardModelConfig


class LocalRewardModel:
    """A batched reward: one forward pass per ``batch_size`` samples, no gradients."""

    batched = True

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 8,
        max_length: int = 1024,
        chat_template: bool = True,
        device: str = "cpu",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"reward model {path}: its tokenizer has neither a pad nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {path}: needs num_labels=1 (one score), has {model.config.num_labels}")
        if model.config.pad_token_id is None:  # the head finds each row's last token by its padding
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    @classmethod
    def from_config(cls, cfg: LocalRewardModelConfig) -> LocalRewardModel:
        return cls(
            cfg.path,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            chat_template=cfg.chat_template,
            device=cfg.device,
        )

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> list[float]:
        texts = [self._text(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores.extend(self._score(texts[start : start + self.batch_size]))
        return scores

    def _text(self, prompt: str, response: str) -> str:
        if not self.chat_template:
            return f"{prompt}\n{response}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _score(self, texts: list[str]) -> list[float]:
        import torch

        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=not self.chat_template,  # a chat template writes its own special tokens
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = self.model(
                input_ids=encoded["input_ids"].to(self.device),
                attention_mask=encoded["attention_mask"].to(self.device),
            ).logits
        return logits[:, 0].float().tolist()
