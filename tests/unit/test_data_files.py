"""Prompt files (JSONL and Parquet): field mapping, seeded per-epoch order, wrap-around, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asyncrl.config import ConfigError, DataConfig, load_config
from asyncrl.data import SOURCES, FilePrompts, build_prompt_source, prompt_id, prompt_index

ROWS = [{"question": f"What is {i} + 1?", "solution": i + 1, "extra": "x"} for i in range(10)]


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows=ROWS):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def config(path, kind="jsonl", **kwargs):
    fields = {"prompt_field": "question", "answer_field": "solution"} | kwargs
    return DataConfig(kind=kind, path=str(path), **fields)


@pytest.mark.parametrize("kind, write", [("jsonl", write_jsonl), ("parquet", write_parquet)])
def test_both_formats_map_fields_in_file_order(tmp_path, kind, write):
    path = write(tmp_path / f"prompts.{kind}")
    source = build_prompt_source(config(path, kind, shuffle=False))
    assert isinstance(source, FilePrompts) and SOURCES[kind] is FilePrompts and len(source) == 10
    prompt = source[3]
    assert (prompt.prompt_id, prompt.text, prompt.answer) == (prompt_id(3), "What is 3 + 1?", "4")
    assert prompt_index(prompt.prompt_id) == 3


def test_default_field_names(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "yo"}])
    assert DataConfig(kind="jsonl", path=str(path)).prompt_field == "prompt"
    assert FilePrompts(DataConfig(kind="jsonl", path=str(path)))[0].text == "hi"


def test_wraps_around_epochs_in_file_order(tmp_path):
    source = FilePrompts(config(write_jsonl(tmp_path / "p.jsonl"), shuffle=False))
    assert [source[i].text for i in range(10, 20)] == [source[i].text for i in range(10)]
    assert source[25].prompt_id == "p25" and source[25].answer == "6"


def test_shuffle_is_seeded_a_permutation_and_new_each_epoch(tmp_path):
    path = write_parquet(tmp_path / "p.parquet")
    a, b = FilePrompts(config(path, "parquet", seed=7)), FilePrompts(config(path, "parquet", seed=7))
    epoch0 = [a[i].text for i in range(10)]
    epoch1 = [a[i].text for i in range(10, 20)]
    assert epoch0 == [b[i].text for i in range(10)]  # same seed, same order
    assert [b[i].text for i in range(10, 20)] == epoch1
    assert sorted(epoch0) == sorted(epoch1) == sorted(row["question"] for row in ROWS)  # every row once an epoch
    assert epoch0 != epoch1  # a new order each epoch
    assert epoch0 != [row["question"] for row in ROWS]
    other = FilePrompts(config(path, "parquet", seed=8))
    assert [other[i].text for i in range(10)] != epoch0


def test_cursor_is_stable_when_revisited(tmp_path):
    source = FilePrompts(config(write_jsonl(tmp_path / "p.jsonl"), seed=1))
    first = source[3]
    for i in range(200):  # walk far ahead so old epochs leave the cache
        source[i]
    assert source[3] == first


def test_config_requires_an_existing_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path is required"):
        DataConfig(kind="jsonl")
    with pytest.raises(ConfigError, match="data.path.*missing.jsonl"):
        DataConfig(kind="parquet", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="data.kind must be one of arithmetic, jsonl, parquet"):
        DataConfig(kind="csv")
    path = write_jsonl(tmp_path / "p.jsonl")
    cfg = load_config(overrides=["data.kind=jsonl", f"data.path={path}", "data.shuffle=false"])
    assert cfg.data.path == str(path) and cfg.data.shuffle is False


def test_file_gone_after_validation_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl")
    cfg = config(path)
    path.unlink()
    with pytest.raises(ValueError, match=f"data.path.*{path}"):
        FilePrompts(cfg)


@pytest.mark.parametrize("kind, write", [("jsonl", write_jsonl), ("parquet", write_parquet)])
def test_missing_field_names_file_field_and_what_exists(tmp_path, kind, write):
    path = write(tmp_path / f"p.{kind}")
    with pytest.raises(ValueError) as err:
        FilePrompts(config(path, kind, answer_field="answer"))
    message = str(err.value)
    assert "data.answer_field" in message and "'answer'" in message and str(path) in message
    assert "question, solution, extra" in message
    with pytest.raises(ValueError, match="data.prompt_field: field 'prompt'"):
        FilePrompts(config(path, kind, prompt_field="prompt"))


def test_unreadable_or_empty_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ValueError, match=f"cannot read {bad} as parquet"):
        FilePrompts(config(bad, "parquet"))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "solution": pa.array([], pa.int64())}), empty)
    with pytest.raises(ValueError, match=f"{empty} has no rows"):
        FilePrompts(config(empty, "parquet"))


def test_non_text_prompt_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": 5, "solution": 1}])
    with pytest.raises(ValueError, match="data.prompt_field: 'question'.*must be text; row 0"):
        FilePrompts(config(path))
