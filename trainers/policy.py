"""The policy trainer: a DeepSpeed engine around a transformers causal LM, trained with a policy loss by name.

One ``PolicyTrainer`` per trainer rank. The caller streams micro-batches (``trainers.batch.collate``
output) into ``forward_backward`` and calls ``optimizer_step`` after ``grad_accum_steps`` of them;
``named_weights`` hands the updated weights to the weight sync.

On CPU the engine runs on gloo. The first ``deepspeed.initialize`` of a machine compiles
DeepSpeed's shared-memory collective op (``deepspeed_shm_comm``: ~40 s idle, ~100 s on two busy cores) into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later starts load the cached op in well under a second.
DeepSpeed 0.19.8 builds that op whenever it creates its communication backend, whatever the
world size and with no config switch, so the only clean way to keep starts fast is a
persistent ``TORCH_EXTENSIONS_DIR`` (CI: cache that folder).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.algorithms.logprobs import sequence_logprobs
from asyncrl.algorithms.loss import LossConfig, LossInputs
from asyncrl.algorithms.registry import PROXIMAL_LOSSES, get_policy_loss

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# The entropy metric reads at most this many trained tokens of a micro-batch (an even stride over them): the
# full [tokens, vocab] pass cost as much as a sixth of a tiny model's step, for a metric logged once per step.
ENTROPY_MAX_TOKENS = 32


@torch.no_grad()
def mean_token_entropy(
    logits: Tensor, response_mask: Tensor, temperature: float = 1.0, max_tokens: int | None = None
) -> float:
    """Mean entropy (nats) of the policy ``softmax(logits / temperature)`` over the trained response tokens.

    Aligned as ``sequence_logprobs``: the distribution at position ``t - 1`` is the one that sampled
    token ``t``, counted where ``response_mask[:, t]`` is 1. With more than ``max_tokens`` trained tokens,
    the mean is over every k-th of them in row-major order (k the smallest stride that keeps at most
    ``max_tokens``), so every row still contributes. A metric only (no grad); 0.0 with no token.
    """
    positions = response_mask[:, 1:].nonzero()  # [N, 2]: (row, position) of each trained token's distribution
    if len(positions) == 0:
        return 0.0
    if max_tokens is not None and len(positions) > max_tokens:
        positions = positions[:: -(-len(positions) // max_tokens)]
    rows, columns = positions.unbind(dim=1)
    scaled = logits[rows, columns].float() / temperature  # [n, V]: only the gathered positions are copied
    logsumexp = torch.logsumexp(scaled, dim=-1)
    probs = (scaled - logsumexp.unsqueeze(-1)).exp_()
    # H = logsumexp(z) - sum_v p_v z_v: no [n, V] log-prob tensor and no separate product tensor.
    return float((logsumexp - torch.linalg.vecdot(probs, scaled)).mean())


@dataclass(frozen=True, slots=True)
class Placement:
    """Where this rank computes and which collective backend its process group uses."""

    device: torch.device
    dist_backend: str


def _cuda_placement(local_rank: int) -> Placement:
    torch.cuda.set_device(local_rank)
    return Placement(torch.device("cuda", local_rank), "nccl")


def _cpu_placement(local_rank: int) -> Placement:
    return Placement(torch.device("cpu"), "gloo")


def select_placement(local_rank: int) -> Placement:
    """CUDA with NCCL when a GPU is visible, else CPU with gloo (the only CUDA-specific branch)."""
    return _cuda_placement(local_rank) if torch.cuda.is_available() else _cpu_placement(local_rank)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str) -> None:
    """Join the default process group, or create a one-process group when nobody launched us.

    A launcher (Ray, torchrun, deepspeed) sets RANK/WORLD_SIZE/MASTER_* for multi-rank runs;
    those values are kept. Without them this becomes rank 0 of 1 on a free loopback port.
    """
    import deepspeed

    if torch.distributed.is_initialized():
        # A group made by someone else (e.g. an in-process vLLM engine): DeepSpeed still reads LOCAL_RANK.
        os.environ.setdefault("LOCAL_RANK", "0")
    else:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # With a process group already in place DeepSpeed only wraps it.
    deepspeed.init_distributed(dist_backend=backend)
    _forget_stale_world_clone()


def _forget_stale_world_clone() -> None:
    """DeepSpeed keeps one clone of the world group per process (``groups._WORLD_GROUP``, private). When the default
    group was destroyed and made again in this process (an in-process vLLM engine closed, then another trainer), the
    clone belongs to the old one and torch no longer knows it; drop it so DeepSpeed clones the current world."""
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d

    if groups._WORLD_GROUP is not None and groups._WORLD_GROUP not in distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def deepspeed_config(
    *, micro_batch_size: int, grad_accum_steps: int, grad_clip: float, zero_stage: int, bf16: bool
) -> dict:
    """The DeepSpeed config every trainer of ours uses (the bench baseline uses the same one)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * torch.distributed.get_world_size(),
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # A plain torch AdamW: DeepSpeed's fused/CPU Adam would be another C++ build on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


class PolicyTrainer:
    """Policy-gradient training of a causal LM in a DeepSpeed engine (ZeRO 0/1/2, fp32 or bf16).

    ``loss`` names a loss in ``asyncrl.algorithms.registry.POLICY_LOSSES`` and ``loss_config``
    holds its settings (default: PPO-clip, symmetric 0.2, token mean).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        zero_stage: int = 1,
        micro_batch_size: int = 8,
        grad_accum_steps: int = 1,
        temperature: float = 1.0,
        loss: str = "ppo_clip",
        loss_config: LossConfig | None = None,
        seed: int = 0,
    ) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3 would need gathered weights), got {zero_stage}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.temperature = temperature
        self.loss_fn = get_policy_loss(loss)
        self.loss_config = loss_config or LossConfig()
        self.needs_proximal = loss in PROXIMAL_LOSSES
        self._warned_no_reference = False
        self.grad_accum_steps = grad_accum_steps
        self.zero_stage = zero_stage
        self.dtype = DTYPES[dtype]

        placement = select_placement(int(os.environ.get("LOCAL_RANK", "0")))
        init_distributed(placement.dist_backend)
        torch.manual_seed(seed)

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        config = deepspeed_config(
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            grad_clip=grad_clip,
            zero_stage=zero_stage,
            bf16=self.dtype == torch.bfloat16,
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.device = self.engine.device
        self._micro_batches = 0  # forward_backward calls since the last optimizer step

    def _forward_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        return self._forward(batch)[0]

    def _forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, float]:
        """Per-token log-probs ``[B, L]`` of the response tokens (0 elsewhere) and their mean policy entropy."""
        input_ids = batch["input_ids"].to(self.device)
        response_mask = batch["response_mask"].to(self.device)
        # Only positions from the token before the earliest response token need logits: skipping
        # the vocabulary projection and softmax over the rest of the prompts saves a good share.
        length = input_ids.shape[1]
        keep = min(length, length - int(response_mask.argmax(dim=1).min()) + 1)
        output = self.engine(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(self.device),
            use_cache=False,
            logits_to_keep=keep,
        )
        window = sequence_logprobs(output.logits, input_ids[:, -keep:], response_mask[:, -keep:], self.temperature)
        entropy = mean_token_entropy(output.logits, response_mask[:, -keep:], self.temperature, ENTROPY_MAX_TOKENS)
        return torch.nn.functional.pad(window, (length - keep, 0)), entropy

    def forward_backward(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """The policy loss of one micro-batch and its backward; gradients accumulate until ``optimizer_step``.

        A loss that needs the proximal policy (decoupled PPO) gets its log-probs from a no-grad
        forward of this micro-batch just before the one with grad. That is the policy at the
        start of the step for every micro-batch of the step: the weights change only in
        ``optimizer_step``, which refuses to run before all ``grad_accum_steps`` micro-batches
        are in, so the log-probs equal those of a pass over the whole batch before the first
        backward. ``batch["ref_logprobs"]``, when present, feeds the KL to the reference.
        """
        if self._micro_batches == self.grad_accum_steps:
            raise RuntimeError(f"{self.grad_accum_steps} micro-batches are accumulated: call optimizer_step() first")
        proximal = self._no_grad_logprobs(batch) if self.needs_proximal else None
        self._warn_if_no_reference(batch)
        self.engine.train()
        reference = batch.get("ref_logprobs")
        logprobs, entropy = self._forward(batch)
        inputs = LossInputs(
            logprobs=logprobs,
            behavior_logprobs=batch["behavior_logprobs"].to(self.device),
            advantages=batch["advantages"].to(self.device),
            mask=batch["response_mask"].to(self.device),
            proximal_logprobs=proximal,
            ref_logprobs=None if reference is None else reference.to(self.device),
        )
        loss, metrics = self.loss_fn(inputs, self.loss_config)
        # engine.backward divides the loss by gradient_accumulation_steps, so the accumulated
        # gradient is the mean over the global batch's micro-batches of each micro-batch's
        # token-mean loss. That is why optimizer_step insists on exactly grad_accum_steps of them.
        self.engine.backward(loss)
        self._micro_batches += 1
        if self._micro_batches < self.grad_accum_steps:
            # Before the boundary engine.step() only advances DeepSpeed's micro-step counter, which
            # decides when backward reduces gradients and when step() updates.
            self.engine.step()
        tokens = float(batch["response_mask"].sum())
        return {"loss": float(loss.detach()), **metrics, "entropy": entropy, "tokens": tokens}

    def optimizer_step(self) -> dict[str, float]:
        """Apply the accumulated global batch: clip, AdamW update, zero the gradients."""
        if self._micro_batches != self.grad_accum_steps:
            raise RuntimeError(
                f"optimizer_step after {self._micro_batches} micro-batches; the global batch is {self.grad_accum_steps}"
            )
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "DeepSpeed is not at a gradient accumulation boundary; was engine.step() called elsewhere?"
            )
        # ZeRO and bf16 report the pre-clip global norm; the plain fp32 path (stage 0) does not.
        own_norm = self._grad_norm() if self.zero_stage == 0 and self.dtype == torch.float32 else None
        self.engine.step()
        self._micro_batches = 0
        grad_norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        return {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.engine.get_lr()[0]),
        }

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probs ``[B, L]`` (CPU, float32) of the response tokens, 0 elsewhere; no grad."""
        return self._no_grad_logprobs(batch).cpu()

    @torch.no_grad()
    def _no_grad_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        self.engine.eval()
        try:
            return self._forward_logprobs(batch)
        finally:
            self.engine.train()

    def _warn_if_no_reference(self, batch: dict[str, Tensor]) -> None:
        # A KL weight that silently does nothing would read as a tuned-but-ineffective setting.
        if self.loss_config.kl_coef > 0 and "ref_logprobs" not in batch and not self._warned_no_reference:
            log.warning(
                "kl_coef=%s but the batch has no ref_logprobs (set stages.reference=true): KL term skipped",
                self.loss_config.kl_coef,
            )
            self._warned_no_reference = True

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Every weight under its Hugging Face checkpoint name, as a detached CPU copy.

        Names follow the model's ``state_dict``; an alias of a tensor already yielded (a tied
        ``lm_head.weight``) is skipped, as ``save_pretrained`` skips it, so the stream matches a
        saved checkpoint. Copies, also on CPU, so a consumer never sees a later step's update.
        ZeRO 1/2 partition optimizer state and gradients only: the module holds full weights.
        """
        seen: set[int] = set()
        for name, tensor in self.engine.module.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            yield name, tensor.detach().to("cpu", copy=True)

    def save_state(self, folder: str) -> None:
        """DeepSpeed's own checkpoint of module, optimizer and LR schedule into ``folder/engine``, with
        the torch RNG state, and the model's Hugging Face config (what `ckpt export-hf` rebuilds from)."""
        self.engine.save_checkpoint(
            folder, tag="engine", client_state={"torch_rng_state": torch.get_rng_state()}, save_latest=False
        )
        if torch.distributed.get_rank() == 0:  # data-parallel ranks hold the same model
            self.engine.module.config.save_pretrained(os.path.join(folder, "hf_config"))

    def load_state(self, folder: str, lr: float | None = None) -> None:
        """Load what ``save_state`` wrote: module, optimizer and LR schedule through DeepSpeed, then the torch RNG;
        ``lr`` replaces the saved learning rate in every optimizer param group (a resume with a new trainer.lr)."""
        path, client_state = self.engine.load_checkpoint(
            folder, tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {os.path.join(folder, 'engine')}")
        torch.set_rng_state(client_state["torch_rng_state"])
        if lr is not None:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
