"""The built-in reward models: a remote one over HTTP (against a real local server) and a local classifier."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.error import HTTPError

import pytest

from asyncrl.config import load_config
from asyncrl.rewards import HttpRewardModel, LocalRewardModel, RewardModelUnavailable, build_scorer

# --- HTTP ----------------------------------------------------------------------------------------------------------


class _RewardServer(ThreadingHTTPServer):
    """Scores by response length; ``behaviour(call)`` may answer an error status, a sleep, or a body instead."""

    def __init__(self, behaviour):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour
        self.requests: list[dict] = []
        self.release = threading.Event()  # ends the sleeps of a slow server at teardown

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/score"


class _Handler(BaseHTTPRequestHandler):
    server: _RewardServer

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(payload)
        action = self.server.behaviour(len(self.server.requests), payload)
        if isinstance(action, int):
            return self._answer(action, b'{"error": "not now"}')
        if isinstance(action, float):
            self.server.release.wait(action)
        body = action if isinstance(action, bytes) else json.dumps({"rewards": [len(r) for r in payload["responses"]]})
        self._answer(200, body if isinstance(body, bytes) else body.encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def serve():
    servers = []

    def start(behaviour=lambda call, payload: None) -> _RewardServer:
        server = _RewardServer(behaviour)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_http_batches_and_reads_the_protocol(serve):
    server = serve()
    model = HttpRewardModel(server.url, batch_size=2)
    responses = ["a", "bb", "ccc", "dddd", "eeeee"]
    metadata = [{"answer": str(i)} for i in range(5)]
    assert model(["p"] * 5, responses, metadata) == [1, 2, 3, 4, 5]
    assert [len(r["responses"]) for r in server.requests] == [2, 2, 1]
    assert server.requests[0] == {"prompts": ["p", "p"], "responses": ["a", "bb"], "metadata": metadata[:2]}


def test_http_retries_transient_failures_with_exponential_backoff(serve):
    server = serve(lambda call, payload: 503 if call <= 2 else None)
    model = HttpRewardModel(server.url, max_retries=2, backoff_s=0.1)
    tic = time.monotonic()
    assert model(["p"], ["abc"], [{}]) == [3]
    assert len(server.requests) == 3
    assert 0.1 + 0.2 <= time.monotonic() - tic < 5.0  # waited 0.1 s, then 0.2 s


def test_http_gives_up_after_its_retries(serve):
    server = serve(lambda call, payload: 500)
    model = HttpRewardModel(server.url, max_retries=1, backoff_s=0.01)
    with pytest.raises(RewardModelUnavailable, match="2 attempt"):
        model(["p"], ["abc"], [{}])
    assert len(server.requests) == 2


def test_http_does_not_retry_a_request_the_server_refuses(serve):
    server = serve(lambda call, payload: 400)
    with pytest.raises(HTTPError, match="400"):
        HttpRewardModel(server.url, max_retries=3, backoff_s=0.01)(["p"], ["abc"], [{}])
    assert len(server.requests) == 1


def test_http_times_out_a_slow_server_and_retries(serve):
    server = serve(lambda call, payload: 5.0)  # sleeps 5 s (until teardown) before answering
    model = HttpRewardModel(server.url, timeout_s=0.2, max_retries=1, backoff_s=0.01)
    tic = time.monotonic()
    with pytest.raises(RewardModelUnavailable, match="timed out"):
        model(["p"], ["abc"], [{}])
    assert time.monotonic() - tic < 2.0
    assert len(server.requests) == 2


def test_http_a_server_that_cannot_be_reached_is_retried_then_unavailable(serve):
    server = serve()
    url = server.url
    server.shutdown()
    server.server_close()  # the port is closed now: connection refused
    with pytest.raises(RewardModelUnavailable):
        HttpRewardModel(url, max_retries=1, backoff_s=0.01)(["p"], ["abc"], [{}])


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"rewards": [1.0, 2.0]}', "2 rewards for 1 samples"),
        (b'{"scores": [1.0]}', "'rewards' list"),
        (b"<html>", "Expecting value"),
    ],
)
def test_http_a_malformed_answer_raises_at_once(serve, body, fragment):
    server = serve(lambda call, payload: body)
    with pytest.raises(ValueError, match=fragment):
        HttpRewardModel(server.url, max_retries=3)(["p"], ["abc"], [{}])
    assert len(server.requests) == 1


def test_http_reward_model_from_the_config_scores_and_fails_batches(serve):
    components = serve(lambda call, payload: json.dumps({"rewards": [{"fluency": 0.5, "total": 2.0}]}).encode())
    cfg = load_config(None, ["reward.fn=http", f"reward.http.url={components.url}", "reward.timeout_s=5"])
    result = build_scorer(cfg.reward).score_one("p", "abc", {"answer": "3"})
    assert (result.reward, result.failed, result.components) == (2.0, False, {"fluency": 0.5})
    assert components.requests == [{"prompts": ["p"], "responses": ["abc"], "metadata": [{"answer": "3"}]}]

    down = serve(lambda call, payload: 503)
    cfg = load_config(None, ["reward.fn=http", f"reward.http.url={down.url}", "reward.http.backoff_s=0.01"])
    scorer = build_scorer(cfg.reward)
    assert all(r.failed for r in scorer.score_batch(["p"] * 2, ["a", "b"], [{}] * 2))
    assert scorer.failures == {("http", "RewardModelUnavailable"): 2}


# --- a local sequence-classification reward model ----------------------------------------------------------------


def _write_reward_model(folder, num_labels=1):
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from asyncrl.models import _train_tokenizer

    tokenizer = _train_tokenizer(300)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return _write_reward_model(tmp_path_factory.mktemp("rm"))


def test_local_rm_scores_one_finite_float_per_sample_independent_of_batching(reward_model_dir):
    prompts = ["What is 2 + 2?", "What is 10 - 3?", "Name a number."]
    responses = ["4", "The difference is 7, since 10 - 3 = 7.", "12"]
    batched = LocalRewardModel(reward_model_dir, batch_size=3)(prompts, responses, [{}] * 3)
    alone = [
        LocalRewardModel(reward_model_dir, batch_size=1)([p], [r], [{}])[0]
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert len(batched) == 3 and all(isinstance(s, float) for s in batched)
    assert batched == pytest.approx(alone, abs=1e-5)  # padding never changes a score
    assert len(set(batched)) == 3


def test_local_rm_reads_the_logit_of_the_chat_text(reward_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert LocalRewardModel(reward_model_dir)(["q"], ["a"], [{}]) == [pytest.approx(expected, abs=1e-5)]
    plain = LocalRewardModel(reward_model_dir, chat_template=False)
    assert plain._text("q", "a") == "q\na"


def test_local_rm_cuts_long_inputs_from_the_left(reward_model_dir):
    model = LocalRewardModel(reward_model_dir, max_length=8, chat_template=False)
    ending = " so the answer is 12"
    first, second = model(["What is 5 + 7?", "Anna has 3 books and gets 2 more."], [ending, ending], [{}] * 2)
    assert first == pytest.approx(second, abs=1e-5)  # only the last 8 tokens, the same in both, are scored


def test_local_rm_refuses_a_model_with_more_than_one_label(tmp_path):
    folder = _write_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        LocalRewardModel(folder)


def test_local_rm_from_the_config(reward_model_dir):
    cfg = load_config(
        None, ["reward.fn=local_rm", f"reward.local_rm.path={reward_model_dir}", "reward.local_rm.batch_size=2"]
    )
    results = build_scorer(cfg.reward).score_batch(["p"] * 3, ["a", "b", "c"], [{"answer": "1"}] * 3)
    assert not any(r.failed for r in results) and len({r.reward for r in results}) == 3
