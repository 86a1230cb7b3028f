"""The OpenAI-compatible server, live on 127.0.0.1 (a free port; uvicorn in a thread), driven by the
official `openai` client and raw HTTP: completions and chat, streaming and not, batch-invariant
concurrent requests, bad inputs with their status codes, a full queue, a disconnect, /metrics."""
import asyncio
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.faults.server import TEMPLATE, free_port as _free_port  # noqa: E402

@pytest.fixture(scope="module")
def tiny_mixtral():
    from haq import zoo

    return str(zoo.build("tiny-mixtral"))


def _start(model, tmp_path_factory, **kwargs):
    import uvicorn

    from haq.serve import build_server

    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    server = build_server(model, "50%", hardware="laptop", chat_template=str(template), served_name="tiny",
                          **kwargs)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base)
    return server, uv, thread, base


def _wait_healthy(base: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"the server at {base} did not come up in {seconds:g} s")


@pytest.fixture(scope="module")
def live(tiny_mixtral, tmp_path_factory):
    server, uv, thread, base = _start(tiny_mixtral, tmp_path_factory, max_batch=16, batch_invariant=True)
    yield server, base, openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    uv.should_exit = True
    thread.join(timeout=20)
    assert not server.worker.is_alive()  # shutdown stopped the model thread


def test_models_and_health(live):
    _, base, client = live
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


def test_completion_streaming_and_not(live):
    _, _, client = live
    full = client.completions.create(model="tiny", prompt="The history of", max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop") and full.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny", prompt="The history of", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_streaming_and_not(live):
    _, _, client = live
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Paris."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason is not None


def test_stop_strings_end_the_text_before_them(live):
    _, _, client = live
    free = client.completions.create(model="tiny", prompt="The history of", max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = text.strip().split()[1]  # a word in the middle of the answer
    cut = client.completions.create(model="tiny", prompt="The history of", max_tokens=16, temperature=0,
                                    extra_body={"stop": [stop, "zzz1", "zzz2", "zzz3", "zzz4"]})  # lm-eval: until + EOS
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(stop)]


def test_sixteen_concurrent_requests_each_equal_the_request_sent_alone(live):
    _, base, _ = live
    prompts = [f"In {1900 + 7 * i}, the" for i in range(16)]

    def body(p):
        return {"model": "tiny", "prompt": p, "max_tokens": 8 + prompts.index(p) % 5, "temperature": 0}

    alone = [httpx.post(f"{base}/v1/completions", json=body(p), timeout=60).json()["choices"][0]["text"]
             for p in prompts]

    async def together():
        async with httpx.AsyncClient(timeout=120) as http:
            replies = await asyncio.gather(*[http.post(f"{base}/v1/completions", json=body(p)) for p in prompts])
        return [r.json()["choices"][0]["text"] for r in replies]

    assert asyncio.run(together()) == alone


BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', 400),
    ("wrong type", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
    ("unknown field", "/v1/completions", {"model": "tiny", "prompt": "x", "temprature": 0.5}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("max_tokens 0", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
    ("max_tokens beyond the context", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400),
    ("temperature out of range", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 5}, 400),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("a number as a string", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400),
    ("a boolean as a number", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": True}, 400),
    ("two different max tokens", "/v1/completions",
     {"model": "tiny", "prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}, 400),
    ("an image part", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400),
]


def test_what_current_openai_clients_send_is_taken(live):
    """max_completion_tokens, the developer role, content as text parts, null sampling fields, zero
    penalties (frequency_penalty too): the same answer as the classic request."""
    _, base, client = live
    classic = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Paris."}])
    current = client.chat.completions.create(
        model="tiny", max_completion_tokens=6, temperature=0, frequency_penalty=0, presence_penalty=0,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Tell me about "},
                                               {"type": "text", "text": "Paris."}]}])
    assert current.choices[0].message.content == classic.choices[0].message.content
    reply = httpx.post(f"{base}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 2, "top_p": None, "temperature": None,
                             "frequency_penalty": None})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("case,path,payload,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_body(live, case, path, payload, status):
    _, base, _ = live
    kwargs = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload}
    reply = httpx.post(f"{base}{path}", timeout=30, **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status


def test_a_disconnect_mid_stream_frees_the_slot(live):
    server, base, _ = live
    with httpx.stream("POST", f"{base}/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "Once", "max_tokens": 2000, "stream": True, "ignore_eos": True}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    for _ in range(60):  # 3 s; the 2000 tokens would take far longer
        if server.worker.generator.active == 0 and not server.worker.handles:
            break
        time.sleep(0.05)
    assert server.worker.generator.active == 0 and not server.worker.handles


def test_metrics_parse_and_count(live):
    from prometheus_client.parser import text_string_to_metric_families

    _, base, client = live
    client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    for name in ("haq_requests", "haq_generated_tokens", "haq_queue_depth", "haq_batch_size",
                 "haq_expert_hit_rate", "haq_expert_cpu_share", "haq_expert_bytes_moved",
                 "haq_time_to_first_token_seconds", "haq_inter_token_latency_seconds", "haq_device_expert_bytes"):
        assert name in families, name
    generated = sum(s.value for s in families["haq_generated_tokens"].samples if s.name.endswith("_total"))
    assert generated >= 4


def test_a_full_queue_answers_429(tiny_mixtral, tmp_path_factory):
    server, uv, thread, base = _start(tiny_mixtral, tmp_path_factory, max_batch=1, max_queue=2)

    async def flood():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40}
            return await asyncio.gather(*[http.post(f"{base}/v1/completions", json=body) for _ in range(8)])

    try:
        replies = asyncio.run(flood())
    finally:
        uv.should_exit = True
        thread.join(timeout=20)
    codes = sorted(r.status_code for r in replies)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    error = next(r for r in replies if r.status_code == 429).json()["error"]
    assert error["type"] == "rate_limit_error" and "queue is full" in error["message"]


def test_sigterm_drains_running_requests_and_exits_cleanly(tiny_mixtral, tmp_path):
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "haq.cli", "serve", tiny_mixtral, "--hardware", "laptop",
                             "--port", str(port), "--served-model-name", "tiny"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base)
        text = []
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "Once", "max_tokens": 60, "stream": True}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and not text:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                text.append(line)
        assert text[-2] == "data: [DONE]" or "data: [DONE]" in text  # the running request completed
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_a_disconnect_while_waiting_for_a_plain_answer_frees_the_slot(live):
    server, base, _ = live
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 500 tokens
        httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True}, timeout=0.5)
    for _ in range(60):  # 3 s; the 2000 tokens would take far longer
        if server.worker.generator.active == 0 and not server.worker.handles:
            break
        time.sleep(0.05)
    assert server.worker.generator.active == 0 and not server.worker.handles


def test_a_request_past_its_timeout_gets_408_and_frees_its_slot(tiny_mixtral, tmp_path_factory):
    server, uv, thread, base = _start(tiny_mixtral, tmp_path_factory, request_timeout=0.5)
    try:
        reply = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True},
                           timeout=30)
        for _ in range(60):
            if server.worker.generator.active == 0:
                break
            time.sleep(0.05)
    finally:
        uv.should_exit = True
        thread.join(timeout=20)
    assert reply.status_code == 408 and reply.json()["error"]["type"] == "timeout_error"
    assert server.worker.generator.active == 0


def test_logprobs_and_echo_as_lm_eval_reads_them(live):
    """Completions: logprobs=N gives each token's log-probability and its N most likely ones; with
    echo, the prompt's text and tokens come first (the first token with None): lm-eval's
    `local-completions` loglikelihood request (token ids, max_tokens 1, logprobs 1, echo). Streamed,
    the chunks carry the same entries. Chat: logprobs and top_logprobs in its own layout."""
    _, base, client = live
    ids = [450, 3405, 310, 1298, 338]
    full = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) <= 2 for top in lp.top_logprobs[1:])
    generated = [max(top, key=top.get) for top in lp.top_logprobs[len(ids):]]
    assert generated == lp.tokens[len(ids):]  # greedy: each token is its step's most likely one
    assert lp.text_offset[0] == 0 and full.choices[0].text.startswith(lp.tokens[0])
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert full.choices[0].text.endswith(plain.choices[0].text) and plain.choices[0].logprobs is None
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2,
                                            echo=True, stream=True))
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], rel=1e-5)  # experts may
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text  # run elsewhere: another rounding
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=1, temperature=0, logprobs=1,
                                      echo=True)  # lm-eval's payload: a batch of token lists, one choice each
    assert [c.index for c in batch.choices] == [0, 1] and len(batch.choices[1].logprobs.tokens) == 4
    assert batch.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids) + 1], rel=1e-5)
    assert batch.usage.prompt_tokens == len(ids) + 3 and batch.usage.completion_tokens == 2
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob == c.logprob for c in content)  # greedy
    reply = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2})
    assert reply.status_code == 400 and "top_logprobs needs logprobs" in reply.json()["error"]["message"]


def test_n_choices_per_prompt_sample_apart_and_reproducibly(live):
    """n: one choice each, choice i drawn with seed + i (a seeded request repeats); greedy choices agree;
    the prompt counts once in usage; a streamed request takes n = 1."""
    _, base, client = live
    ask = dict(model="tiny", prompt="The history of", max_tokens=8, temperature=1.0, seed=7, n=3)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1
    one = client.completions.create(**{**ask, "n": 1, "seed": 8})
    assert one.choices[0].text == texts[1]  # choice 1 is the request with seed + 1
    greedy = client.completions.create(model="tiny", prompt="The history of", max_tokens=6, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.prompt_tokens == client.completions.create(
        model="tiny", prompt="The history of", max_tokens=6, temperature=0).usage.prompt_tokens
    reply = httpx.post(f"{base}/v1/completions", timeout=30, json={**ask, "stream": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
