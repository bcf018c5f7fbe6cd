"""``safedecode serve`` against a live server in a subprocess, driven by the official ``openai``
client: outputs equal offline ``generate`` (greedy, seeded, n, stop, logprobs, completions,
streaming), 32 concurrent streams unmixed, disconnects free their rows, errors in OpenAI's shape,
429 on overload, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from engine_fixtures import default_model, one_token_words, tiny_llama
from serve_fixtures import LiveServer

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams

KEY = "sk-test"
PROMPTS = ["Hi", "Why is the sky blue?", "Name a colour.", "Tell me a joke",
           "How do I bake bread?", "What is 2 + 2?", "Describe the sea.", "Say something."]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = LiveServer(["--model", str(tiny_model_dir), "--name", "tiny", "-m", "plain",
                      "-m", "acd-text", "--api-key", KEY, "--max-seqs", "8",
                      "--max-queue", "64"], tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def offline():
    model, tok = tiny_llama()
    decs = {m: SafeDecoder(model, tok, methods.get(m)) for m in ("plain", "acd-text")}

    def run(method, prompts, **kw):
        return decs[method].generate(prompts, **kw)
    return run


def _health(srv) -> dict:
    return httpx.get(f"{srv.url}/health", timeout=30).json()


def _wait_idle(srv, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = _health(srv)
        if all(m["running"] == 0 and m["waiting"] == 0 for m in h["models"].values()) \
                or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


@pytest.mark.parametrize("method", ["plain", "acd-text"])
def test_chat_greedy_seeded_and_n_equal_offline(server, offline, method):
    c = server.client()
    model = f"tiny:{method}"
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    ref = offline(method, PROMPTS[1], max_new_tokens=8, temperature=0)[0]
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == ref.prompt_tokens[0]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0.9,
                                  top_p=0.95, seed=11, n=3)
    refs = offline(method, [PROMPTS[1]] * 3, max_new_tokens=8, temperature=0.9, top_p=0.95,
                   seed=[11, 12, 13])
    assert [ch.message.content for ch in r.choices] == [x.text for x in refs]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) > 1  # forked, but drawn apart


def test_chat_with_a_system_message_on_a_contrast_method_equals_offline(server, offline):
    """A deployment's system message is served on a method whose branches have their own
    prompts (it joins each branch after its prompt), as offline."""
    msgs = [{"role": "system", "content": "You are a gardening assistant."},
            {"role": "user", "content": PROMPTS[4]}]
    r = server.client().chat.completions.create(model="tiny:acd-text", messages=msgs,
                                                max_tokens=8, temperature=0)
    assert r.choices[0].message.content == offline("acd-text", [msgs], max_new_tokens=8)[0].text


def test_chat_stop_logprobs_and_top_k(server, offline):
    c = server.client()
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    full = offline("plain", PROMPTS[2], max_new_tokens=10, temperature=0)[0].text
    stop = full[len(full) // 2]
    r = c.chat.completions.create(model="tiny:plain", messages=msgs, max_tokens=10,
                                  temperature=0, stop=[stop], logprobs=True)
    ref = offline("plain", PROMPTS[2], max_new_tokens=10, temperature=0, stop=[stop],
                  return_logprobs=True)[0]
    ch = r.choices[0]
    assert ch.message.content == ref.text and stop not in ch.message.content
    assert ch.finish_reason == "stop"
    assert [t.logprob for t in ch.logprobs.content] == pytest.approx(ref.logprobs, abs=1e-5)
    r = c.chat.completions.create(model="tiny:plain", messages=msgs, max_tokens=6,
                                  temperature=1.0, seed=3, extra_body={"top_k": 5})
    ref = offline("plain", PROMPTS[2], max_new_tokens=6, temperature=1.0, seed=3, top_k=5)[0]
    assert r.choices[0].message.content == ref.text


def test_top_logprobs_equal_offline(server, offline):
    """Chat ``top_logprobs`` and completions ``logprobs=N``, whole and streamed, = offline."""
    c = server.client()
    msgs = [{"role": "user", "content": PROMPTS[5]}]
    ref = offline("acd-text", PROMPTS[5], max_new_tokens=5, return_logprobs=True,
                  top_logprobs=3)[0]
    tok = tiny_llama()[1]

    def texts(step):
        return [tok.decode([i]) for i, _ in step]
    r = c.chat.completions.create(model="tiny:acd-text", messages=msgs, max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [[t.token for t in x.top_logprobs] for x in content] == \
        [texts(s) for s in ref.top_logprobs]
    assert [[t.logprob for t in x.top_logprobs] for x in content][2] == \
        pytest.approx([lp for _, lp in ref.top_logprobs[2]], abs=1e-5)
    stream = c.chat.completions.create(model="tiny:acd-text", messages=msgs, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       stream=True)
    streamed = [[t.token for t in x.top_logprobs] for ch in stream for choice in ch.choices
                if choice.logprobs for x in choice.logprobs.content]
    assert streamed == [texts(s) for s in ref.top_logprobs]
    raw = offline("plain", "Once upon a time", raw=True, max_new_tokens=4,
                  return_logprobs=True, top_logprobs=2)[0]
    r = c.completions.create(model="tiny:plain", prompt="Once upon a time", max_tokens=4,
                             temperature=0, logprobs=2)
    top = r.choices[0].logprobs.top_logprobs
    assert [list(d) for d in top] == [texts(s) for s in raw.top_logprobs]
    assert top[0][tok.decode([raw.top_logprobs[0][0][0]])] == \
        pytest.approx(raw.top_logprobs[0][0][1], abs=1e-5)


def test_penalties_and_logit_bias_equal_offline(server, offline):
    c = server.client()
    msgs = [{"role": "user", "content": PROMPTS[6]}]
    kw = {"frequency_penalty": 1.5, "presence_penalty": 0.3}
    ref = offline("acd-text", PROMPTS[6], max_new_tokens=8, logit_bias={1234: 4.0}, **kw)[0]
    assert ref.token_ids.count(1234) > 1  # the bias and the penalty both act
    r = c.chat.completions.create(model="tiny:acd-text", messages=msgs, max_tokens=8,
                                  temperature=0, logit_bias={"1234": 4.0}, **kw)
    assert r.choices[0].message.content == ref.text
    raw = offline("plain", "Once upon a time", raw=True, max_new_tokens=6,
                  logit_bias={1234: 4.0}, **kw)[0]
    r = c.completions.create(model="tiny:plain", prompt="Once upon a time", max_tokens=6,
                             temperature=0, logit_bias={"1234": 4.0}, **kw)
    assert r.choices[0].text == raw.text
    rep = offline("acd-text", PROMPTS[6], max_new_tokens=8, repetition_penalty=0.3)[0]
    assert rep.text != offline("acd-text", PROMPTS[6], max_new_tokens=8)[0].text
    r = c.chat.completions.create(model="tiny:acd-text", messages=msgs, max_tokens=8,
                                  temperature=0, extra_body={"repetition_penalty": 0.3})
    assert r.choices[0].message.content == rep.text


def test_token_bans_equal_offline(server, offline):
    """vLLM's ``min_tokens``, ``stop_token_ids``, ``bad_words``, ``allowed_token_ids``,
    ``include_stop_str_in_output`` as extra body fields: chat and completions = the engine
    offline."""
    c = server.client()
    msgs = [{"role": "user", "content": PROMPTS[6]}]
    base = offline("acd-text", PROMPTS[6], max_new_tokens=8, ignore_eos=True)[0].token_ids
    ban = {"allowed_token_ids": sorted(set(base[::2]) | {7, 99}), "min_tokens": 4,
           "stop_token_ids": [base[0]]}
    ref = offline("acd-text", PROMPTS[6], max_new_tokens=8, **ban)[0]
    assert ref.token_ids != base and len(ref.token_ids) > 4
    r = c.chat.completions.create(model="tiny:acd-text", messages=msgs, max_tokens=8,
                                  temperature=0, extra_body=ban)
    assert r.choices[0].message.content == ref.text
    raw = offline("plain", "Once upon a time", raw=True, max_new_tokens=6)[0]
    word = one_token_words(tiny_llama()[1], raw.text)[0]
    ref = offline("plain", "Once upon a time", raw=True, max_new_tokens=6, bad_words=[word])[0]
    assert word not in ref.text.split()
    r = c.completions.create(model="tiny:plain", prompt="Once upon a time", max_tokens=6,
                             temperature=0, extra_body={"bad_words": [word]})
    assert r.choices[0].text == ref.text
    stop = raw.text.split()[1]  # vLLM's include_stop_str_in_output
    ref = offline("plain", "Once upon a time", raw=True, max_new_tokens=6, stop=[stop],
                  include_stop_str_in_output=True)[0]
    assert ref.text.endswith(stop) and ref.finish_reason == "stop"
    r = c.completions.create(model="tiny:plain", prompt="Once upon a time", max_tokens=6,
                             temperature=0, stop=[stop],
                             extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"


def test_completions_take_token_id_prompts(server):
    """Token-id prompts (one list, or a list of lists), as vLLM takes them: for `plain` the
    same answer as the text they encode; for a method with branch prompts the same as the
    engine given those ids offline (each branch's system text, then the ids)."""
    c = server.client()
    tok = tiny_llama()[1]
    text = "Once upon a time"
    ids = tok(text)["input_ids"]
    by_text = c.completions.create(model="tiny:plain", prompt=text, max_tokens=6, temperature=0)
    by_ids = c.completions.create(model="tiny:plain", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    model, _ = tiny_llama()
    eng = SafeDecoder(model, tok, methods.get("acd-text")).engine(max_seqs=2)
    want = []
    for p in (ids, ids[:2]):
        rid = eng.add_request(p, SamplingParams(max_new_tokens=6), raw=True)
        while eng.has_unfinished():
            eng.step()
        want.append(eng.pop_result(rid).text)
    r = c.completions.create(model="tiny:acd-text", prompt=[ids, ids[:2]], max_tokens=6,
                             temperature=0)
    assert [ch.text for ch in r.choices] == want


def test_completions_echo_scores_the_prompt(server):
    """``echo``: the prompt's own log-probs lead (the first None); with ``max_tokens`` 0 and
    `plain` they are the model's teacher-forced ones; with a contrast they = the engine's
    scoring offline, followed by the answer continued from the same ids."""
    c = server.client()
    model, tok = tiny_llama()
    text = "Once upon a time there was"
    ids = tok(text)["input_ids"]
    r = c.completions.create(model="tiny:plain", prompt=text, echo=True, max_tokens=0,
                             logprobs=1, temperature=0)
    ch = r.choices[0]
    assert ch.text == text and ch.finish_reason == "length"
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert ch.logprobs.token_logprobs[0] is None
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert [list(d) for d in ch.logprobs.top_logprobs[1:]] == \
        [[tok.decode([int(lp[t - 1].argmax())])] for t in range(1, len(ids))]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0

    eng = SafeDecoder(model, tok, methods.get("acd-text")).engine(max_seqs=2)
    sid = eng.add_scored(ids[:1], ids[1:], raw=True)
    gid = eng.add_request(ids, SamplingParams(max_new_tokens=3, logprobs=True), raw=True)
    while eng.has_unfinished():
        eng.step()
    scored, gen = eng.pop_result(sid), eng.pop_result(gid)
    r = c.completions.create(model="tiny:acd-text", prompt=ids, echo=True, max_tokens=3,
                             logprobs=0, temperature=0)
    ch = r.choices[0]
    assert ch.text == tok.decode(ids) + gen.text
    assert ch.logprobs.token_logprobs[1:len(ids)] == pytest.approx(scored.logprobs, abs=1e-4)
    assert ch.logprobs.token_logprobs[len(ids):] == pytest.approx(gen.logprobs, abs=1e-4)
    r = c.completions.create(model="tiny:acd-text", prompt=ids, echo=True, max_tokens=3,
                             temperature=0)  # no log-probs asked: the text only
    assert r.choices[0].text == tok.decode(ids) + gen.text and r.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="tiny:plain", prompt=text, echo=True, stream=True)
    assert info.value.body["param"] == "echo"


def test_completions_equal_offline_raw_prompts(server, offline):
    c = server.client()
    prompts = ["Once upon a time", "The capital of France is"]
    r = c.completions.create(model="tiny:acd-text", prompt=prompts, max_tokens=6,
                             temperature=0.7, seed=5, n=2, logprobs=0)
    refs = offline("acd-text", [p for p in prompts for _ in range(2)], raw=True,
                   max_new_tokens=6, temperature=0.7, seed=[5, 6, 5, 6], return_logprobs=True)
    assert [ch.text for ch in r.choices] == [x.text for x in refs]
    assert r.choices[3].logprobs.token_logprobs == pytest.approx(refs[3].logprobs, abs=1e-5)
    r = c.completions.create(model="tiny:plain", prompt=prompts[0], max_tokens=5,
                             temperature=0)
    assert r.choices[0].text == offline("plain", prompts[0], raw=True, max_new_tokens=5)[0].text


def test_streaming_equals_offline(server, offline):
    c = server.client()
    stream = c.chat.completions.create(
        model="tiny:acd-text", messages=[{"role": "user", "content": PROMPTS[3]}],
        max_tokens=12, temperature=0.8, seed=9, n=2, stream=True,
        stream_options={"include_usage": True})
    text, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    refs = offline("acd-text", [PROMPTS[3]] * 2, max_new_tokens=12, temperature=0.8,
                   seed=[9, 10])
    assert text == [x.text for x in refs] and finish == ["length", "length"]
    assert usage.completion_tokens == 24
    stream = c.completions.create(model="tiny:plain", prompt="Once upon a time",
                                  max_tokens=7, temperature=0, stream=True)
    got = "".join(ch.choices[0].text for ch in stream if ch.choices)
    assert got == offline("plain", "Once upon a time", raw=True, max_new_tokens=7)[0].text


def test_32_concurrent_streams_unmixed_and_disconnects_free_rows(server, offline):
    """32 streaming clients with distinct prompts and seeds at once: every response equals its
    offline twin. Then 16 clients that hang up mid-stream beside 16 that finish: the finished
    ones are intact and the engine's rows are all free afterwards."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + f" ({i})", 100 + i) for i in range(32)]
    refs = offline("acd-text", [p for p, _ in jobs], max_new_tokens=10, temperature=0.9,
                   seed=[s for _, s in jobs])

    async def one(client, prompt, seed, max_tokens=10, hang_up_after=None):
        stream = await client.chat.completions.create(
            model="tiny:acd-text", messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=0.9, seed=seed, stream=True,
            extra_body={"ignore_eos": hang_up_after is not None})
        text, n = "", 0
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
            n += 1
            if hang_up_after is not None and n >= hang_up_after:
                await stream.close()
                return None
        return text

    async def main():
        client = server.async_client()
        got = await asyncio.wait_for(asyncio.gather(*(one(client, p, s) for p, s in jobs)),
                                     120)
        hang = [one(client, p, s, max_tokens=400, hang_up_after=3) for p, s in jobs[:16]]
        keep = [one(client, p, s) for p, s in jobs[16:]]
        mixed = await asyncio.wait_for(asyncio.gather(*hang, *keep), 120)
        await client.close()
        return got, mixed[16:]

    before = _generated(server, "tiny:acd-text")
    got, kept = asyncio.run(main())
    assert got == [r.text for r in refs]
    assert kept == [r.text for r in refs[16:]]
    h = _wait_idle(server)
    assert h["models"]["tiny:acd-text"] == {"running": 0, "waiting": 0, "free_slots": 8}
    # the 16 that hung up were aborted: far fewer than their 16 x 400 tokens were decoded
    assert _generated(server, "tiny:acd-text") - before < 32 * 10 + 16 * 400 // 4


def _generated(srv, model: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    key = f'safedecode_generation_tokens_total{{model="{model}"}}'
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(key))


def test_errors_in_openai_shape(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Hi"}]
    cases = [
        (dict(model="tiny:plain", messages=msgs, temperature=-1), openai.BadRequestError,
         "temperature"),
        (dict(model="tiny:plain", messages=msgs, top_p=0), openai.BadRequestError, "top_p"),
        (dict(model="tiny:plain", messages=msgs, max_tokens=0), openai.BadRequestError,
         "max_tokens"),
        (dict(model="tiny:plain", messages=msgs, n=9), openai.BadRequestError, "n"),
        (dict(model="tiny:plain", messages=msgs, presence_penalty=2.5),
         openai.BadRequestError, "presence_penalty"),
        (dict(model="tiny:plain", messages=msgs, logit_bias={"5": 101}),
         openai.BadRequestError, "logit_bias"),
        (dict(model="tiny:plain", messages=msgs, logit_bias={"x": 1}),
         openai.BadRequestError, "logit_bias"),
        (dict(model="tiny:plain", messages=msgs, extra_body={"repetition_penalty": 0}),
         openai.BadRequestError, "repetition_penalty"),
        (dict(model="tiny:plain", messages=msgs, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}]),
         openai.BadRequestError, "tools"),
        (dict(model="tiny:plain", messages=msgs, response_format={"type": "json_object"}),
         openai.BadRequestError, "response_format"),
        (dict(model="tiny:plain", messages=msgs, logit_bias={"99999999": 1}),
         openai.BadRequestError, "logit_bias"),
        (dict(model="tiny:plain", messages=msgs, extra_body={"allowed_token_ids": [10**8]}),
         openai.BadRequestError, "allowed_token_ids"),
        (dict(model="tiny:plain", messages=msgs, max_tokens=4, extra_body={"min_tokens": 5}),
         openai.BadRequestError, "min_tokens"),
        (dict(model="tiny:plain", messages=msgs, extra_body={"bad_words": [" "]}),
         openai.BadRequestError, "bad_words"),
        (dict(model="tiny:plain", messages=msgs, top_logprobs=3),
         openai.BadRequestError, "top_logprobs"),
        (dict(model="tiny:plain", messages=msgs, logprobs=True, top_logprobs=21),
         openai.BadRequestError, "top_logprobs"),
        (dict(model="tiny:plain", messages=[{"role": "tool", "content": "x"}]),
         openai.BadRequestError, "messages[0].role"),
        (dict(model="tiny:plain", messages=[{"role": "user", "content": "hi " * 600}]),
         openai.BadRequestError, "messages"),
        (dict(model="tiny:nope", messages=msgs), openai.NotFoundError, "model"),
    ]
    for kw, err, param in cases:
        with pytest.raises(err) as info:
            c.chat.completions.create(**kw)
        body = info.value.body
        assert body["param"] == param, (kw, body)
        assert param in body["message"] and body["type"]
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="tiny:plain", messages=[
            {"role": "user", "content": "hi " * 600}])
    assert info.value.body["code"] == "context_length_exceeded"
    ok = c.chat.completions.create(model="tiny:plain", messages=msgs, max_tokens=2,
                                   response_format={"type": "text"}, user="u1",
                                   metadata={"k": "v"}, tool_choice="none")
    assert ok.choices[0].finish_reason  # fields that change nothing are accepted
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model="tiny:plain",
                                                               messages=msgs)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="tiny:plain", prompt=[1, 2, 10**9])
    assert info.value.body["param"] == "prompt" and "token ids" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="tiny:plain", prompt=[[1, 2], []])
    assert info.value.body["param"] == "prompt"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param",
                                                               "code"}
    assert _wait_idle(server)["models"]["tiny:plain"]["running"] == 0


def test_models_health_metrics(server):
    c = server.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny:plain", "tiny:acd-text"]
    card = httpx.get(f"{server.url}/v1/models/tiny:acd-text", timeout=30,
                     headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["safedecode"]["k"] == 2 and card["safedecode"]["weights"][1] < 0
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    c.chat.completions.create(model="tiny:plain", max_tokens=3, temperature=0,
                              messages=[{"role": "user", "content": "Hi"}])
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'safedecode_requests_total{model="tiny:plain",outcome="ok"}' in text
    for name in ("safedecode_time_to_first_token_seconds_count",
                 "safedecode_inter_token_latency_seconds_count",
                 "safedecode_generation_tokens_total", "safedecode_queue_depth"):
        assert f'{name}{{model="tiny:plain"}}' in text
    count = [ln for ln in text.splitlines()
             if ln.startswith('safedecode_time_to_first_token_seconds_count{model="tiny:plain"')]
    assert float(count[0].split()[-1]) >= 1
    assert _health(server)["status"] == "ok"


def test_overload_gets_429_then_sigterm_drains(tiny_model_dir, tmp_path):
    """One slot and a queue of one: a burst gets 429 with Retry-After (never a hang); then a
    stream in flight when SIGTERM arrives finishes whole, and the server exits 0."""
    srv = LiveServer(["--model", str(tiny_model_dir), "--name", "tiny", "--max-seqs", "1",
                      "--max-queue", "1"], tmp_path)
    try:
        body = {"model": "tiny:plain", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 300, "ignore_eos": True, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient(timeout=60) as h:
                return await asyncio.wait_for(asyncio.gather(*(
                    h.post(f"{srv.url}/v1/chat/completions", json=body) for _ in range(8))), 90)

        replies = asyncio.run(burst())
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
        assert set(codes) <= {200, 429}
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in replies
                   if r.status_code == 200)
        busy = next(r for r in replies if r.status_code == 429)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"

        with httpx.Client(timeout=60) as h, h.stream(
                "POST", f"{srv.url}/v1/chat/completions",
                json=body | {"max_tokens": 200, "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data:"))
            assert "assistant" in first
            srv.terminate()
            rest = [ln[6:] for ln in lines if ln.startswith("data:")]
        assert rest[-1] == "[DONE]"
        chunks = [json.loads(x) for x in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for ch in chunks if ch["choices"][0]["delta"].get("content")) >= 150
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=5)
    finally:
        srv.stop()


def test_embedded_model_server_equals_offline(tmp_path):
    """The embedded SmolLM2-135M-Instruct behind the server: greedy and seeded chats equal
    offline generate."""
    srv = LiveServer(["-m", "plain"], tmp_path)
    try:
        c = srv.client()
        model, tok = default_model()
        dec = SafeDecoder(model, tok, methods.get("plain"))
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2-135m:plain", messages=msgs,
                                      max_tokens=16, temperature=0)
        ref = dec.generate(msgs, max_new_tokens=16)[0]
        assert r.choices[0].message.content == ref.text and "Paris" in ref.text
        r = c.chat.completions.create(model="smollm2-135m:plain", messages=msgs,
                                      max_tokens=12, temperature=0.8, seed=4, n=2)
        refs = dec.generate([msgs, msgs], max_new_tokens=12, temperature=0.8, seed=[4, 5])
        assert [ch.message.content for ch in r.choices] == [x.text for x in refs]
    finally:
        assert srv.stop() == 0


def test_request_timeout_aborts_and_frees_rows(tiny_model_dir):
    """In process (the app under TestClient): a request past --request-timeout gets 408 in
    OpenAI's shape and its rows are freed."""
    from fastapi.testclient import TestClient

    from safedecode.serve import ServerConfig, ServeSpec, build_models, create_app

    served = build_models(ServeSpec(model=str(tiny_model_dir), name="tiny", max_seqs=2))
    eng = served[0].engine
    step = eng.step

    def slow_step():
        time.sleep(0.01)
        return step()
    eng.step = slow_step
    app = create_app(served, ServerConfig(request_timeout=0.3))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "tiny:plain", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 400, "ignore_eos": True})
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 10
        while client.get("/health").json()["models"]["tiny:plain"]["running"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["models"]["tiny:plain"] == {
            "running": 0, "waiting": 0, "free_slots": 2}
        r = client.post("/v1/chat/completions", json={
            "model": "tiny:plain", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_load_client_counts_requests_tokens_and_latencies(server):
    """The load benchmark's client (bounded in count and time) against the live server."""
    from safedecode.bench.load import percentile, run_level

    res = asyncio.run(run_level(server.url, "tiny:plain", 2, 5, 4, api_key=KEY,
                                time_limit=60))
    s = res.summary()
    assert s["requests"] == 5 and s["errors"] == 0 and 0 < s["tokens"] <= 20
    assert len(res.ttft) == 5 and s["ttft_p50_s"] <= s["ttft_p99_s"] and s["tok_s"] > 0
    bad = asyncio.run(run_level(server.url, "tiny:nope", 1, 2, 4, api_key=KEY))
    assert bad.errors == 2 and bad.requests == 0
    with pytest.raises(ValueError, match="127.0.0.1"):
        asyncio.run(run_level("http://192.0.2.1:1", "x", 1, 1, 1))
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "device: expected cpu, cuda or cuda:<index>"),
    (["--dtype", "int8"], "dtype: must be one of"),
    (["--max-seqs", "0"], "--max-seqs: must be >= 1"),
    (["--port", "70000"], "--port: must be in [0, 65535]"),
    (["--prefix-store-mb", "-1"], "--prefix-store-mb: must be >= 0"),
    (["--turn-store-mb", "-2"], "--turn-store-mb: must be >= 0"),
])
def test_serve_rejects_bad_options_before_loading(args, message):
    from typer.testing import CliRunner  # noqa: PLC0415

    from safedecode.cli import app  # noqa: PLC0415

    res = CliRunner().invoke(app, ["serve", "--model", "/no/such/model", *args])
    assert res.exit_code == 2 and message in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without a GPU")
def test_serve_on_a_missing_gpu_is_a_clear_error():
    from typer.testing import CliRunner  # noqa: PLC0415

    from safedecode.cli import app  # noqa: PLC0415

    res = CliRunner().invoke(app, ["serve", "--device", "cuda"])
    assert res.exit_code == 2 and "device 'cuda': CUDA is not available" in res.output


def test_served_model_takes_device_and_dtype(tiny_model_dir):
    from safedecode.serve import ServeSpec, build_models  # noqa: PLC0415

    served = build_models(ServeSpec(model=str(tiny_model_dir), name="tiny", max_seqs=1,
                                    dtype="bfloat16"))
    (m,) = served
    assert (m.info["device"], m.info["dtype"]) == ("cpu", "bfloat16")
    assert m.engine.model.dtype == torch.bfloat16


def test_load_benchmark_script_end_to_end(tmp_path, tiny_model_dir):
    """benchmarks/bench_serve.py on the tiny model (a server in a subprocess, two levels): the
    result names its device and model, every request answered."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--model", str(tiny_model_dir),
                          "--method", "plain", "--max-tokens", "6", "--max-prefill-tokens", "0",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "serve_cpu.json").read_text())
    assert (r["device"], r["model"]) == ("cpu", str(tiny_model_dir))
    levels = r["runs"][0]["levels"]
    assert [x["concurrency"] for x in levels] == [1, 4]
    assert all(x["errors"] == 0 and x["tokens"] > 0 for x in levels)


def test_packed_forwards_are_a_server_setting(tiny_model_dir, monkeypatch):
    """``--no-packed`` (ServeSpec.packed) runs admission steps as two forwards; the model's
    ``safedecode`` object says which; the CLI flag reaches the spec."""
    from typer.testing import CliRunner  # noqa: PLC0415

    import safedecode.serve.server as server_module  # noqa: PLC0415
    from safedecode.cli import app  # noqa: PLC0415
    from safedecode.serve import ServeSpec, build_models  # noqa: PLC0415

    for packed in (True, False):
        served = build_models(ServeSpec(model=str(tiny_model_dir), name="tiny", max_seqs=2,
                                        methods=["acd-text"], packed=packed))
        assert served[0].info["packed"] is packed
        assert served[0].engine.runner.can_pack is packed
    seen = []
    monkeypatch.setattr(server_module, "run_uvicorn", lambda spec, *a, **kw: seen.append(spec))
    for flag, packed in (("--no-packed", False), ("--packed", True)):
        res = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), flag])
        assert res.exit_code == 0, res.output
        assert seen.pop().packed is packed
    # the prefill budget: 32 prompt tokens per step on a CPU unless told (0: none)
    for flags, budget in (([], 32), (["--max-prefill-tokens", "0"], None),
                          (["--max-prefill-tokens", "48"], 48)):
        res = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), *flags])
        assert res.exit_code == 0, res.output
        assert seen.pop().max_prefill_tokens == budget
    from safedecode.serve.server import prefill_budget  # noqa: PLC0415

    assert prefill_budget(None, "cuda") is None and prefill_budget(None, "cuda:1") is None
    assert prefill_budget(None, "cpu") == 32 and prefill_budget(16, "cuda") == 16
    pytest.importorskip("ray", reason="the ray extra is part of `make setup` (dev)")
    from safedecode.serve import ray_app  # noqa: PLC0415

    specs = []
    monkeypatch.setattr(ray_app, "deployment", lambda spec, *a, **kw: specs.append(spec))
    ray_app.app({"model": str(tiny_model_dir)})  # `serve run` gets the CLI's CPU default
    ray_app.app({"model": str(tiny_model_dir), "max_prefill_tokens": "0",
                 "methods": "plain,deal:k=2:reward=[keywords:include=a,b]"})
    assert [s.max_prefill_tokens for s in specs] == [32, None]
    assert specs[1].methods == ["plain", "deal:k=2:reward=[keywords:include=a,b]"]
    res = CliRunner().invoke(app, ["serve", "--model", "/no/such", "--max-prefill-tokens", "-1"])
    assert res.exit_code == 2 and "--max-prefill-tokens: must be >= 0" in res.output


def _mod7(prompts, texts):  # a reward that is a known function of the text
    return [float(sum(map(ord, t)) % 7) for t in texts]


def _slow_mod7(prompts, texts):  # the same, slow enough that the engine steps meanwhile
    time.sleep(0.03)
    return _mod7(prompts, texts)


@pytest.mark.parametrize("scorer", ["inline", "thread"])
def test_route_is_served_and_equals_offline(tiny_model_dir, scorer):
    """In process: a routed model (acd-text or plain per request, by a reward on their first
    H tokens) answers chats, completions, n, streams and aborts exactly as offline routing
    does, with other routed requests in the same batch; the reward chose both sides. With the
    reward on a thread of its own (the server's default) a slow reward leaves the answers as
    they are."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from safedecode.methods.rewards import make_reward
    from safedecode.methods.route import Route, Router
    from safedecode.serve import ServedModel, create_app

    model, tok = tiny_llama()
    spec = Route(methods.get("acd-text"), make_reward(_mod7), horizon=3, margin=0.0)
    offline = SafeDecoder(model, tok, spec)
    if scorer == "thread":
        spec = Route(spec.base, make_reward(_slow_mod7), horizon=3, margin=0.0)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=8)
    router = Router(eng, spec, scorer=ThreadPoolExecutor(1) if scorer == "thread" else None)
    app = create_app([ServedModel("tiny:route", eng, {}, router)])
    with TestClient(app) as client:
        def chat(content, **kw):
            return client.post("/v1/chat/completions", json={
                "model": "tiny:route", "messages": [{"role": "user", "content": content}],
                **kw})
        for p in PROMPTS[:3]:
            r = chat(p, max_tokens=6, temperature=0)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == \
                offline.generate(p, max_new_tokens=6)[0].text
        # several routed requests in one batch (one completions request, raw prompts)
        r = client.post("/v1/completions", json={"model": "tiny:route", "prompt": PROMPTS[:4],
                                                 "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        refs = offline.generate(PROMPTS[:4], max_new_tokens=5, raw=True)
        assert [c["text"] for c in r.json()["choices"]] == [x.text for x in refs]
        # n sampled answers: answer c draws with seeds seed + 2c (base), seed + 2c + 1 (plain)
        r = chat(PROMPTS[1], max_tokens=6, temperature=0.9, seed=11, n=2)
        refs = offline.generate([PROMPTS[1]] * 2, max_new_tokens=6, temperature=0.9,
                                seed=[11, 13])
        assert [c["message"]["content"] for c in r.json()["choices"]] == [x.text for x in refs]
        # streamed deltas join to the same text
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny:route", "messages": [{"role": "user", "content": PROMPTS[4]}],
                "max_tokens": 7, "temperature": 0, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == offline.generate(PROMPTS[4], max_new_tokens=7)[0].text
        assert router.decisions["base"] > 0 and router.decisions["plain"] > 0
        calls = [line for line in client.get("/metrics").text.splitlines()
                 if line.startswith('safedecode_reward_call_seconds_count{model="tiny:route"}')]
        assert len(calls) == 1 and float(calls[0].split()[-1]) > 0
        # n counts two sequences per routed answer
        r = chat("Hi", max_tokens=2, n=5)
        assert r.status_code == 400 and "at most 4 choices" in r.json()["error"]["message"]
        assert client.get("/health").json()["models"]["tiny:route"] == {
            "running": 0, "waiting": 0, "free_slots": 8}
        assert router.pending() == 0


@pytest.mark.parametrize("scorer", ["inline", "thread"])
def test_route_served_reward_failure_is_a_500_and_frees_the_slots(tiny_model_dir, scorer):
    """A reward model that raises fails its requests with OpenAI's error shape (500), frees
    both sequences of each, and the engine loop goes on serving (inline or on its thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from safedecode.methods.rewards import make_reward
    from safedecode.methods.route import Route, Router
    from safedecode.serve import ServedModel, create_app

    calls = []

    def flaky(prompts, texts):
        calls.append(len(texts))
        if len(calls) == 1:
            raise RuntimeError("reward model out of memory")
        return _mod7(prompts, texts)

    model, tok = tiny_llama()
    spec = Route(methods.get("acd-text"), make_reward(flaky), horizon=2, margin=0.0)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=4)
    router = Router(eng, spec, scorer=ThreadPoolExecutor(1) if scorer == "thread" else None)
    app = create_app([ServedModel("tiny:route", eng, {}, router)])
    with TestClient(app) as client:
        def chat():
            return client.post("/v1/chat/completions", json={
                "model": "tiny:route", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 5, "temperature": 0})
        r = chat()
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert "reward model out of memory" in err["message"] and err["type"] == "server_error"
        assert client.get("/health").json()["models"]["tiny:route"]["free_slots"] == 4
        r = chat()  # the loop lives on: the next request is answered
        assert r.status_code == 200, r.text
        offline = SafeDecoder(model, tok, Route(spec.base, make_reward(_mod7), horizon=2,
                                                margin=0.0))
        want = offline.generate([{"role": "user", "content": "Hi"}], max_new_tokens=5)[0]
        assert r.json()["choices"][0]["message"]["content"] == want.text
        assert router.pending() == 0 and router.scoring() == 0


def test_route_served_aborts_free_both_sequences(tiny_model_dir):
    """A routed request past --request-timeout (undecided: its two sequences live) gets 408
    and frees both slots."""
    from fastapi.testclient import TestClient

    from safedecode.methods.rewards import make_reward
    from safedecode.methods.route import Route, Router
    from safedecode.serve import ServedModel, ServerConfig, create_app

    model, tok = tiny_llama()
    spec = Route(methods.get("acd-text"), make_reward(_mod7), horizon=300, margin=0.0)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=2)
    step = eng.step

    def slow_step():
        time.sleep(0.01)
        return step()
    eng.step = slow_step
    router = Router(eng, spec)
    app = create_app([ServedModel("tiny:route", eng, {}, router)],
                     ServerConfig(request_timeout=0.3))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "tiny:route", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 400, "ignore_eos": True})
        assert r.status_code == 408
        deadline = time.monotonic() + 10
        while client.get("/health").json()["models"]["tiny:route"]["running"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["models"]["tiny:route"]["free_slots"] == 2
        assert router.pending() == 0


@pytest.mark.parametrize("scorer", ["inline", "thread"])
def test_deal_is_served_and_equals_offline(tiny_model_dir, scorer):
    """In process: DeAL (acd-text candidates, a reward that is a known function of the text)
    answers chats, raw completions (more answers than the engine holds at once: the rest
    queue and start as others end, so answers search at different phases), n seeded choices
    and streams exactly as offline DeAL does, with the reward inline or on a thread of its own
    (a slow one); n counts every sequence an answer holds."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from safedecode.methods.deal import Searcher
    from safedecode.serve import ServedModel, create_app

    model, tok = tiny_llama()
    kw = dict(base="acd-text", k=3, lookahead=2, chunk=2)
    offline = SafeDecoder(model, tok, methods.get("deal", reward=_mod7, **kw))
    spec = methods.get("deal", reward=_slow_mod7 if scorer == "thread" else _mod7, **kw)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=7, drop_rows=False)  # 2 answers at once
    searcher = Searcher(eng, spec, scorer=ThreadPoolExecutor(1) if scorer == "thread" else None)
    app = create_app([ServedModel("tiny:deal", eng, {}, searcher)])
    with TestClient(app) as client:
        def chat(content, **kw):
            return client.post("/v1/chat/completions", json={
                "model": "tiny:deal", "messages": [{"role": "user", "content": content}],
                **kw})
        for p in PROMPTS[:2]:
            r = chat(p, max_tokens=6, temperature=0, logprobs=True)
            assert r.status_code == 200, r.text
            want = offline.generate(p, max_new_tokens=6, return_logprobs=True)[0]
            got = r.json()["choices"][0]
            assert got["message"]["content"] == want.text
            assert [x["logprob"] for x in got["logprobs"]["content"]] == \
                pytest.approx(want.logprobs, abs=1e-6)
        r = client.post("/v1/completions", json={"model": "tiny:deal", "prompt": PROMPTS[:5],
                                                 "max_tokens": 7, "temperature": 0})
        assert r.status_code == 200, r.text
        refs = [offline.generate(p, max_new_tokens=7, raw=True)[0] for p in PROMPTS[:5]]
        assert [c["text"] for c in r.json()["choices"]] == [x.text for x in refs]
        assert [c["finish_reason"] for c in r.json()["choices"]] == \
            [x.finish_reason for x in refs]
        r = chat(PROMPTS[1], max_tokens=6, temperature=0.9, seed=11, n=2)  # seeds 11, 12
        refs = [offline.generate(PROMPTS[1], max_new_tokens=6, temperature=0.9, seed=s)[0]
                for s in (11, 12)]
        assert [c["message"]["content"] for c in r.json()["choices"]] == [x.text for x in refs]
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny:deal", "messages": [{"role": "user", "content": PROMPTS[4]}],
                "max_tokens": 9, "temperature": 0, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == offline.generate(PROMPTS[4], max_new_tokens=9)[0].text
        assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 1
        r = chat("Hi", max_tokens=2, n=3)
        assert r.status_code == 400 and "at most 2 choices" in r.json()["error"]["message"] \
            and "a deal answer holds 3 sequences" in r.json()["error"]["message"]
        assert client.get("/health").json()["models"]["tiny:deal"] == {
            "running": 0, "waiting": 0, "free_slots": 7}
        assert searcher.pending() == 0 and searcher.search_steps > 0
        assert searcher.scoring() == 0
        calls = [line for line in client.get("/metrics").text.splitlines()
                 if line.startswith('safedecode_reward_call_seconds_count{model="tiny:deal"}')]
        assert len(calls) == 1 and float(calls[0].split()[-1]) == searcher.search_steps


@pytest.mark.parametrize("scorer", ["inline", "thread"])
def test_deal_served_failures_free_every_sequence(tiny_model_dir, scorer):
    """A reward that raises fails its requests with a 500 in OpenAI's shape and frees every
    sequence; a request past --request-timeout mid-search gets 408 and frees its slots too;
    the loop serves the next request (the reward inline or on its thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from safedecode.methods.deal import Searcher
    from safedecode.serve import ServedModel, ServerConfig, create_app

    calls = []

    def flaky(prompts, texts):
        calls.append(len(texts))
        if len(calls) == 1:
            raise RuntimeError("reward model out of memory")
        if len(calls) > 3:
            time.sleep(0.02)  # slow enough for the timeout below
        return _mod7(prompts, texts)

    model, tok = tiny_llama()
    spec = methods.get("deal", reward=flaky, base="acd-text", k=2, lookahead=2)
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=4, drop_rows=False)
    pool = ThreadPoolExecutor(1) if scorer == "thread" else None
    app = create_app([ServedModel("tiny:deal", eng, {}, Searcher(eng, spec, scorer=pool))],
                     ServerConfig(request_timeout=0.5))
    with TestClient(app) as client:
        def chat(max_tokens):
            return client.post("/v1/chat/completions", json={
                "model": "tiny:deal", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})

        def health():
            return client.get("/health").json()["models"]["tiny:deal"]
        r = chat(4)
        assert r.status_code == 500, r.text
        assert "reward model out of memory" in r.json()["error"]["message"]
        assert health()["free_slots"] == 4
        r = chat(2)
        assert r.status_code == 200, r.text
        assert chat(400).status_code == 408
        deadline = time.monotonic() + 10
        while health()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health()["free_slots"] == 4


def test_serve_builds_routed_and_deal_models(tiny_model_dir):
    from safedecode.serve import ServeSpec, build_models  # noqa: PLC0415

    (m,) = build_models(ServeSpec(model=str(tiny_model_dir), name="tiny", methods=["route"],
                                  method_kwargs={"base": "acd-text", "horizon": 4,
                                                 "margin": 0.5, "reward": "length:target=8",
                                                 "alpha": None}))
    assert m.router is not None and m.max_choices == m.engine.state.max_seqs // 2
    assert m.router.scorer is not None and m.info["reward_thread"] is True
    assert m.router.spec.horizon == 4 and m.router.spec.margin == 0.5
    assert "horizon=4" in m.info["route"] and m.info["method"] == m.engine.method.name
    (d,) = build_models(ServeSpec(model=str(tiny_model_dir), name="tiny", methods=[
        "deal:k=3:lookahead=2:chunk=2:base=acd-text"], method_kwargs={
        "reward": "length:target=8", "horizon": 6}))  # the CLI's --reward / --horizon
    assert d.id == "tiny:deal" and d.max_choices == d.engine.state.max_seqs // 3
    assert d.router.spec.k == 3 and d.router.spec.horizon == 6 and "k=3" in d.info["deal"]
    assert not d.engine.runner.drop_rows and d.router.scorer is not None
    assert d.info["reward_thread"] is True
    with pytest.raises(ValueError, match="--max-seqs: a deal answer holds up to 12"):
        build_models(ServeSpec(model=str(tiny_model_dir), methods=["deal:k=4:beam=3"],
                               method_kwargs={"reward": "length"}))
    with pytest.raises(ValueError, match="given twice"):
        build_models(ServeSpec(model=str(tiny_model_dir), methods=["deal:k=2", "deal:k=3"],
                               method_kwargs={"reward": "length"}))
    from typer.testing import CliRunner  # noqa: PLC0415

    from safedecode.cli import app  # noqa: PLC0415

    res = CliRunner().invoke(app, ["serve", "--model", "/no/such", "--horizon", "4"])
    assert res.exit_code == 2 and "--horizon: only for --method route or deal" in res.output
    res = CliRunner().invoke(app, ["serve", "--model", "/no/such", "-m", "deal",
                                   "--margin", "1"])
    assert res.exit_code == 2 and "--margin: only for --method route" in res.output
    res = CliRunner().invoke(app, ["serve", "--model", "/no/such", "--reward-inline"])
    assert res.exit_code == 2 and "--reward-thread/--reward-inline: only for --method route" \
        in res.output
    (m,) = build_models(ServeSpec(model=str(tiny_model_dir), methods=["route"],
                                  reward_thread=False,
                                  method_kwargs={"base": "acd-text", "reward": "length"}))
    assert m.router.scorer is None and m.info["reward_thread"] is False
    (m,) = build_models(ServeSpec(model=str(tiny_model_dir), methods=["acd-text"],
                                  prefix_store_mb=3, turn_store_mb=0))
    assert m.engine.runner.prefixes.max_bytes == 3 * 2**20  # --prefix-store-mb reaches it
    assert m.engine.runner.turns.max_bytes == 0  # --turn-store-mb too


def test_serve_merges_an_adapter_into_the_served_model():
    """``--adapter ta-sft``: the embedded model with the shipped TA-SFT adapter merged, named
    in /v1/models' info (the served route's recommended configuration uses it)."""
    from safedecode.serve import ServeSpec, build_models  # noqa: PLC0415

    (m,) = build_models(ServeSpec(methods=["plain"], adapter="ta-sft", max_seqs=1))
    assert m.info["adapter"] == "ta-sft" and "ta_sft" in m.info["base_model"]
    (plain,) = build_models(ServeSpec(methods=["plain"], max_seqs=1))
    assert plain.info["adapter"] is None
    w = dict(m.engine.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    w0 = dict(plain.engine.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(w, w0)  # the LoRA delta is in the weights


def test_served_route_on_the_tuned_model_equals_offline(tmp_path):
    """The configuration the README recommends, served from the CLI (``--adapter ta-sft -m route
    --horizon 8 --margin 0``) and driven by the openai client: greedy chats, streamed too, equal
    offline ``generate`` with the same method and model."""
    from safedecode.models import load_model  # noqa: PLC0415

    srv = LiveServer(["--adapter", "ta-sft", "-m", "route", "--horizon", "8", "--margin", "0",
                      "--max-seqs", "4"], tmp_path)
    try:
        c = srv.client()
        model, tok = load_model("default", adapter="ta-sft")
        dec = SafeDecoder(model, tok, methods.get("route", horizon=8, margin=0))
        for q in ("How do I kill a Python process that hangs?", "Write a haiku about rain."):
            msgs = [{"role": "user", "content": q}]
            ref = dec.generate(msgs, max_new_tokens=20)[0]
            r = c.chat.completions.create(model="smollm2-135m:route", messages=msgs,
                                          max_tokens=20, temperature=0)
            assert r.choices[0].message.content == ref.text
            s = c.chat.completions.create(model="smollm2-135m:route", messages=msgs,
                                          max_tokens=20, temperature=0, stream=True)
            assert "".join(ch.choices[0].delta.content or "" for ch in s) == ref.text
        info = {m.id: m for m in c.models.list().data}["smollm2-135m:route"]
        assert info.safedecode["adapter"] == "ta-sft" and "horizon=8" in info.safedecode["route"]
    finally:
        assert srv.stop() == 0


def test_excluded_tokens_are_a_finite_json_logprob():
    """A token the method's distribution excludes (-inf, possible when scoring a given text)
    is sent as -9999.0: JSON has no -inf."""
    from safedecode.serve.protocol import NEG_INF_LOGPROB, completion_logprobs

    tok = tiny_llama()[1]
    out = completion_logprobs(tok, [5, 6, 7], [None, float("-inf"), -1.5],
                              [None, [(6, float("-inf"))], [(7, -1.5)]])
    assert out["token_logprobs"] == [None, NEG_INF_LOGPROB, -1.5]
    assert out["top_logprobs"][0] is None and list(out["top_logprobs"][1].values()) == \
        [NEG_INF_LOGPROB]
    json.dumps(out, allow_nan=False)  # what the server's JSON encoder requires


def test_a_growing_served_chat_equals_offline_and_prefills_its_new_turn(server):
    """A chat sent turn by turn (each request the chat so far, the last answer and a new
    question): the answers equal a decoder without any prefix cache, and from the second
    turn the server computes only a few prefix columns — the turn before's prompt and
    answer were kept (/health reports the prefix cache)."""
    model, tok = tiny_llama()
    ref = SafeDecoder(model, tok, methods.get("acd-text"), prefix_cache=False)
    c = server.client()
    chat = [{"role": "user", "content": "Name three garden birds, please."}]
    for turn in range(3):
        before = _health(server)["prefix_cache"]["tiny:acd-text"]
        r = c.chat.completions.create(model="tiny:acd-text", messages=chat, max_tokens=6,
                                      temperature=0)
        after = _wait_idle(server)["prefix_cache"]["tiny:acd-text"]
        text = r.choices[0].message.content
        assert text == ref.generate([chat], max_new_tokens=6)[0].text, turn
        if turn:  # both branches' histories: a few columns each, not the whole exchange
            assert 0 < after["computed_tokens"] - before["computed_tokens"] <= 2 * 6, turn
        assert after["turns"] - before["turns"] == 2  # this turn's, one per branch
        chat += [{"role": "assistant", "content": text},
                 {"role": "user", "content": f"And {turn + 2} more?"}]


def test_a_served_chat_goes_on_from_whichever_of_its_choices_it_continues(server):
    """A chat request with ``n`` = 3 sampled choices: each choice's prompt + answer is kept, so
    the chat's next turn — whichever choice the client continued — computes only a few prefix
    columns, not that choice's answer again."""
    c = server.client()
    chat = [{"role": "user", "content": "Name three garden birds, please."}]
    r = c.chat.completions.create(model="tiny:acd-text", messages=chat, max_tokens=6, n=3,
                                  temperature=1.0, seed=0)
    texts = [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) == 3
    # the premise: each choice's text encodes back to its own tokens (a random model's text
    # may not; then only the common start of the two could be shared)
    model, tok = tiny_llama()
    eng = SafeDecoder(model, tok, methods.get("acd-text")).engine(max_seqs=3)
    ids = eng.add_choices(chat, SamplingParams(max_new_tokens=6, temperature=1.0, seed=0), 3)
    while eng.has_unfinished():
        eng.step()
    for i, text in zip(ids, texts, strict=True):
        got = eng.pop_result(i)
        assert got.text == text
        assert tok(text, add_special_tokens=False)["input_ids"] == got.token_ids
    _wait_idle(server)
    for pick in (0, 1, 2):
        before = _health(server)["prefix_cache"]["tiny:acd-text"]
        grown = [*chat, {"role": "assistant", "content": texts[pick]},
                 {"role": "user", "content": "And two more?"}]
        c.chat.completions.create(model="tiny:acd-text", messages=grown, max_tokens=2,
                                  temperature=0)
        after = _wait_idle(server)["prefix_cache"]["tiny:acd-text"]
        assert 0 < after["computed_tokens"] - before["computed_tokens"] <= 2 * 4, pick


def test_served_completions_that_start_alike_share_their_leading_tokens(server):
    """One completions request with three prompts that continue a common text: the answers
    equal a decoder without any prefix cache, and the common text's KV is computed once per
    branch (from the first prompt on), not three times."""
    model, tok = tiny_llama()
    m = methods.get("acd-text")
    context = " ".join(f"Fact {i}: the number {i} doubled is {2 * i}." for i in range(20))
    prompts = [context + f" Question {q}: what is it doubled?" for q in ("one", "two", "three")]
    before = _health(server)["prefix_cache"]["tiny:acd-text"]
    r = server.client().completions.create(model="tiny:acd-text", prompt=prompts, max_tokens=5,
                                           temperature=0)
    after = _wait_idle(server)["prefix_cache"]["tiny:acd-text"]
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    ref = SafeDecoder(model, tok, m, prefix_cache=False)
    assert texts == [g.text for g in ref.generate(prompts, raw=True, max_new_tokens=5)]
    n_context = len(tok(context, add_special_tokens=False)["input_ids"])
    one = SafeDecoder(model, tok, m).builder.build_request(m.branches, prompts[0], 0, raw=True)
    computed = after["computed_tokens"] - before["computed_tokens"]
    assert m.k * (n_context - 2 * 16) <= computed <= sum(len(p) + len(s) for p, s in one)
