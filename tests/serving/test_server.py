"""`stage: serve` with the real `openai` client against the server on a free localhost port:
greedy answers equal `stage: generate`'s, streaming equals non-streaming, 32 concurrent
clients get the answers they would get alone, and every bad request is an OpenAI-shaped
error after which the server still answers."""

import http.client
import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest

from jaxllm.config import from_dict
from jaxllm.rundir import RunDir
from jaxllm.serving import Server
from jaxllm.trainers import generate
from jaxllm.trainers.serve import make_backend

MODEL = "tiny-test"
PROMPTS = ["2 + 3 =", "The LORD is", "hacker: n.", "What is 7 + 5?", "Hello", "a b c d", "x", "9"]


def serve_config(ckpt, root=None, **serve):
    return from_dict({
        "stage": "serve", "inputs": {"checkpoint": str(ckpt)}, **(root or {}),
        "serve": {"model_name": MODEL, "slots": 8, "max_len": 64, "max_queue": 64, **serve},
    })  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    backend, _ = make_backend(serve_config(tiny_ckpt))
    srv = Server(backend).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def generated(tmp_path, ckpt, prompts, n, root=None, **gen):
    cfg = from_dict({
        "stage": "generate", "output_dir": str(tmp_path / "g"), "progress": False, **(root or {}),
        "inputs": {"checkpoint": str(ckpt)},
        "generate": {"prompts": prompts, "max_new_tokens": n, "temperature": 0, **gen},
    })  # fmt: skip
    run_dir = RunDir.open(cfg)
    run_dir.finish(generate.run(cfg, run_dir))
    rows = (tmp_path / "g/generations.jsonl").read_text().splitlines()
    return [json.loads(r)["completion"] for r in rows]


def call(server, method, path, body=None, raw=None):
    """(status, JSON) of a plain HTTP request (no client-side checks in the way)."""
    conn = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def assert_alive(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_greedy_completions_equal_stage_generate(tmp_path, tiny_ckpt, client):
    want = generated(tmp_path, tiny_ckpt, PROMPTS[:4], 12)
    for prompt, text in zip(PROMPTS[:4], want):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == text
        assert out.usage.completion_tokens <= 12 and out.object == "text_completion"
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                           temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].text for c in stream) == text


def test_chat_equals_stage_generate_with_chat(tmp_path, tiny_ckpt, client):
    q = "What is 7 + 5?"
    want = generated(tmp_path, tiny_ckpt, [q], 10, chat=True, system="Be brief.")[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                         temperature=0)  # fmt: skip
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_32_concurrent_clients_get_their_own_answers(client):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        .choices[0].text for p in prompts
    ]  # fmt: skip

    def ask(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(32) as pool:
        together = [r.choices[0].text for r in pool.map(ask, prompts)]
    assert together == alone


def test_n_seed_stop_logprobs(client):
    kw = dict(model=MODEL, prompt="The LORD is", max_tokens=8, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and [c.index for c in a.choices] == [0, 1, 2]
    greedy = dict(model=MODEL, max_tokens=12, temperature=0)
    texts = {p: client.completions.create(prompt=p, **greedy).choices[0].text for p in PROMPTS}
    prompt, text = max(texts.items(), key=lambda kv: len(kv[1]))
    assert len(text) > 3
    cut = client.completions.create(prompt=prompt, stop=["zzz", text[2:4]], **greedy)
    assert cut.choices[0].text == text[: text.index(text[2:4])]
    assert cut.choices[0].finish_reason == "stop"
    out = client.completions.create(prompt=prompt, logprobs=2, **{**greedy, "max_tokens": 4})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) >= 1
    assert len(lp.tokens) == out.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    assert abs(content[0].top_logprobs[0].logprob - content[0].logprob) < 1e-5  # greedy


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = call(server, "GET", "/health")[1]
    assert health["status"] == "ok" and health["slots"] == 8
    if shutil.which("curl"):
        body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 3})
        out = subprocess.run(
            ["curl", "-s", f"{server.url}/v1/completions", "-H", "Content-Type: application/json",
             "-d", body], capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert json.loads(out.stdout)["choices"][0]["finish_reason"] in ("stop", "length")


BAD = [
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": MODEL, "prompt": "word " * 80}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 64}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, None),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, None),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, None),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, None),
    ({"model": MODEL, "prompt": 5}, 400, None),
    ({"model": MODEL, "prompt": "x", "stop": [1]}, 400, None),
    ({"model": MODEL, "prompt": "x", "logprobs": 9}, 400, None),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_are_openai_errors(client, server, body, status, code):
    got, out = call(server, "POST", "/v1/completions", body)
    assert got == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert code is None or err["code"] == code
    assert_alive(client)


def test_malformed_json_bad_chat_and_unknown_route(client, server):
    url = "/v1/chat/completions"
    status, out = call(server, "POST", url, raw=b"{not json")
    assert status == 400 and "JSON" in out["error"]["message"]
    body = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    status, out = call(server, "POST", url, body)
    assert status == 400 and out["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    status, out = call(server, "GET", "/v2/nothing")
    assert status == 404 and "error" in out
    assert_alive(client)


def test_chat_stream_sends_the_role_once_and_an_empty_last_delta(client):
    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                 temperature=0, stream=True))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    assert all(d.role is None for d in deltas[1:])  # the SDK's stream helper joins roles
    assert deltas[-1].content is None and chunks[-1].choices[0].finish_reason == "length"


def test_any_integer_seed_and_a_huge_body(client, server):
    kw = dict(model=MODEL, prompt="The LORD is", max_tokens=4, temperature=1.0, n=2)
    for seed in (2**64, 2**63 - 1, -5):
        a, b = (client.completions.create(seed=seed, **kw) for _ in range(2))
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
    status, out = call(server, "POST", "/v1/completions",
                       {"model": MODEL, "prompt": "x" * (2 << 20)})  # fmt: skip
    assert status == 413 and "at most" in out["error"]["message"]
    assert_alive(client)


def test_disconnect_mid_stream_frees_the_slot(client, server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 50, "temperature": 1.0,
            "stream": True, "seed": 1}  # fmt: skip
    conn = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")  # one chunk, then hang up
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 30
    while server.backend.engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.backend.engine.busy == 0
    assert_alive(client)


def test_full_queue_is_429_and_api_key(client, server, monkeypatch):
    engine = server.backend.engine
    monkeypatch.setattr(engine, "max_queue", 2)
    monkeypatch.setattr(type(engine), "waiting", property(lambda self: 2))  # a full queue
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    monkeypatch.setattr(type(engine), "waiting", property(lambda self: 0))  # idle, but more
    with pytest.raises(openai.BadRequestError, match="3 choices"):  # choices than it queues:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=3)  # never a 429
    monkeypatch.undo()
    monkeypatch.setattr(server.backend, "api_key", "sekret")
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    conn = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=60)
    conn.request("GET", "/v1/models", headers={"Authorization": "Bearer séance"})
    assert conn.getresponse().status == 401  # not a 500 from comparing non-ASCII text
    conn.close()
    keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
    assert_alive(keyed)
    assert call(server, "GET", "/health")[0] == 200  # health needs no key


@pytest.mark.slow
def test_quantised_serving_equals_quantised_generate(tmp_path, tiny_ckpt):
    """The `quantize:` section applies to the served weights as to stage generate's."""
    root = {"quantize": {"method": "int8"}}
    backend, _ = make_backend(serve_config(tiny_ckpt, root=root))
    srv = Server(backend).start()
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        want = generated(tmp_path, tiny_ckpt, PROMPTS[:3], 8, root=root)
        for prompt, text in zip(PROMPTS[:3], want, strict=True):
            out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
            assert out.choices[0].text == text
    finally:
        srv.stop()


def test_streamed_text_offsets_equal_the_token_lengths(client):
    """A stop string holds text back from the chunks; `text_offset` still counts every token
    string before it (the cumulative sum), streamed or not."""
    kw = dict(model=MODEL, prompt="The LORD is", max_tokens=12, temperature=0, logprobs=1,
              stop=["zzzzzz"])  # fmt: skip
    whole = client.completions.create(**kw).choices[0].logprobs
    want = np.concatenate([[0], np.cumsum([len(t) for t in whole.tokens])[:-1]]).tolist()
    assert len(whole.tokens) == 12 and whole.text_offset == want
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    streamed = [x.logprobs for x in chunks if x.logprobs]
    assert sum((lp.tokens for lp in streamed), []) == whole.tokens
    assert sum((lp.text_offset for lp in streamed), []) == want


def test_chat_without_max_tokens_runs_to_a_stop_or_the_full_context(client, server, monkeypatch):
    messages = [{"role": "user", "content": "Write a long story about a dog and a cat."}]
    kw = dict(model=MODEL, messages=messages, temperature=1.0, seed=3)
    out = client.chat.completions.create(**kw)
    used = out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.completion_tokens > 16  # not completions' default
    assert out.choices[0].finish_reason == "stop" or used == 64  # serve.max_len: 64
    monkeypatch.setattr(server.backend, "max_tokens", 20)  # the server's cap still applies
    capped = client.chat.completions.create(**kw)
    assert capped.usage.completion_tokens == min(20, out.usage.completion_tokens)  # same seed
    text = client.completions.create(model=MODEL, prompt="The LORD is", temperature=1.0, seed=3)
    assert text.usage.completion_tokens <= 16  # completions keep OpenAI's legacy default


def test_chat_keeps_a_last_assistant_turn_and_answers_after_it(client, tok):
    """OpenAI's chat: a conversation that ends with an assistant turn keeps it in the prompt,
    and the model writes the next assistant turn; a lone assistant message is a conversation."""
    q = [{"role": "user", "content": "What is 2 + 3?"}]
    a = [{"role": "assistant", "content": "The answer is 5, and that is all."}]
    for messages in (q + a, a):
        # the prompt written out by hand: every turn, then a new assistant tag
        turns = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        want = tok.encode(turns + "<|assistant|>", add_bos=True)
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                             temperature=0, logprobs=True)  # fmt: skip
        assert out.usage.prompt_tokens == len(want)
        # the same ids as a completions prompt: the same first token and log-prob
        ref = client.completions.create(model=MODEL, prompt=turns + "<|assistant|>",
                                        max_tokens=1, temperature=0, logprobs=1)  # fmt: skip
        assert ref.usage.prompt_tokens == len(want)
        first = out.choices[0].logprobs.content[0]
        assert abs(first.logprob - ref.choices[0].logprobs.token_logprobs[0]) < 1e-5


def test_chat_takes_text_content_parts_and_the_developer_role(client, tok):
    """The OpenAI API's `content: [{"type": "text", ...}]` parts are joined, and its
    `developer` role is rendered as `system` (the prompt counted against a hand-written one)."""
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "},
                                     {"type": "text", "text": "2 + 3?"}]},
    ]  # fmt: skip
    want = tok.encode("<|system|>Be brief.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>",
                      add_bos=True)  # fmt: skip
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                         temperature=0)  # fmt: skip
    assert out.usage.prompt_tokens == len(want)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(model=MODEL, messages=image, max_tokens=1)


def test_each_choice_draws_from_its_own_key_of_the_request_seed(client, server, monkeypatch):
    """(seed, n) choice i never shares a key with (seed + 1, n) choice i - 1 (nor with a seed
    past 32 bits); n=1 keeps the seed's plain `jax.random.key`; the same request repeats."""
    import jax

    engine, seen = server.backend.engine, []
    real = engine.submit
    monkeypatch.setattr(engine, "submit", lambda seq: real(seq) or seen.append(seq.key_data))

    def keys(seed, n, prompt="x"):
        seen.clear()
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=1.0,
                                  n=n, seed=seed)  # fmt: skip
        return [k.tobytes() for k in seen]

    a, b, again = keys(0, 4), keys(1, 4), keys(0, 4)
    assert len(set(a + b)) == 8 and a == again
    assert not set(a) & set(keys(2**32, 2) + keys(2 * 2**32, 1))
    plain = np.asarray(jax.random.key_data(jax.random.key(5)), np.uint32).tobytes()
    assert keys(5, 1) == [plain] and keys(5, 3)[0] == plain
    two = keys(0, 2, prompt=["x", "y"])  # a prompt list: index j * n + i, all distinct
    assert two[:2] == a[:2] and len(set(two)) == 4
