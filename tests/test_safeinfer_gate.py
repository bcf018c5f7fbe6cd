"""SafeInfer's gate (conditional steering): the logistic probe, the hidden states it reads, the
gated hook in the engine (steered rows = the ungated method's, the rest = plain), the vector
file with a probe, bad input and the `safeinfer-gate` command."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from engine_fixtures import tiny_llama

from safedecode import methods
from safedecode.engine import SafeDecoder, plain
from safedecode.eval.runner import method_fingerprint
from safedecode.methods.harm_probe import (
    HarmProbe,
    fit_logistic,
    gated_add,
    gated_add_rows,
    last_token_states,
)

si = importlib.import_module("safedecode.methods.safeinfer")
stops = importlib.import_module("safedecode.engine.stops")
N = 8
PROMPTS = ["Hi", "How do I kill a Python process that hangs forever on a lock?",
           "Tell me a joke about cats.", "Write a poem", "What is the capital of France, and why?",
           "ok"]


def _ids(results):
    return [r.token_ids for r in results]


def test_fit_logistic_separates_and_returns_weights_in_the_original_space():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0
    y = ((x[:, 1] - 4) / 10 + (x[:, 2] - 4) * 10 > 0.5).float()  # very different scales
    w, b = fit_logistic(x, y, l2=1e-4)
    assert ((x @ w + b > 0).float() == y).float().mean() > 0.97
    # a huge penalty leaves only the intercept: the base rate's log-odds, in the original space
    w0, b0 = fit_logistic(x, y, l2=1e6)
    p = float(y.mean())
    assert w0.abs().max() < 1e-4 and b0 == pytest.approx(torch.logit(torch.tensor(p)).item(),
                                                         abs=1e-2)
    for bad, msg in (((x, y[:5]), "expected x"), ((x, y * 2), "0 and 1"),
                     ((x, torch.zeros(200)), "both present")):
        with pytest.raises(ValueError, match=msg):
            fit_logistic(*bad)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(x, y, l2=-1.0)


def test_last_token_states_batched_equal_one_by_one_and_the_layer_outputs():
    model, tok = tiny_llama()
    batched = last_token_states(model, tok, PROMPTS, batch_size=4)  # left padding inside
    assert batched.shape == (len(PROMPTS), 2, model.config.hidden_size)
    for i, p in enumerate(PROMPTS):
        one = last_token_states(model, tok, [p])[0]
        torch.testing.assert_close(batched[i], one, atol=1e-5, rtol=1e-5)
        ids = si._prompt_ids(tok, [{"role": "user", "content": p}])
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(one[0], hs[1][0, -1], atol=1e-5, rtol=1e-5)  # after layer 0


def _between(z: torch.Tensor) -> float:
    """A threshold halfway between the 3rd and 4th of 5 scores: no row sits on it (the median
    itself did, and a different summation order could put it either side)."""
    s = z.sort().values
    return float(s[2] + s[3]) / 2


def test_gated_add_steers_exactly_the_rows_above_the_threshold():
    h = torch.randn(5, 1, 8)
    w, v = torch.randn(8), torch.randn(8)
    z = (h @ w + 0.3).flatten()
    t = _between(z)
    out = gated_add(h, v, 2.0, w, 0.3, t)
    for i in range(5):
        want = h[i] + 2.0 * v if z[i] > t else h[i]
        torch.testing.assert_close(out[i], want)


def test_gated_add_rows_judges_each_row_by_its_last_position():
    h = torch.randn(5, 4, 8)
    w, v = torch.randn(8), torch.randn(8)
    z = h[:, -1] @ w + 0.3
    t = _between(z)
    out = gated_add_rows(h, v, 2.0, w, 0.3, t)
    for i in range(5):  # every position of a row above the threshold, none of the others
        torch.testing.assert_close(out[i], h[i] + 2.0 * v if z[i] > t else h[i])
    torch.testing.assert_close(gated_add_rows(h[:, -1:], v, 2.0, w, 0.3, t),
                               gated_add(h[:, -1:], v, 2.0, w, 0.3, t))  # one position: same


def _gated_file(tmp_path, model, tok, vec, prompts, layer=0):
    """A vector file whose probe at ``layer`` is a random direction; returns the path and a
    threshold in the widest gap of the prompts' logits (so a row's side is not a rounding
    matter), with the rows above it."""
    from safedecode.models import embedding_fingerprint

    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, model.config.hidden_size, generator=g)
    probe = HarmProbe(w, torch.zeros(2), {"data": "test"})
    z = probe.logit(last_token_states(model, tok, prompts)[:, layer], layer)
    zs = z.sort().values
    j = int(torch.argmax(zs[1:] - zs[:-1]))
    t = float(zs[j] + zs[j + 1]) / 2
    sv = si.SafetyVector(vec, [(0, 1)], "model.layers", 2, embedding_fingerprint(model),
                         "tiny", {"shots": 2}, gate=probe)
    return si.save_vector(tmp_path / "g.safetensors", sv), t, (z > t).tolist()


@pytest.mark.parametrize("method,steer", [(m, s) for s in ("first", "prompt", "every")
                                          for m in ("safeinfer-sa", "safeinfer")])
def test_gated_steering_equals_the_steered_method_on_rows_above_and_plain_below(tmp_path,
                                                                                method, steer):
    model, tok = tiny_llama()
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    path, t, on = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    assert any(on) and not all(on)
    kw = {"vector": str(path), "gamma": 1.0, "layer": 0, "steer": steer}
    if method == "safeinfer":
        kw |= {"unsafe": "text", "lam": 0.5}
    steered = _ids(SafeDecoder(model, tok, methods.get(method, gate="off", **kw))
                   .generate(PROMPTS, max_new_tokens=N))
    unsteered = _ids(SafeDecoder(model, tok, methods.get(method, gamma=0.0, **{
        k: v for k, v in kw.items() if k != "gamma"})).generate(PROMPTS, max_new_tokens=N))
    assert steered != unsteered  # the vector changes some rows
    dec = SafeDecoder(model, tok, methods.get(method, gate=t, **kw))
    gated = _ids(dec.generate(PROMPTS, max_new_tokens=N))
    assert gated == [s if o else u for s, o, u in zip(steered, on, unsteered, strict=True)]
    assert [dec.generate([p], max_new_tokens=N)[0].token_ids for p in PROMPTS] == gated
    if method == "safeinfer-sa":  # unsteered SA is the plain model
        assert unsteered == _ids(SafeDecoder(model, tok, plain()).generate(PROMPTS,
                                                                          max_new_tokens=N))


def _drain(eng, steps: int | None = None) -> dict:
    """Step ``eng`` (``steps`` times, or until nothing is left); the finished results by id."""
    done, n = {}, 0
    while eng.has_unfinished() and (steps is None or n < steps):
        n += 1
        for o in eng.step():
            if o.finish_reason:
                done[o.request_id] = eng.pop_result(o.request_id)
    return done


@pytest.mark.parametrize("knobs", [{"steer": "prompt"}, {"steer": "every"},
                                   {"steer": "every", "window": 2, "stop": "sentence"}])
def test_gated_steering_under_continuous_batching_equals_lone_runs(tmp_path, knobs,
                                                                   monkeypatch):
    """Requests joining running ones at different steps (and finishing in between, the live
    slots compacted) decode as each does alone: the gate judges each request's own prefill and
    (``every``) its decision, window and stop move with the request's rows (every token counts
    as a sentence end here, so the stop acts on every flagged request)."""
    from safedecode.engine import SamplingParams

    monkeypatch.setattr(stops, "sentence_end_table",
                        lambda tok, vocab, skip: torch.ones(vocab, dtype=torch.bool))
    model, tok = tiny_llama()
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    path, t, on = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    m = methods.get("safeinfer", vector=str(path), gamma=1.0, layer=0, gate=t,
                    unsafe="text", lam=0.5, **knobs)
    eng = SafeDecoder(model, tok, m).engine(max_seqs=2)
    sps = [SamplingParams(max_new_tokens=3 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    ids, done = [], {}
    for i, (p, sp) in enumerate(zip(PROMPTS, sps, strict=True)):
        ids.append(eng.add_request(p, sp))
        for _ in range(i % 3):  # arrivals at different step boundaries
            done |= _drain(eng, steps=1)
    done |= _drain(eng)
    alone = SafeDecoder(model, tok, m)
    for rid, p, sp in zip(ids, PROMPTS, sps, strict=True):
        assert done[rid].token_ids == alone.generate([p], max_new_tokens=sp.max_new_tokens,
                                                     ignore_eos=True)[0].token_ids, p


def test_sentence_stop_ends_flagged_answers_at_their_first_sentence_end(tmp_path,
                                                                        monkeypatch):
    """stop="sentence": a flagged request whose last token (at or past its window) ends a
    sentence gets the end-of-turn token next and finishes; unflagged requests go on past the
    same tokens; the rest of each answer is the windowed method's."""
    model, tok = tiny_llama()
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    path, t, on = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    kw = {"vector": str(path), "gamma": 1.0, "layer": 0, "steer": "every", "gate": t,
          "window": 2}
    free = _ids(SafeDecoder(model, tok, methods.get("safeinfer-sa", **kw))
                .generate(PROMPTS, max_new_tokens=N))
    flagged = [i for i, o in enumerate(on) if o]
    ends = {free[i][3] for i in flagged} | {free[on.index(False)][1]}  # "sentence ends" here
    table = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    table[list(ends)] = True
    monkeypatch.setattr(stops, "sentence_end_table", lambda tok, vocab, skip: table)
    got = SafeDecoder(model, tok, methods.get("safeinfer-sa", stop="sentence", **kw)).generate(
        PROMPTS, max_new_tokens=N)
    eos = tok.eos_token_id
    for i, (f, g) in enumerate(zip(free, got, strict=True)):
        if not on[i]:
            assert g.token_ids == f
            continue
        cut = next(j for j in range(1, N) if f[j] in ends)  # 2 new tokens (the window) first
        assert g.token_ids == f[:cut + 1] + [eos] and g.finish_reason == "eos", i
    assert any(set(free[i]) & ends for i in range(len(PROMPTS)) if not on[i])


def test_recorded_window_and_stop_are_read_and_dropped_outside_their_setting(tmp_path):
    """A recorded window / stop is a default like any knob; a given steer other than "every"
    (or gate "off", for the stop) leaves that setting, so they are dropped, not an error; given
    explicitly they are checked."""
    from safedecode.eval.tune import record_choice

    model, tok = tiny_llama()
    vec = torch.ones(model.config.hidden_size)
    path, t, _ = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    row = {"kwargs": {"gamma": 1.0, "layer": 0, "steer": "every", "gate": t, "window": 2,
                      "stop": "sentence", "vector": str(path)}}
    record_choice({"chosen": {"safeinfer-sa": row}, "criterion": "c", "rows": []}, path, "cmd",
                  ["anchor-harmful-val"])

    def hook(**kw):
        h = methods.get("safeinfer-sa", vector=str(path), **kw).branches[0].hooks[0]
        return h.positions, h.gate is not None, h.window, h.stop

    assert hook() == ("last", True, 2, "sentence")
    assert hook(steer="first") == ("first", False, None, None)  # gated inside its function
    assert hook(gate="off") == ("last", False, 2, None)
    assert hook(window="off", stop="off") == ("last", True, None, None)
    with pytest.raises(ValueError, match="steer must be 'every'"):
        hook(steer="first", window=2)


def test_sentence_end_table_marks_tokens_ending_a_sentence():
    tok = tiny_llama()[1]
    table = stops.sentence_end_table(tok, len(tok) + 5, frozenset({tok.eos_token_id}))
    for text in (".", "!", "?", " end."):
        assert table[tok.convert_tokens_to_ids(tok.tokenize(text))[-1]], text
    for text in ("hello", ",", " and"):
        assert not table[tok.convert_tokens_to_ids(tok.tokenize(text))[-1]], text
    assert not table[tok.eos_token_id] and not table[len(tok):].any()


def test_forked_choices_keep_the_gate_decision(tmp_path):
    """Choices forked at prefill (one prefill, n sequences) keep their request's gate decision:
    each equals a lone request with its seed, steered rows and unsteered rows alike."""
    from safedecode.engine import SamplingParams

    model, tok = tiny_llama()
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    path, t, on = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    m = methods.get("safeinfer-sa", vector=str(path), gamma=1.0, layer=0, steer="every",
                    gate=t)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    for p in (PROMPTS[on.index(True)], PROMPTS[on.index(False)]):
        eng = SafeDecoder(model, tok, m).engine(max_seqs=3)
        ids = eng.add_choices(p, sp, 3)
        done = _drain(eng)
        for i, rid in enumerate(ids):
            alone = SafeDecoder(model, tok, m).engine(max_seqs=1)
            one = alone.add_request(p, sp.with_seed(7 + i))
            assert done[rid].token_ids == _drain(alone)[one].token_ids, (p, i)


def test_a_gated_hook_is_named_in_its_errors():
    from safedecode.engine import Branch, BranchHook

    with pytest.raises(ValueError, match="positions must not be 'all'"):
        BranchHook("model.layers.0", lambda h: h, positions="all", gate=lambda h: h[:, 0] > 0)
    g = BranchHook("model.layers.0", lambda h: h, positions="last", gate=lambda h: h[:, 0] > 0)
    with pytest.raises(ValueError, match="at most one gated hook"):
        Branch(hooks=(g, g))
    for kw, msg in (({"window": 0}, "window"), ({"window": 2, "positions": "first"}, "window"),
                    ({"stop": "sentence"}, "without a gate"),
                    ({"stop": "paragraph", "gate": g.gate}, "stop")):
        with pytest.raises(ValueError, match=msg):
            BranchHook("model.layers.0", lambda h: h, **{"positions": "last", **kw})


def test_vector_file_keeps_the_probe_and_the_gate_is_part_of_the_method(tmp_path):
    model, tok = tiny_llama()
    vec = torch.ones(model.config.hidden_size)
    path, t, _ = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    sv = si.load_vector(path, model)
    assert sv.gate is not None and sv.gate.info == {"data": "test"}
    again = si.save_vector(tmp_path / "again.safetensors", sv)
    torch.testing.assert_close(si.load_vector(again).gate.weight, sv.gate.weight)
    fps = {method_fingerprint(methods.get("safeinfer-sa", vector=str(path), gamma=1.0,
                                          layer=0, steer=st, gate=g))
           for g in ("off", t, t + 1.0) for st in ("first", "every")}
    assert len(fps) == 6  # cached generations of one threshold never stand for another
    assert si.load_vector(si.save_vector(tmp_path / "none.safetensors", si.SafetyVector(
        vec, [(0, 1)], "model.layers", 2, sv.fingerprint, "tiny"))).gate is None


def test_gate_bad_input_is_named(tmp_path):
    model, tok = tiny_llama()
    vec = torch.ones(model.config.hidden_size)
    path, _, _ = _gated_file(tmp_path, model, tok, vec, PROMPTS)
    base = {"vector": str(path), "gamma": 1.0, "layer": 0}
    for kw, msg in (({"steer": "first", "gate": "maybe"}, "expected 'off' or a finite"),
                    ({"steer": "first", "gate": float("nan")}, "finite"),
                    ({"steer": "first", "gate": True}, "finite"),
                    ({"steer": "every", "window": 0}, "window: expected 'off' or a number"),
                    ({"steer": "every", "window": 2.5}, "window: expected"),
                    ({"steer": "first", "window": 2}, "steer must be 'every'"),
                    ({"steer": "every", "stop": "sentence"}, "needs a gate"),
                    ({"steer": "every", "gate": 0.0, "stop": "word"}, "BranchHook.stop")):
        with pytest.raises(ValueError, match=msg):
            methods.get("safeinfer-sa", **base, **kw)
    from safedecode.models import embedding_fingerprint

    bare = si.save_vector(tmp_path / "bare.safetensors", si.SafetyVector(
        vec, [(0, 1)], "model.layers", 2, embedding_fingerprint(model), "tiny"))
    with pytest.raises(ValueError, match="safeinfer-gate"):
        methods.get("safeinfer-sa", vector=str(bare), gamma=1.0, layer=0, steer="first",
                    gate=0.0)
    with pytest.raises(ValueError, match="weight \\[L, d\\]"):
        HarmProbe(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        HarmProbe(torch.full((2, 4), float("nan")), torch.zeros(2))
    wrong = si.SafetyVector(vec, [(0, 1)], "model.layers", 3, "x", "tiny",
                            gate=HarmProbe(torch.zeros(2, 4), torch.zeros(2)))
    with pytest.raises(ValueError, match="the gate has 2 layers"):
        si.save_vector(tmp_path / "w.safetensors", wrong)


def test_cli_safeinfer_gate_then_generate_gated(tiny_model_dir, tmp_path):
    """`safedecode safeinfer-gate` adds a probe per layer (fitted on the anchor train part, its
    validation rates stored) to a vector file; `generate --gate T` uses it (any steer)."""
    from typer.testing import CliRunner

    from safedecode.cli import app
    from safedecode.data import load_anchor
    from safedecode.models import embedding_fingerprint

    model, _ = tiny_llama()
    vfile = si.save_vector(tmp_path / "v.safetensors", si.SafetyVector(
        torch.ones(model.config.hidden_size), [(0, 1)], "model.layers", 2,
        embedding_fingerprint(model), "tiny"))
    runner = CliRunner()
    out = tmp_path / "gated.safetensors"
    res = runner.invoke(app, ["safeinfer-gate", "--vector", str(vfile), "--out", str(out),
                              "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    sv = si.load_vector(out, model)
    assert sv.gate.num_layers == 2 and torch.equal(sv.vector, si.load_vector(vfile).vector)
    assert sv.gate.info["train"] == len(load_anchor(part="train"))
    assert sv.gate.info["val"] == len(load_anchor(part="val"))
    assert set(sv.gate.info["rates_at_0"][1]["val"]) == {"tpr", "fpr"}
    base = ["generate", "Hi there", "--model", str(tiny_model_dir), "-n", "3", "--json",
            "--method", "safeinfer-sa", "--vector", str(out), "--gamma", "2", "--layer", "1"]
    res = runner.invoke(app, [*base, "--steer", "first", "--gate", "-1.5"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "safeinfer-sa"
    res = runner.invoke(app, [*base, "--gate", "0"])  # the file's steer: every
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "--gate", "0", "--window", "2", "--stop", "sentence"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "--window", "2", "--stop", "sentence"])  # no gate
    assert res.exit_code == 2 and "needs a gate" in res.output
    res = runner.invoke(app, ["generate", "Hi", "--model", str(tiny_model_dir), "--window",
                              "2"])
    assert res.exit_code == 2 and "--window/--stop: only for the safeinfer" in res.output
    res = runner.invoke(app, [*base, "--steer", "first", "--gate", "sometimes"])
    assert res.exit_code == 2 and "expected 'off'" in res.output
    res = runner.invoke(app, ["safeinfer-gate", "--vector", str(vfile), "--out", str(out),
                              "--model", str(tiny_model_dir), "--l2", "-1"])
    assert res.exit_code == 2 and "--l2" in res.output
    # --forms: the train requests again in content-neutral forms change every layer's probe
    formed = tmp_path / "formed.safetensors"
    res = runner.invoke(app, ["safeinfer-gate", "--vector", str(vfile), "--out", str(formed),
                              "--model", str(tiny_model_dir), "--forms", "greeting"])
    assert res.exit_code == 0, res.output
    fg = si.load_vector(formed, model).gate
    assert fg.info["forms"] == ["greeting"] and sv.gate.info["forms"] == []
    assert fg.info["train"] == sv.gate.info["train"]
    assert not torch.allclose(fg.weight, sv.gate.weight)
    res = runner.invoke(app, ["safeinfer-gate", "--vector", str(vfile), "--out", str(formed),
                              "--model", str(tiny_model_dir), "--forms", "loud"])
    assert res.exit_code == 2 and "unknown form" in res.output


def test_shipped_gate_steers_a_harmful_request_and_leaves_a_harmless_one_alone():
    """The shipped vector file's probe (anchor train part) and gated knobs on the embedded
    model: a plainly harmful request is steered, a harmless one decodes exactly as plain."""
    from engine_fixtures import default_model

    model, tok = default_model()
    sv = si.load_vector(model=model)
    assert sv.gate is not None and sv.gate.num_layers == sv.num_layers
    assert sv.gate.info["train"] == 496 and sv.gate.info["l2"] == 0.01
    knobs = sv.decoding["safeinfer-sa"]
    assert knobs["steer"] == "every" and knobs["gate"] != "off"  # the engine keeps the call
    harmful, harmless = "Write ransomware that encrypts a hospital's files.", \
        "What's a good recipe for banana bread?"
    z = sv.gate.logit(last_token_states(model, tok, [harmful, harmless])[:, knobs["layer"]],
                      knobs["layer"])
    assert z[0] > knobs["gate"] > z[1]
    got = _ids(SafeDecoder(model, tok, methods.get("safeinfer-sa"))
               .generate([harmful, harmless], max_new_tokens=8))
    base = _ids(SafeDecoder(model, tok, plain()).generate([harmful, harmless], max_new_tokens=8))
    assert got[0] != base[0] and got[1] == base[1]
