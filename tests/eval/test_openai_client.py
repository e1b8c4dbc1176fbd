"""The OpenAI-compatible client, against a real `transformers serve` on loopback serving a tiny random Llama that
the test builds (offline, on CPU), and its retry rules on httpx's MockTransport (statuses a real server rarely gives
on demand: 429 with Retry-After, 503)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from megalign.errors import MegalignError
from megalign.eval.openai_client import OpenAIClient, Reply, ServerError

BASE = "http://test.invalid"  # MockTransport answers; nothing is resolved


def _mock_client(handler, **options) -> OpenAIClient:
    options = {"backoff_s": 0.001, "max_backoff_s": 0.01, **options}
    return OpenAIClient(BASE, "m", transport=httpx.MockTransport(handler), **options)


def _completion(text="ok", usage=True) -> httpx.Response:
    body = {"choices": [{"text": text, "finish_reason": "length"}]}
    if usage:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": 2}
    return httpx.Response(200, json=body)


# ---- retry rules, on MockTransport ----

def test_429_and_5xx_are_retried_until_an_answer():
    answers = [httpx.Response(429, headers={"retry-after": "0"}), httpx.Response(503, text="warming up"),
               httpx.Response(500), _completion("done")]
    seen = []

    def handler(request):
        seen.append(request)
        return answers[len(seen) - 1]

    reply = _mock_client(handler).complete("p", max_tokens=2)
    assert reply == Reply("done", "length", 3, 2)
    assert len(seen) == 4


def test_connection_errors_and_timeouts_are_retried():
    failures = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped")]

    def handler(request):
        if failures:
            raise failures.pop(0)
        return _completion()

    assert _mock_client(handler).complete("p", max_tokens=2).text == "ok"


def test_retries_run_out_in_one_line_error():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(503, json={"error": {"message": "model is\noverloaded"}})

    with pytest.raises(ServerError) as caught:
        _mock_client(handler, max_retries=2).chat([{"role": "user", "content": "hi"}], max_tokens=2)
    message = str(caught.value)
    assert len(calls) == 3  # the first try and 2 retries
    assert "\n" not in message and f"{BASE}/v1/chat/completions" in message
    assert "503" in message and "model is overloaded" in message
    assert caught.value.status == 503 and caught.value.retryable


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_fail_at_once(status):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"detail": "bad field 'x'"})

    with pytest.raises(ServerError) as caught:
        _mock_client(handler).complete("p", max_tokens=2)
    assert len(calls) == 1
    message = str(caught.value)
    assert "\n" not in message and str(status) in message and "/v1/completions" in message
    assert "bad field 'x'" in message
    assert caught.value.status == status and not caught.value.retryable


def test_backoff_grows_and_honours_retry_after(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # tenacity sleeps through time.sleep
    answers = [httpx.Response(500)] * 3 + [httpx.Response(429, headers={"retry-after": "7"}), _completion()]

    def handler(request):
        return answers.pop(0)

    client = OpenAIClient(BASE, "m", transport=httpx.MockTransport(handler), backoff_s=1.0, max_backoff_s=30.0)
    client.complete("p", max_tokens=2)
    assert len(sleeps) == 4
    assert 1 <= sleeps[0] <= 2 and 2 <= sleeps[1] <= 3 and 4 <= sleeps[2] <= 5  # 1, 2, 4 s plus up to 1 s jitter
    assert sleeps[3] == 7


def test_request_body_key_base_url_and_stop(monkeypatch):
    monkeypatch.setenv("MEGALIGN_TEST_KEY", "secret")
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "yes. STOP and more"},
                                                      "finish_reason": "stop"}]})

    client = OpenAIClient(BASE + "/v1/", "m", api_key_env="MEGALIGN_TEST_KEY", transport=httpx.MockTransport(handler))
    reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=5, stop=["STOP"])
    assert reply == Reply("yes. ", "stop", None, None)  # the stop sequence is cut; no usage: None
    [request] = seen
    assert str(request.url) == BASE + "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer secret"
    assert json.loads(request.content) == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 5, "temperature": 0.0, "stop": ["STOP"]}


def test_no_key_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("MEGALIGN_TEST_KEY", raising=False)
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(401, json={"error": {"message": "no key"}})

    with pytest.raises(ServerError, match="MEGALIGN_TEST_KEY is not set"):
        _mock_client(handler, api_key_env="MEGALIGN_TEST_KEY").complete("p", 2)
    assert "authorization" not in seen[0].headers


def test_map_runs_concurrently_and_reports_each_failure():
    client = _mock_client(lambda request: _completion())
    lock, running, peak = threading.Lock(), [0], [0]

    def work(item: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        if item % 4 == 3:
            raise ValueError(f"item {item} failed")
        return item * 10

    client.concurrency = 3
    results = dict(client.map(work, range(10), progress=False))
    assert sorted(results) == list(range(10))
    assert peak[0] == 3
    failed = {item: str(result) for item, result in results.items() if isinstance(result, Exception)}
    assert failed == {3: "item 3 failed", 7: "item 7 failed"}
    assert all(results[item] == item * 10 for item in results if item not in failed)


def test_map_stopped_early_starts_no_more_calls():
    client = _mock_client(lambda request: _completion())
    client.concurrency = 2
    started = []

    def work(item):
        started.append(item)
        return item

    for _ in client.map(work, iter(range(100)), progress=False):
        break
    assert len(started) <= 3


# ---- a real server: transformers serve on a tiny random Llama ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transformers serve` pinned to one local model directory, on loopback, offline, on CPU."""

    def __init__(self, model_dir: Path, log: Path):
        self.model_dir, self.log, self.port = model_dir, log, _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return str(self.model_dir)  # transformers serve names a local model by its path

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("transformers")), "serve", str(self.model_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--log-level", "warning"]

    def start(self, timeout_s: float = 60) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"transformers serve exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"transformers serve not ready in {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """A random 2-layer Llama (hidden 64, vocab 600) with the BPE tokenizer and a greedy generation config."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe_tokenizer_dir / name, out / name)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving]")
    pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving]")
    running = Server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    running.start()
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with OpenAIClient(server.url, server.model, timeout_s=60, concurrency=4) as client:
        yield client


def test_check_lists_the_served_model(client, server):
    assert server.model in client.check()


def test_chat_and_complete_respect_max_tokens_and_are_greedy(client):
    messages = [{"role": "user", "content": "hello, be brief"}]
    reply = client.chat(messages, max_tokens=5)
    assert isinstance(reply.text, str) and reply.text
    assert reply.finish_reason in ("length", "stop") and reply.prompt_tokens > 0
    assert 0 < reply.completion_tokens <= 5
    assert client.chat(messages, max_tokens=5) == reply  # temperature 0 by default: the same answer again

    long = client.chat(messages, max_tokens=12)
    assert long.completion_tokens <= 12
    stop = long.text[len(long.text) // 2:][:2]  # a piece of the greedy answer: generation stops there, cut before it
    stopped = client.chat(messages, max_tokens=12, stop=[stop])
    assert stopped.text == long.text[:long.text.find(stop)]

    text = client.complete("the quick brown fox", max_tokens=4)
    assert isinstance(text.text, str) and text.text
    assert 0 < text.completion_tokens <= 4 and text.prompt_tokens > 0
    assert client.complete("the quick brown fox", max_tokens=4) == text


def test_map_over_prompts(client):
    prompts = [f"prompt number {i}" for i in range(6)] + [None]  # None: a call that fails in the caller's function

    def work(prompt):
        return client.complete(prompt.upper(), max_tokens=3)

    results = dict(client.map(work, prompts, progress=True))
    assert set(results) == set(prompts)
    assert isinstance(results[None], AttributeError)
    for prompt in prompts[:-1]:
        assert isinstance(results[prompt], Reply) and results[prompt].completion_tokens <= 3


def test_check_on_a_model_not_served_lists_what_is(server):
    with OpenAIClient(server.url, "no-such-model") as client, pytest.raises(MegalignError) as caught:
        client.check()
    message = str(caught.value)
    assert "\n" not in message and "'no-such-model'" in message and server.model in message


def test_check_on_a_closed_port_says_cannot_reach():
    url = f"http://127.0.0.1:{_free_port()}"
    with OpenAIClient(url, "m") as client, pytest.raises(ServerError) as caught:
        client.check()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot reach {url}/v1/models")
    assert message.endswith("is the server running?")


def _counting_posts(client: OpenAIClient) -> list:
    calls, post = [], client._http.post

    def counted(*args, **kwargs):
        calls.append(time.monotonic())
        return post(*args, **kwargs)

    client._http.post = counted
    return calls


def test_a_4xx_from_the_server_is_not_retried(server):
    # transformers serve pinned to one model answers 400 for any other model name
    with OpenAIClient(server.url, "no-such-model", backoff_s=0.01) as client:
        calls = _counting_posts(client)
        with pytest.raises(ServerError) as caught:
            client.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert len(calls) == 1
    assert caught.value.status == 400
    message = str(caught.value)
    assert "\n" not in message and f"{server.url}/v1/chat/completions" in message and "no-such-model" in message


def test_a_call_retries_while_the_server_restarts(server):
    server.stop()
    outcome = {}
    with OpenAIClient(server.url, server.model, max_retries=200, backoff_s=0.1, max_backoff_s=0.5,
                      timeout_s=60) as client:
        calls = _counting_posts(client)

        def call():
            try:
                outcome["reply"] = client.complete("hello again", max_tokens=3)
            except Exception as error:  # noqa: BLE001 - reported below
                outcome["error"] = error

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.0)
        assert caller.is_alive() and len(calls) >= 2  # refused, backing off, trying again
        server.start()
        caller.join(timeout=60)
    assert not caller.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert isinstance(outcome["reply"], Reply) and outcome["reply"].completion_tokens <= 3
