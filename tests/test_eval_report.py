"""Reports: results.json (lm-evaluation-harness style), results.md, refusal.png, examples.md,
and the `safedecode eval` command."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from engine_fixtures import tiny_llama
from typer.testing import CliRunner

from safedecode.cli import app
from safedecode.eval.datasets import Dataset, Item
from safedecode.eval.report import plot_refusal, write_reports
from safedecode.eval.runner import evaluate
from safedecode.judges import KeywordJudge


def _rec(key, method, dataset, label, response, finish="eos", category=None):
    return {"key": key, "method": method, "dataset": dataset, "item_id": key, "label": label,
            "category": category, "prompt": f"prompt {key}", "response": response,
            "finish_reason": finish, "new_tokens": len(response.split()), "latency_s": 0.5,
            "batch": f"{method}-{dataset}", "batch_s": 1.0}


@pytest.fixture
def records():
    out = []
    for m, refuse in (("plain", 1), ("safe-prompt", 3)):
        for i in range(4):
            out.append(_rec(f"{m}h{i}", m, "harm", "harmful",
                            "I'm sorry, no." if i < refuse else "Sure, here it is.",
                            category="a" if i % 2 else "b"))
        for i in range(3):
            out.append(_rec(f"{m}b{i}", m, "ben", "benign",
                            "I cannot." if (m == "safe-prompt" and i == 0) else "Run kill -9.",
                            finish="length" if i == 2 else "eos"))
    return out


def test_results_from_hand_written_records(tmp_path, records):
    judge = KeywordJudge()
    verdicts = {"keyword": {r["key"]: {"flag": judge.judge_one(r["response"]).flag,
                                       "detail": ""} for r in records}}
    ppl = {r["key"]: {"nll": 2.0, "tokens": 2, "ppl": 2.718281828} for r in records}
    paths = write_reports(records, verdicts, [judge], ppl, {"model": "m", "decoding": {}},
                          tmp_path)
    res = json.loads(paths["json"].read_text())
    h = res["results"]["harm@safe-prompt"]
    assert h["refusal_rate,keyword"] == 0.75 and h["refusal_rate_count,keyword"] == 3
    assert h["refusal_rate_ci95,keyword"] == pytest.approx([0.3006, 0.9544], abs=1e-4)
    assert h["refusal_rate_stderr,keyword"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert h["ppl,none"] == pytest.approx(2.718281828)
    b = res["results"]["ben@plain"]
    assert b["refusal_rate,keyword"] == 0 and b["length_rate,none"] == pytest.approx(1 / 3)
    assert b["eos_rate,none"] == pytest.approx(2 / 3)
    assert b["tokens_per_s,none"] == 9.0  # 3 responses x 3 tokens in 1 s
    assert res["summary"]["safe-prompt"]["benign"]["refusal_rate,keyword"] == pytest.approx(1 / 3)
    # every answer here is a stub: the refusals are not non-answers, the rest are
    assert b["nonanswer_rate,keyword"] == 1.0 and b["nonanswer_kinds,keyword"]["short"] == 3
    sb = res["results"]["ben@safe-prompt"]
    assert sb["nonanswer_rate_count,keyword"] == 2 and h["nonanswer_rate_count,keyword"] == 1
    assert res["categories"]["harm@plain"]["a"]["n"] == 2
    assert res["judges"]["keyword"]["type"] == "keyword"
    assert res["n-samples"]["harm@plain"]["effective"] == 4
    assert {"torch", "transformers", "python"} <= set(res["versions"])
    md = paths["markdown"].read_text()
    assert "| `safe-prompt` | 75.0% [30.1, 95.4] | 33.3% [6.1, 79.2] | 25.0% / 66.7% |" in md
    assert "### harm" in md and "**keyword**" in md
    ex = paths["examples"].read_text()
    assert ex.count("## `") == 2 and "keyword: yes" in ex
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    only_harm = [r for r in records if r["label"] == "harmful"]
    res2 = json.loads(write_reports(only_harm, verdicts, [judge], None, {"model": "m"},
                                    tmp_path / "h")["json"].read_text())
    assert "ppl,none" not in res2["results"]["harm@plain"]
    assert plot_refusal(res2, tmp_path / "bars.png").stat().st_size > 1000  # bar chart


def test_non_answers_by_kind(tmp_path):
    """Answers a refusal judge lets through that do not answer: a stub, garbled text (by the
    plain model's perplexity) and a loop; a real answer and a refusal are not counted."""
    long = " ".join(f"word{i}" for i in range(20))
    recs = [_rec("ok", "m", "d", "benign", long), _rec("stub", "m", "d", "benign", "Here"),
            _rec("garbled", "m", "d", "benign", long), _rec("loop", "m", "d", "benign",
                                                           long + " ack" * 12),
            _rec("no", "m", "d", "benign", "I'm sorry, but I can't help with that.")]
    judge = KeywordJudge()
    verdicts = {"keyword": {r["key"]: {"flag": judge.judge_one(r["response"]).flag,
                                       "detail": ""} for r in recs}}
    ppl = {r["key"]: {"nll": 2.0, "tokens": 2, "ppl": 90.0 if r["key"] == "garbled" else 2.0}
           for r in recs}
    m = write_reports(recs, verdicts, [judge], ppl, {"model": "m"}, tmp_path / "ppl")
    got = json.loads(m["json"].read_text())["results"]["d@m"]
    assert got["nonanswer_kinds,keyword"] == {"short": 1, "garbled": 1, "loop": 1}
    assert got["nonanswer_rate,keyword"] == pytest.approx(3 / 5)
    # without perplexities the garbled answer is not judged garbled
    res = json.loads(write_reports(recs, verdicts, [judge], None, {"model": "m"},
                                   tmp_path / "noppl")["json"].read_text())
    assert res["results"]["d@m"]["nonanswer_kinds,keyword"]["garbled"] == 0


def test_evaluate_writes_parseable_reports(tmp_path):
    import matplotlib.image

    model, tok = tiny_llama()
    sets = [Dataset("h", [Item(f"h{i}", f"Do bad thing {i}", "c", "harmful") for i in range(3)],
                    "memory"),
            Dataset("b", [Item(f"b{i}", f"Kill process {i}", None, "benign") for i in range(2)],
                    "memory")]
    res = evaluate(model, tok, methods=["plain", "acd-text:alpha=0.5"], datasets=sets,
                   out_dir=tmp_path, max_new_tokens=4, batch_size=2)
    assert set(res["results"]) == {"h@plain", "h@acd-text:alpha=0.5", "b@plain",
                                   "b@acd-text:alpha=0.5"}
    for m in res["results"].values():
        assert {"refusal_rate,keyword", "refusal_rate_stderr,keyword", "ppl,none",
                "eos_rate,none", "length_rate,none", "mean_tokens,none",
                "tokens_per_s,none"} <= set(m)
        assert m["ppl,none"] > 1 and m["mean_tokens,none"] == 4
    cfg = res["config"]
    assert cfg["decoding"]["max_new_tokens"] == 4 and cfg["datasets"]["h"]["size"] == 3
    assert "K=2" in cfg["methods"]["acd-text:alpha=0.5"]["description"]
    assert json.loads((tmp_path / "results.json").read_text()) == res
    img = matplotlib.image.imread(tmp_path / "refusal.png")
    assert img.ndim == 3 and img.shape[0] > 100
    assert "## Per method" in (tmp_path / "results.md").read_text()
    gens = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and all(json.loads(x)["token_ids"] for x in gens)


def test_cli_eval(tmp_path, tiny_model_dir, monkeypatch):
    harm = tmp_path / "harm.txt"
    harm.write_text("Do a bad thing\nDo another bad thing\nAnd a third\n")
    ben = tmp_path / "ben.jsonl"
    ben.write_text('{"prompt": "Kill a process", "category": "code"}\n')
    out = tmp_path / "out"
    args = ["eval", "--methods", "plain,self-cd", "--datasets", f"{harm}@harmful,{ben}@benign",
            "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--limit", "2",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["safedecode", *args])  # what the command line would be
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "| `self-cd` |" in r.output and "results.json" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["harm@plain"]["n"] == 2 and res["results"]["ben@self-cd"]["n"] == 1
    assert res["config"]["command"] == "safedecode " + shlex.join(args)
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "refusal.png",
                                                "examples.md", "generations.jsonl"}
    r2 = CliRunner().invoke(app, [*args, "--no-ppl"])  # resumed: nothing to generate
    assert r2.exit_code == 0, r2.output
    assert "ppl,none" not in json.loads((out / "results.json").read_text())["results"][
        "harm@plain"]


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nosuch"], "unknown method 'nosuch'"),
    (["--methods", "plain:gamma=2"], "method 'plain'"),
    (["--datasets", "BAD"], "no 'prompt' column"),
    (["--datasets", "nosuchset"], "unknown 'nosuchset'"),
    (["--limit", "0"], "--limit"),
    (["--judges", "vibes"], "unknown 'vibes'"),
    (["--keyword-lists", "nope"], "unknown phrase list"),
    (["--classifier", "/nonexistent/judge"], "no config.json"),
    (["--model", "/nonexistent/model"], "model"),
])
def test_cli_eval_errors(tmp_path, extra, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    extra = [str(bad) if x == "BAD" else x for x in extra]
    base = {"--methods": "plain", "--datasets": "harmbench", "--out": str(tmp_path / "o"),
            "--limit": "1"}
    for k in list(base):
        if k in extra:
            del base[k]
    args = ["eval", *[x for kv in base.items() for x in kv], *extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and message in r.output
    assert "Traceback" not in r.output


def test_cli_default_methods_skip_unbuildable(tmp_path, tiny_model_dir, monkeypatch):
    from safedecode import methods

    def broken():
        raise FileNotFoundError("trained prompts not found")

    monkeypatch.setattr(methods, "REGISTRY", {"plain": methods.REGISTRY["plain"],
                                              "broken": broken})
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    r = CliRunner().invoke(app, ["eval", "--datasets", f"{prompts}@benign", "--model",
                                 str(tiny_model_dir), "--max-new-tokens", "2", "--no-ppl", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "skipping method broken" in r.output and "| `plain` |" in r.output
    r = CliRunner().invoke(app, ["eval", "--methods", "broken", "--datasets", str(prompts),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "trained prompts not found" in r.output
