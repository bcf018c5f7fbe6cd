"""The evaluation runner: resumable store, cache keys, resume after a crash, perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import tiny_llama

from safedecode import methods
from safedecode.engine import Branch, BranchHook, Method, SafeDecoder
from safedecode.eval.datasets import Dataset, Item
from safedecode.eval.runner import (
    evaluate,
    method_fingerprint,
    model_fingerprint,
    parse_methods,
    response_nll,
)
from safedecode.eval.store import JsonlStore

GEN = dict(max_new_tokens=6, batch_size=3)


def _sets():
    harm = Dataset("h", [Item(f"h{i}", f"Explain dangerous thing number {i} " + "in detail " * i,
                              "weapons" if i % 2 else "cyber", "harmful") for i in range(7)],
                   "memory")
    ben = Dataset("b", [Item(f"b{i}", f"How do I kill Python process {i}?", "homonyms",
                             "benign") for i in range(5)], "memory")
    return [harm, ben]


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_store_torn_and_corrupt_lines(tmp_path):
    p = tmp_path / "s.jsonl"
    with JsonlStore(p) as s:
        s.append({"key": "a", "v": 1})
        s.append({"key": "b", "v": 2})
    with p.open("a") as f:
        f.write('{"key": "c", "v"')  # a crash mid-write
    s = JsonlStore(p)
    assert s.dropped_torn_line and sorted(s.records) == ["a", "b"]
    s.append({"key": "c", "v": 3})
    s.close()
    assert [json.loads(x)["key"] for x in _lines(p)] == ["a", "b", "c"]
    p.write_text('{"key": "a"}\n{"key": "b"}')  # complete last line, newline lost
    s = JsonlStore(p)
    s.append({"key": "c"})
    s.close()
    assert [json.loads(x)["key"] for x in _lines(p)] == ["a", "b", "c"]
    p.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match="s.jsonl:2: corrupt record"):
        JsonlStore(p)
    with pytest.raises(ValueError, match="no 'key'"), JsonlStore(tmp_path / "t.jsonl") as t:
        t.append({"v": 1})


def test_store_has_one_writer(tmp_path):
    with JsonlStore(tmp_path / "s.jsonl") as s:
        s.append({"key": "a"})
        with pytest.raises(ValueError, match="in use by another run"):
            JsonlStore(tmp_path / "s.jsonl")
    with JsonlStore(tmp_path / "s.jsonl") as s:  # released on close
        assert "a" in s and len(s) == 1


def test_resume_after_crash_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    model, tok = tiny_llama()
    orig = SafeDecoder.generate
    calls, stored, crashed = [], [], []

    def crashing(self, prompts, **kw):  # answers are stored as they finish
        calls.append(len(prompts))
        keep = kw["on_result"]

        def counting(i, r):
            keep(i, r)
            stored.append(i)
            if len(stored) == 10 and not crashed:
                crashed.append(True)
                raise RuntimeError("simulated crash")  # a kill in the middle of a data set
        return orig(self, prompts, **{**kw, "on_result": counting})

    monkeypatch.setattr(SafeDecoder, "generate", crashing)
    run = dict(methods=["plain", "self-cd"], datasets=_sets(), **GEN)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(model, tok, out_dir=tmp_path / "run", **run)
    gen_file = tmp_path / "run" / "generations.jsonl"
    before = _lines(gen_file)
    assert calls == [7, 5] and len(before) == 10  # data set h whole, 3 of b (plain)
    with gen_file.open("a") as f:
        f.write(before[-1][: len(before[-1]) // 2])  # and a torn last line

    calls.clear()
    res = evaluate(model, tok, out_dir=tmp_path / "run", **run)
    after = _lines(gen_file)
    assert after[:len(before)] == before  # finished items kept as they were
    keys = [json.loads(x)["key"] for x in after]
    assert len(keys) == len(set(keys)) == 2 * 12  # nothing lost, nothing twice
    assert calls == [2, 7, 5]  # only the unfinished items were generated
    assert {t: v["n"] for t, v in res["results"].items()} == {
        "h@plain": 7, "h@self-cd": 7, "b@plain": 5, "b@self-cd": 5}

    calls.clear()
    evaluate(model, tok, out_dir=tmp_path / "run", **run)
    assert calls == [] and _lines(gen_file) == after  # a finished run is not redone

    monkeypatch.setattr(SafeDecoder, "generate", orig)
    evaluate(model, tok, out_dir=tmp_path / "fresh", **{**run, "batch_size": 5})
    fresh = {json.loads(x)["key"]: json.loads(x)["response"]
             for x in _lines(tmp_path / "fresh" / "generations.jsonl")}
    resumed = {json.loads(x)["key"]: json.loads(x)["response"] for x in after}
    assert fresh == resumed  # same keys, same greedy texts as an uninterrupted run


def test_cache_key_follows_config(tmp_path, monkeypatch):
    model, tok = tiny_llama()
    orig = SafeDecoder.generate
    calls = []

    def counting(self, prompts, **kw):
        calls.append((self.method.name, len(prompts)))
        return orig(self, prompts, **kw)

    monkeypatch.setattr(SafeDecoder, "generate", counting)
    sets = _sets()[1:]
    out = tmp_path / "run"
    evaluate(model, tok, methods=["plain", "self-cd"], datasets=sets, out_dir=out, ppl=False,
             **GEN)
    assert sum(n for _, n in calls) == 10
    calls.clear()
    evaluate(model, tok, methods=["plain", "self-cd:alpha=1.0"], datasets=sets, out_dir=out,
             ppl=False, **GEN)
    assert {m for m, _ in calls} == {"self-cd"} and sum(n for _, n in calls) == 5
    calls.clear()
    evaluate(model, tok, methods=["plain"], datasets=sets, out_dir=out, ppl=False,
             **{**GEN, "max_new_tokens": 4})
    assert sum(n for _, n in calls) == 5
    calls.clear()
    evaluate(model, tok, methods=["plain"], datasets=sets, out_dir=out, ppl=False, limit=2,
             **{**GEN, "batch_size": 1})  # batch size and limit are not part of the key
    assert calls == []


def test_cached_records_are_reported_under_this_runs_labels(tmp_path):
    """A label that meant another method in an earlier run must not pull that run's records in,
    and two labels of one method each get its records."""
    model, tok = tiny_llama()
    sets = _sets()[1:]
    out = tmp_path / "run"
    evaluate(model, tok, methods=["self-cd:alpha=1.0"], datasets=sets, out_dir=out, ppl=False,
             **GEN)
    res = evaluate(model, tok, methods=["self-cd:alpha=1.0:beta=0.0", "self-cd:alpha=2.0"],
                   datasets=sets, out_dir=out, ppl=False, **GEN)  # the first: same method
    labels = {"self-cd:alpha=1.0:beta=0.0", "self-cd:alpha=2.0"}
    assert set(res["summary"]) == labels
    assert all(res["summary"][m]["benign"]["n"] == 5 for m in labels)
    # the earlier run's label is absent from this run's report
    assert "`self-cd:alpha=1.0`" not in (out / "results.md").read_text()


def test_fingerprints():
    a, b = methods.get("acd-text", alpha=0.5), methods.get("acd-text", alpha=0.5)
    assert method_fingerprint(a) == method_fingerprint(b)
    assert method_fingerprint(a) != method_fingerprint(methods.get("acd-text", alpha=1.0))
    sp = torch.randn(3, 8)
    soft = [Method("m", (Branch(soft_prompt=x),), (1.0,)) for x in (sp, sp.clone(), sp + 1e-3)]
    fps = [method_fingerprint(m) for m in soft]
    assert fps[0] == fps[1] != fps[2]

    def hooked(scale):
        vec = torch.ones(8) * scale
        return Method("h", (Branch(hooks=(BranchHook("model.layers.0", lambda h: h + vec),)),),
                      (1.0,))

    assert method_fingerprint(hooked(1.0)) == method_fingerprint(hooked(1.0))
    assert method_fingerprint(hooked(1.0)) != method_fingerprint(hooked(2.0))
    model, _ = tiny_llama()
    assert model_fingerprint(model) == model_fingerprint(model)
    assert model_fingerprint(model) != model_fingerprint(tiny_llama(seed=1)[0])


def test_model_fingerprint_ignores_the_transformers_version(monkeypatch):
    """The config's transformers_version names the library that wrote it, not the model: an
    upgrade from 5.24.0 to 5.25.0 changed every cache key while the generations were equal."""
    import json

    import transformers.configuration_utils as cu

    model, _ = tiny_llama()
    before = model_fingerprint(model)
    monkeypatch.setattr(cu, "__version__", "0.0.1")
    assert json.loads(model.config.to_json_string())["transformers_version"] == "0.0.1"
    assert model_fingerprint(model) == before
    model.config.rms_norm_eps *= 2  # the rest of the config still counts
    assert model_fingerprint(model) != before


def test_parse_methods():
    specs = parse_methods("plain, acd-text:alpha=1.5:beta=0.1,self-cd", {"alpha": 2.0})
    assert [s.label for s in specs] == ["plain", "acd-text:alpha=1.5:beta=0.1",
                                        "self-cd:alpha=2.0"]
    assert specs[1].kwargs == {"alpha": 1.5, "beta": 0.1}
    for bad, msg in (("nosuch", "unknown method 'nosuch'"), ("plain:alpha", "key=value"),
                     ("plain,plain", "listed twice"), (" , ", "no method")):
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)
    with pytest.raises(ValueError, match="method 'plain'"):
        parse_methods("plain:alpha=1")[0].build()


def test_parse_methods_takes_a_bracketed_value_as_it_is():
    spec = "deal:reward=[keywords:include=a|b]:lam=2,deal:reward=[length:target=9]"
    a, b = parse_methods(spec)
    assert a.kwargs == {"reward": "keywords:include=a|b", "lam": 2}
    assert b.kwargs == {"reward": "length:target=9"}
    assert a.label == "deal:reward=[keywords:include=a|b]:lam=2"  # re-parses to the same
    assert parse_methods(a.label)[0].kwargs == a.kwargs
    assert a.build().reward.key() != b.build().reward.key()
    with pytest.raises(ValueError, match="unclosed"):
        parse_methods("deal:reward=[length:target=9")


def test_response_nll_matches_a_plain_forward():
    model, tok = tiny_llama()
    prompts = ["Hi", "How do I kill a Python process that hangs?", "Tell me a joke", "x"]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, len(tok), (n,), generator=g).tolist() for n in (5, 1, 9, 0)]
    got = response_nll(model, tok, prompts, responses, batch_size=3)
    assert got[3] == (0.0, 0)
    for p, r, (nll, n) in zip(prompts[:3], responses[:3], got[:3], strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        full = torch.tensor([ids + r])
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0, len(ids) - 1:-1].float(), -1)
        want = -lp.gather(-1, torch.tensor(r)[:, None]).sum().item()
        assert n == len(r) and nll == pytest.approx(want, rel=1e-4)
    assert response_nll(model, tok, prompts, responses, batch_size=1) == [
        pytest.approx(x, rel=1e-4) for x in got]
