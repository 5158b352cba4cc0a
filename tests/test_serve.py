"""The HTTP server through real clients: the `openai` package (both modes), THUDM's api.py protocol,
bad requests, the API key, queue limits, a client that disconnects, /health, /metrics, and `glm6b serve`."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from glm6b.inference.chat import build_prompt  # noqa: E402
from glm6b.serve.app import Server, create_app  # noqa: E402

from helpers import GOLDEN  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model, tok, **settings):
    """A uvicorn server on 127.0.0.1 in a thread; yields (base URL, Server); always shut down."""
    server = Server(model, tok, model_name="golden", **settings)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", server
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def served(model, tok):
    with running_server(model, tok, max_batch=4) as (url, server):
        yield url, server


@pytest.fixture
def client(served):
    return openai.OpenAI(api_key="unused", base_url=served[0] + "/v1", max_retries=0, timeout=60)


def greedy_chat(model, tok, query, history, max_new_tokens):
    return model.chat(tok, query, history, do_sample=False, max_new_tokens=max_new_tokens)[0]


# ----------------------------------------------------------------------------------- OpenAI protocol


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["golden"]
    assert models.data[0].object == "model"


def test_chat_completion_greedy_equals_model_chat(client, model, tok):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "我很好"},
                {"role": "user", "content": "今天天气"}]
    answer = client.chat.completions.create(model="golden", messages=messages, temperature=0, max_tokens=24)
    expected = greedy_chat(model, tok, "今天天气", [("你好", "我很好")], 24)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(tok.encode(build_prompt("今天天气", [("你好", "我很好")])))
    assert answer.usage.prompt_tokens == prompt_tokens
    assert 1 <= answer.usage.completion_tokens <= 24
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens


def test_streamed_chat_equals_non_streamed(client, model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "写一首诗"}]
    stream = client.chat.completions.create(model="golden", messages=messages, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    # The system message goes before the first user message (README "Serving").
    expected = greedy_chat(model, tok, "Be brief.\n写一首诗", [], 20)
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # streamed piece by piece
    assert roles == ["assistant"]
    assert finish == ("length" if usage.completion_tokens == 20 else "stop")
    assert usage.completion_tokens >= 1


def test_completions_raw_prompt_and_n(client, model, tok):
    answer = client.completions.create(model="golden", prompt="hello", max_tokens=8, temperature=0, n=2)
    prompt = torch.tensor([tok.encode("hello")])
    expected = tok.decode(model.generate(prompt, max_new_tokens=8, allowed_vocab_size=len(tok))[0, prompt.shape[1]:])
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].text == answer.choices[1].text == expected
    assert answer.usage.prompt_tokens == len(tok.encode("hello"))
    stream = client.completions.create(model="golden", prompt="hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    def ask(seed, n=1):
        answer = client.chat.completions.create(model="golden", messages=[{"role": "user", "content": "你好"}],
                                                temperature=1.0, top_p=0.95, max_tokens=16, seed=seed, n=n)
        return [c.message.content for c in answer.choices]

    first = ask(7)
    assert ask(7) == first
    both = ask(7, n=2)
    assert both[0] == first[0] and both[1] != both[0]


def test_max_tokens_beyond_the_context_stops_at_the_context(client, model, tok):
    query = "长" * 400
    prompt_tokens = len(tok.encode(query))
    room = model.config.max_sequence_length - prompt_tokens
    answer = client.chat.completions.create(model="golden", messages=[{"role": "user", "content": query}],
                                            temperature=0, max_tokens=100_000)
    assert answer.usage.completion_tokens <= room
    assert answer.choices[0].message.content == greedy_chat(model, tok, query, [], room)


def test_stop_string(client, model, tok):
    full = greedy_chat(model, tok, "写一首诗", [], 30)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    answer = client.chat.completions.create(model="golden", messages=[{"role": "user", "content": "写一首诗"}],
                                            temperature=0, max_tokens=30, stop=stop)
    assert answer.choices[0].message.content == full[:full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------- THUDM api.py


def test_thudm_protocol(served, model, tok):
    history = [["你好", "我很好"]]
    reply = httpx.post(served[0] + "/", json={"prompt": "今天天气", "history": history, "max_length": 60,
                                              "temperature": 0}, timeout=60).json()
    prompt_tokens = len(tok.encode(build_prompt("今天天气", history)))
    expected = greedy_chat(model, tok, "今天天气", [("你好", "我很好")], 60 - prompt_tokens)
    assert reply["response"] == expected
    assert reply["history"] == history + [["今天天气", expected]]
    assert reply["status"] == 200
    time.strptime(reply["time"], "%Y-%m-%d %H:%M:%S")
    # THUDM's defaults (sampling, max_length 2048 capped at the model's context) with a bare prompt.
    reply = httpx.post(served[0] + "/", json={"prompt": "你好"}, timeout=120).json()
    assert reply["status"] == 200 and isinstance(reply["response"], str)
    assert reply["history"] == [["你好", reply["response"]]]


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages.1.role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**70}, "seed"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "长" * 600}]}, "messages"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_chat_requests_get_400_naming_the_field(served, body, param):
    response = httpx.post(served[0] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode()),
    ("/", json.dumps({"prompt": "x", "history": [["only one"]]}).encode()),
    ("/", json.dumps({"prompt": "x", "top_p": 2}).encode()),
    ("/", json.dumps({"prompt": "长" * 600}).encode()),
])
def test_bad_bodies_get_400_and_the_server_keeps_serving(served, client, path, body):
    response = httpx.post(served[0] + path, content=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert client.models.list().data  # still alive


def test_openai_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="golden", messages=[{"role": "user", "content": "x"}], temperature=-1)


def test_api_key(model, tok):
    with running_server(model, tok, api_key=KEY) as (url, _):
        good = openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0)
        assert good.chat.completions.create(model="golden", messages=[{"role": "user", "content": "你好"}],
                                            max_tokens=4).choices
        wrong = openai.OpenAI(api_key="sk-wrong", base_url=url + "/v1", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.post(url + "/", json={"prompt": "x"}).status_code == 401  # THUDM route too
        missing = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 401 and "API key" in missing.json()["error"]["message"]
        authorized = httpx.post(url + "/", json={"prompt": "x", "max_length": 20},
                                headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert authorized.status_code == 200
        # The page, health and metrics stay open.
        assert httpx.get(url + "/").status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200


def test_queue_full_429_and_disconnect_frees_the_row(model, tok):
    with running_server(model, tok, max_batch=1, max_queue=0) as (url, server):
        scheduler = server.scheduler
        decode = scheduler._decode  # slowed down, so that the answer is still running when the client leaves
        scheduler._decode = lambda rows: (time.sleep(0.02), decode(rows))
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 480, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the row is running
            busy = httpx.post(url + "/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
            assert busy.status_code == 429
            assert busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
            assert scheduler.batch_size == 1
        # The client went away mid-answer: its row is freed (cancelled, not finished).
        deadline = time.monotonic() + 30
        while scheduler.batch_size and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.batch_size == 0
        assert scheduler.cancelled_total == 1
        # A non-streamed request whose client gives up is dropped too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
        deadline = time.monotonic() + 30
        while (scheduler.batch_size or scheduler.cancelled_total < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.batch_size == 0 and scheduler.cancelled_total == 2
        answer = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "max_tokens": 4}, timeout=60)
        assert answer.status_code == 200


# ----------------------------------------------------------------------------------- health, metrics, page


def test_health_metrics_and_page(served, client):
    url, _ = served
    assert httpx.get(url + "/health").json()["status"] == "ok"
    client.chat.completions.create(model="golden", messages=[{"role": "user", "content": "你好"}], max_tokens=4)
    text = httpx.get(url + "/metrics").text
    for name in ("glm6b_requests_total", "glm6b_generated_tokens_total", "glm6b_prompt_tokens_total",
                 "glm6b_queue_length", "glm6b_batch_size", "glm6b_time_to_first_token_seconds_count",
                 "glm6b_tokens_per_second"):
        assert f"\n{name}" in text, name
    assert 'glm6b_requests_total{endpoint="POST /v1/chat/completions",status="200"}' in text
    generated = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith("glm6b_generated_tokens_total")))
    assert generated >= 4
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "<script" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert httpx.get(url + "/nowhere").json()["error"]["message"]


def test_glm6b_serve_command(tmp_path):
    """`glm6b serve --model <tiny folder>` in a subprocess answers the openai client and THUDM's protocol."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLM6B_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "glm6b", "serve", "--model", str(GOLDEN), "--port", str(port),
                                "--max-batch", "2", "--max-tokens", "16"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "glm6b serve did not become healthy"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == Path(GOLDEN).name
        for max_tokens in (None, 100):  # --max-tokens is the default and the cap
            answer = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                                    max_tokens=max_tokens, temperature=0)
            assert answer.usage.completion_tokens <= 16
        chunks = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        reply = httpx.post(url + "/", json={"prompt": "你好"}, headers={"Authorization": f"Bearer {KEY}"},
                           timeout=60).json()
        assert reply["status"] == 200
    finally:
        process.terminate()
        process.wait(30)


def test_glm6b_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from glm6b import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sse_starlette" else real(name, *a))
    assert cli.main(["serve", "--model", str(GOLDEN)]) == 2
    assert "pip install 'glm6b[serve]'" in capsys.readouterr().err


def test_health_is_503_until_the_scheduler_runs(model, tok):
    import asyncio

    app = create_app(Server(model, tok))  # the lifespan (which starts the scheduler) has not run

    async def get_health():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/health")

    response = asyncio.run(get_health())
    assert response.status_code == 503 and response.json()["status"] == "unavailable"
