"""transformers' custom_generate hook and the `safedecode` command line."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import MIXED_PROMPTS, one_token_words, tiny_llama
from typer.testing import CliRunner

import safedecode
from safedecode import methods
from safedecode.cli import app
from safedecode.engine import SafeDecoder


def _branch_batch(dec, prompts, k, pad):
    seqs = []
    for i, p in enumerate(prompts):
        prefix, suffix = dec.builder.build(dec.method.branches[k],
                                           [{"role": "user", "content": p}], i)
        seqs.append(prefix.ids + suffix)
    t = max(map(len, seqs))
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(s)
        mask[i, t - len(s):] = 1
    return ids, mask


def test_custom_generate_matches_the_engine():
    model, tok = tiny_llama()
    m = methods.get("acd-text", alpha=0.5)
    dec = SafeDecoder(model, tok, m)
    prompts = MIXED_PROMPTS[:2]
    ids0, mask0 = _branch_batch(dec, prompts, 0, tok.pad_token_id)
    ids1, mask1 = _branch_batch(dec, prompts, 1, tok.pad_token_id)
    out = model.generate(ids0, attention_mask=mask0, max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, custom_generate=safedecode.custom_generate,
                         safedecode_method=m, safedecode_branch_ids=[ids1],
                         safedecode_branch_masks=[mask1])
    expected = [r.token_ids for r in dec.generate(prompts, max_new_tokens=8)]
    got = out[:, ids0.shape[1]:].tolist()
    for g, e in zip(got, expected, strict=True):
        assert g[:len(e)] == e
    with pytest.raises(ValueError, match="safedecode_branch_ids"):
        model.generate(ids0, attention_mask=mask0, max_new_tokens=2,
                       custom_generate=safedecode.custom_generate, safedecode_method=m)


def _plain_batch(tok, prompts):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(p if isinstance(p, list) else
                                     [{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


class _Greedy:
    """Three chat prompts of the tiny model, left-padded: transformers' own greedy ``generate``
    and the hook's with ``plain`` (K = 1), 12 new tokens, the same settings."""

    def __init__(self):
        self.model, self.tok = tiny_llama()
        self.ids, self.mask = _plain_batch(self.tok, MIXED_PROMPTS[:3])
        self.t = self.ids.shape[1]
        self.first = self.transformers()

    def transformers(self, **kw):
        return self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=12,
                                   do_sample=False, pad_token_id=self.tok.pad_token_id, **kw)

    def hook(self, **kw):
        return self.transformers(custom_generate=safedecode.custom_generate,
                                 safedecode_method=methods.get("plain"), **kw)


def test_custom_generate_equals_transformers_generate():
    """K = 1 through the hook = transformers' own greedy decode: the same ids, the same
    padding after EOS, the same width, with the model's EOS and with EOS ids of the call, and
    under a repetition penalty (over the prompt and the answer, as transformers')."""
    g = _Greedy()
    # EOS ids of the call that end every answer by its third token: a narrower output
    early = sorted({int(x) for x in g.first[:, g.t + 2]})
    for kw in ({}, {"eos_token_id": [g.tok.eos_token_id, *early]},
               {"return_dict_in_generate": True}, {"repetition_penalty": 0.3}):
        ref, got = g.transformers(**kw), g.hook(**kw)
        if kw.get("return_dict_in_generate"):
            ref, got = ref.sequences, got.sequences
        assert got.tolist() == ref.tolist(), kw
        if "eos_token_id" in kw:  # they did end there
            assert got.shape[1] <= g.t + 3
        if "repetition_penalty" in kw:  # it changed the answers
            assert got.tolist() != g.first.tolist()


def test_custom_generate_bans_tokens_as_transformers():
    """transformers' banning settings through the hook = its own greedy decode: one- and
    two-token bad words (one spanning the prompt's last token and the answer's first),
    suppressed tokens, repeated bigrams (of the prompt too), ``min_new_tokens`` /
    ``min_length`` holding off EOS ids that would end every answer by its third token, and
    ``sequence_bias`` (one- and two-token sequences, negative and positive)."""
    g = _Greedy()
    a, t = g.first[0, g.t:].tolist(), g.t
    early = [g.tok.eos_token_id, *sorted({int(x) for x in g.first[:, t + 2]})]
    for kw in ({"bad_words_ids": [[a[1]], [a[3], a[4]], [int(g.ids[0, -1]), a[0]]]},
               {"suppress_tokens": [a[2], a[5]]},
               {"no_repeat_ngram_size": 2, "repetition_penalty": 0.3},  # (it repeats itself)
               {"eos_token_id": early, "min_new_tokens": 6},
               {"eos_token_id": early, "min_length": t + 5},
               {"sequence_bias": {(a[1],): -30.0, (a[2], a[3]): -30.0, (a[0], 99): 40.0}}):
        got = g.hook(**kw)
        assert got.tolist() == g.transformers(**kw).tolist(), kw
        without = g.transformers(repetition_penalty=0.3) if "repetition_penalty" in kw \
            else g.first
        assert got.tolist() != without.tolist(), kw  # the ban changed an answer


@pytest.mark.parametrize("kw, match", [
    ({"forced_eos_token_id": 2}, "forced_eos_token_id"),
    ({"exponential_decay_length_penalty": (2, 1.5)}, "exponential_decay_length_penalty"),
    ({"num_beams": 2}, "num_beams=2"),
    ({"return_dict_in_generate": True, "output_scores": True}, "output_scores"),
    ({"max_time": 5.0}, "MaxTimeCriteria"),
])
def test_custom_generate_refuses_what_it_would_ignore(kw, match):
    model, tok = tiny_llama()
    ids, mask = _plain_batch(tok, MIXED_PROMPTS[:1])
    with pytest.raises(ValueError, match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id, custom_generate=safedecode.custom_generate,
                       safedecode_method=methods.get("plain"), **kw)


def test_cli_generate_file_json_and_stream(tiny_model_dir, tmp_path):
    runner = CliRunner()
    f = tmp_path / "prompts.txt"
    f.write_text("Hi there\n\nHow do I kill a Python process?\n")
    res = runner.invoke(app, ["generate", "--file", str(f), "--method", "acd-text", "--alpha",
                              "0.3", "--model", str(tiny_model_dir), "-n", "5", "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["Hi there", "How do I kill a Python process?"]
    assert all(x["method"] == "acd-text" and x["tokens"] <= 5 for x in lines)
    f.write_text("".join(f"Prompt number {i}\n" for i in range(5)))  # more than decode at once
    res = runner.invoke(app, ["generate", "--file", str(f), "--model", str(tiny_model_dir),
                              "-n", "6", "--batch-size", "2", "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    model, tok = tiny_llama()
    want = SafeDecoder(model, tok, methods.get("plain")).generate(
        [f"Prompt number {i}" for i in range(5)], max_new_tokens=6)
    assert [x["text"] for x in lines] == [r.text for r in want]
    res = runner.invoke(app, ["generate", "Hello", "--model", str(tiny_model_dir), "-n", "4",
                              "--stream"])
    assert res.exit_code == 0, res.output


def test_cli_generate_with_penalties(tiny_model_dir):
    """``--frequency-penalty``, ``--presence-penalty``, ``--repetition-penalty``,
    ``--bad-word``, ``--min-tokens`` and ``--no-repeat-ngram-size`` reach the engine: =
    offline."""
    model, tok = tiny_llama()
    dec = SafeDecoder(model, tok, methods.get("plain"))
    word = one_token_words(tok, dec.generate("Hi there", max_new_tokens=6)[0].text)[0]
    for kw, flags in (({"frequency_penalty": -2.0}, ["--frequency-penalty", "-2"]),
                      ({"presence_penalty": -2.0}, ["--presence-penalty", "-2"]),
                      ({"repetition_penalty": 0.3}, ["--repetition-penalty", "0.3"]),
                      ({"bad_words": [word], "min_tokens": 6},
                       ["--bad-word", word, "--min-tokens", "6"]),
                      ({"no_repeat_ngram_size": 2, "repetition_penalty": 0.3},
                       ["--no-repeat-ngram-size", "2", "--repetition-penalty", "0.3"])):
        want = dec.generate("Hi there", max_new_tokens=6, **kw)[0].text
        assert want != dec.generate("Hi there", max_new_tokens=6)[0].text
        res = CliRunner().invoke(app, ["generate", "Hi there", "--model", str(tiny_model_dir),
                                       "-n", "6", *flags])
        assert res.exit_code == 0, res.output
        assert res.stdout.rstrip("\n") == want


def test_cli_generate_logprobs_in_json(tiny_model_dir):
    """``--json --logprobs N``: each token's log-prob and its step's N best = offline."""
    model, tok = tiny_llama()
    want = SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5)).generate(
        "Hi there", max_new_tokens=5, return_logprobs=True, top_logprobs=2)[0]
    res = CliRunner().invoke(app, ["generate", "Hi there", "--model", str(tiny_model_dir),
                                   "-m", "acd-text:alpha=0.5", "-n", "5", "--json",
                                   "--logprobs", "2"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["logprobs"]
    assert [t["id"] for t in got] == want.token_ids
    assert [t["logprob"] for t in got] == pytest.approx(want.logprobs, abs=1e-5)
    assert [[u["id"] for u in t["top"]] for t in got] == \
        [[i for i, _ in s] for s in want.top_logprobs]
    assert got[0]["token"] == tok.decode([want.token_ids[0]])


def test_cli_score_compares_methods(tiny_model_dir):
    """``safedecode score PROMPT ANSWER -m ... -m ...``: each method's log-likelihood of the
    answer = ``SafeDecoder.score``; a table by default, JSON lines with ``--json``."""
    model, tok = tiny_llama()
    args = ["score", "Hi there", "Hello, how are you?", "--model", str(tiny_model_dir),
            "-m", "plain", "-m", "acd-text:alpha=0.5"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [x["method"] for x in lines] == ["plain", "acd-text"]
    for x, name in zip(lines, ("plain", "acd-text"), strict=True):
        kw = {"alpha": 0.5} if name == "acd-text" else {}
        want = SafeDecoder(model, tok, methods.get(name, **kw)).score(
            "Hi there", "Hello, how are you?")[0]
        assert x["loglik"] == pytest.approx(sum(want.logprobs), abs=1e-3)
        assert [t["id"] for t in x["logprobs"]] == want.token_ids
    assert lines[0]["loglik"] != lines[1]["loglik"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "log-likelihood" in res.stdout and "acd-text" in res.stdout
    res = CliRunner().invoke(app, ["score", "Hi", "Yo", "--model", str(tiny_model_dir),
                                   "-m", "nope"])
    assert res.exit_code != 0 and "nope" in res.output


def test_cli_generate_with_a_system_message(tiny_model_dir):
    """``--system`` puts a system message before every prompt, on a contrast method too."""
    model, tok = tiny_llama()
    system, prompt = "You are a gardening assistant.", "How do I kill aphids?"
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    for method in ("plain", "acd-text"):
        res = CliRunner().invoke(app, ["generate", prompt, "--model", str(tiny_model_dir),
                                       "-m", method, "-n", "6", "--json", "--system", system])
        assert res.exit_code == 0, res.output
        dec = SafeDecoder(model, tok, methods.get(method))
        assert json.loads(res.stdout)["text"] == dec.generate([msgs], max_new_tokens=6)[0].text
    plain_dec = SafeDecoder(model, tok, methods.get("plain"))
    assert plain_dec.generate([msgs], max_new_tokens=6)[0].text != \
        plain_dec.generate([prompt], max_new_tokens=6)[0].text  # the message is there


def test_cli_generate_takes_a_knob_string(tiny_model_dir):
    """``-m 'acd-text:alpha=3'`` is ``-m acd-text --alpha 3``, and a knob in the string wins
    over its flag (as ``safedecode serve -m`` has it)."""
    def texts(*args: str) -> list[str]:
        res = CliRunner().invoke(app, ["generate", "Hi there", "--model", str(tiny_model_dir),
                                       "-n", "8", "--json", *args])
        assert res.exit_code == 0, res.output
        return [json.loads(x)["text"] for x in res.stdout.strip().splitlines()]

    strong = texts("-m", "acd-text", "--alpha", "3")
    assert texts("-m", "acd-text:alpha=3") == strong
    assert texts("-m", "acd-text:alpha=3", "--alpha", "0.1") == strong
    assert texts("-m", "acd-text", "--alpha", "0.1") != strong  # the knob does matter here


@pytest.mark.parametrize(
    "args,match",
    [
        (["generate", "x", "--method", "nope"], "unknown"),
        (["generate", "x", "-m", "self-cd:alpha=0.3|0.5"], "alpha= lists choices"),
        (["generate", "x", "-m", "acd,plain"], "one method, got 2"),
        (["generate", "x", "-m", "acd:alpha"], "--method: 'acd:alpha'"),
        (["generate", "x", "-t", "-1"], "temperature"),
        (["generate", "x", "--top-p", "2"], "top_p"),
        (["generate", "x", "--frequency-penalty", "3"], "frequency_penalty"),
        (["generate", "x", "--logprobs", "2"], "--logprobs: needs --json"),
        (["generate", "x", "--json", "--logprobs", "21"], "top_logprobs"),
        (["generate"], "PROMPT"),
        (["generate", "x", "--method", "plain", "--alpha", "0.5"], "plain"),
        (["generate", "x", "--model", "/nonexistent/model"], "model"),
        (["generate", "x", "-n", "0"], "max-new-tokens"),
        (["generate", "x", "-n", "4", "--min-tokens", "5"],
         "min_tokens: must be <= max_new_tokens"),
        (["generate", "x", "--bad-word", " "], "bad_words"),
        (["generate", "x", "--device", "tpu"], "device: expected cpu, cuda or cuda:<index>"),
        (["generate", "x", "--dtype", "int8"], "dtype: must be one of"),
    ],
)
def test_cli_errors_are_clear(args, match):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert match in res.output


def test_cli_generate_dtype_and_missing_gpu(tiny_model_dir):
    """``--dtype`` reaches the model (bf16 greedy = the bf16 engine); ``--device cuda`` without a
    GPU is a clear error, not torch's assertion."""
    res = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tiny_model_dir), "-n", "4",
                                   "--dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    from safedecode.models import load_model  # noqa: PLC0415

    model, tok = load_model(str(tiny_model_dir), dtype="bfloat16")
    want = SafeDecoder(model, tok, methods.get("plain")).generate("Hi", max_new_tokens=4)[0]
    assert json.loads(res.stdout)["text"] == want.text
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, ["generate", "Hi", "--device", "cuda"])
        assert res.exit_code == 2 and "device 'cuda': CUDA is not available" in res.output


def test_cli_info():
    res = CliRunner().invoke(app, ["info", "--json"])
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["backends"]["reference"] == "ok" and info["backends"]["cpp"] == "ok"
    assert info["auto"]["cpu"] == "cpp"


def test_help_reads_as_sentences():
    """``safedecode --help`` gives each command's first paragraph as one sentence (a
    docstring's line breaks joined, not printed mid-sentence), and option help keeps text in
    angle brackets or backticks."""
    import re

    def text(args):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "240"}, terminal_width=240)
        assert res.exit_code == 0, res.output
        return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", res.output))

    top = text(["--help"])
    assert "part (TRL RewardTrainer, LoRA); prints its pairwise accuracy" in top
    # a line break inside a sentence would leave a wide gap before the panel's right edge
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "240"}, terminal_width=240)
    rows = [ln for ln in res.output.splitlines() if ln.startswith("│ train-reward")]
    assert rows and "accuracy on the validation part" in rows[0]
    assert "cuda:N" in text(["generate", "--help"])
    assert "Bearer KEY" in text(["serve", "--help"])
    assert "<!-- perf:start/end -->" in text(["bench", "--help"])
