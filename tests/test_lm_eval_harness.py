"""lm-evaluation-harness on safedecode: the ``safedecode`` model (offline) and lm-eval's
``local-completions`` against ``safedecode serve`` run a multiple-choice and a generation task
through lm-eval's own evaluator; the plain method's log-likelihoods equal lm-eval's own HF
model's, a contrast method's equal its scores, the server's equal the offline ones."""

from __future__ import annotations

import json
import subprocess
import sys

import lm_eval  # extra "harness", part of the dev install
import pytest
import torch
from engine_fixtures import tiny_llama
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from serve_fixtures import LiveServer

from safedecode import methods
from safedecode.engine import SafeDecoder
from safedecode.eval.harness import SafeDecodeLM, main

KEY = "sk-test"
SYSTEM = "Answer in one word."
DOCS = [{"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"],
         "answer": 0},
        {"question": "Two plus two equals", "choices": ["three", "four"], "answer": 1},
        {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit",
                                                                  "Kelvin", "Rankine"],
         "answer": 0}]
TASKS = {"sd_choice": """
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: " "
metric_list:
  - metric: acc
""", "sd_gen": """
output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two tasks on a local JSONL file (nothing downloaded)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\n  cache_dir: {root / 'cache'}\ntest_split: test\n{body}")
    manager = TaskManager(include_path=str(root))
    manager.root = root
    return manager


def _evaluate(model, tasks, names, **kw) -> dict:
    """lm-eval's ``simple_evaluate``; returns {task: [per-doc responses]}."""
    out = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0, **kw)
    return {t: [s["resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
            for t in names}


def _lls(resps) -> list[list[float]]:
    return [[r[0][0] for r in doc] for doc in resps]


@pytest.fixture(scope="module")
def decoders():
    model, tok = tiny_llama()
    return {m: SafeDecoder(model, tok, methods.get(m)) for m in ("plain", "acd-text")}


def test_plain_equals_lm_evals_own_hf_model_and_a_contrast_its_scores(tasks, decoders):
    """Multiple choice through lm-eval's evaluator: ``plain`` = lm-eval's HFLM on the same
    model (log-likelihoods and is-greedy); ``acd-text`` = :meth:`SafeDecoder.score` of each
    choice after its context, and differs from plain."""
    from lm_eval.models.huggingface import HFLM

    dec = decoders["plain"]
    ours = _evaluate(SafeDecodeLM(decoder=dec, batch_size=4), tasks, ["sd_choice"])["sd_choice"]
    ref = _evaluate(HFLM(pretrained=dec.model, tokenizer=dec.tok, batch_size=4), tasks,
                    ["sd_choice"])["sd_choice"]
    assert [len(d) for d in ours] == [len(d["choices"]) for d in DOCS]
    for a, b in zip(_lls(ours), _lls(ref), strict=True):
        assert a == pytest.approx(b, abs=2e-4)
    assert [[r[0][1] for r in d] for d in ours] == [[r[0][1] for r in d] for d in ref]

    acd = decoders["acd-text"]
    got = _lls(_evaluate(SafeDecodeLM(decoder=acd), tasks, ["sd_choice"])["sd_choice"])
    tok = acd.tok
    for doc, lls in zip(DOCS, got, strict=True):
        ctx = f"Q: {doc['question']}\nA:"
        cids = tok(ctx, add_special_tokens=False)["input_ids"]
        conts = [tok(ctx + " " + c, add_special_tokens=False)["input_ids"][len(cids):]
                 for c in doc["choices"]]
        want = [sum(r.logprobs) for r in acd.score([cids] * len(conts), conts, raw=True)]
        assert lls == pytest.approx(want, abs=1e-4)
    assert max(abs(a - b) for x, y in zip(got, _lls(ours), strict=True)
               for a, b in zip(x, y, strict=True)) > 1e-2


def test_served_method_under_local_completions_equals_offline(tasks, decoders, tiny_model_dir,
                                                              tmp_path, monkeypatch):
    """lm-eval's ``local-completions`` against ``safedecode serve`` (token-id prompts, echo
    log-probs; greedy generations with a stop string) = the offline ``safedecode`` model; its
    ``local-chat-completions`` with a chat template and a system instruction = the offline
    model's chat path (each branch renders the messages)."""
    srv = LiveServer(["--model", str(tiny_model_dir), "--name", "tiny", "-m", "acd-text",
                      "--api-key", KEY], tmp_path)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        args = (f"model=tiny:acd-text,base_url={srv.url}/v1/completions,"
                f"tokenizer={tiny_model_dir},max_retries=1,max_length=512")
        served = _evaluate("local-completions", tasks, ["sd_choice", "sd_gen"],
                           model_args=args)
        chat_args = f"model=tiny:acd-text,base_url={srv.url}/v1/chat/completions,max_retries=1"
        served_chat = _evaluate("local-chat-completions", tasks, ["sd_gen"],
                                model_args=chat_args, apply_chat_template=True,
                                system_instruction=SYSTEM)
    finally:
        assert srv.stop() == 0
    offline = _evaluate(SafeDecodeLM(decoder=decoders["acd-text"]), tasks,
                        ["sd_choice", "sd_gen"])
    for a, b in zip(_lls(served["sd_choice"]), _lls(offline["sd_choice"]), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert served["sd_gen"] == offline["sd_gen"]
    offline_chat = _evaluate(SafeDecodeLM(decoder=decoders["acd-text"]), tasks, ["sd_gen"],
                             apply_chat_template=True, system_instruction=SYSTEM)
    assert served_chat["sd_gen"] == offline_chat["sd_gen"] != offline["sd_gen"]
    assert all(isinstance(d[0][0], str) and "\n" not in d[0][0] for d in offline["sd_gen"])
    assert any(d[0][0] for d in offline["sd_gen"])


def test_chat_requests_render_each_branch_and_rolling_windows_add_up(decoders):
    """With a chat template the messages reach every branch (= generate / score on the
    messages, the system instruction as the deployment's); rolling log-likelihood over
    windows shorter than the text = the sum of its tokens' teacher-forced log-probs."""
    acd = decoders["acd-text"]
    lm = SafeDecodeLM(decoder=acd, max_gen_toks=5)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ctx = lm.apply_chat_template(msgs)
    out = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": ["\n\n"]}), 0)])
    assert out == [acd.generate([msgs], max_new_tokens=5, temperature=0, stop=["\n\n"])[0].text]
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, "Hello there"), 0)])
    want = acd.score([msgs], [acd.tok("Hello there", add_special_tokens=False)["input_ids"]])
    assert ll == pytest.approx(sum(want[0].logprobs), abs=1e-4)
    with pytest.raises(ValueError, match="gen_prefix"):
        lm.apply_chat_template(msgs, add_generation_prompt=False)

    plain = decoders["plain"]
    lm = SafeDecodeLM(decoder=plain)
    from lm_eval.models.huggingface import HFLM

    text = "The fox walked down to the river to drink, as it did every morning."
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    hf = HFLM(pretrained=plain.model, tokenizer=plain.tok).loglikelihood_rolling(req)
    assert lm.loglikelihood_rolling(req) == pytest.approx(hf, abs=2e-4)  # BOS first, as HF's
    lm.max_length = 16  # windows of 15 tokens over a 46-token text
    text = " ".join(f"word{i}" for i in range(20))
    ids = plain.tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 32
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    seq = torch.tensor([[lm.prefix_token_id, *ids]])
    with torch.no_grad():  # each window sees at most 15 tokens: compute them as lm-eval cuts
        from lm_eval import utils

        want = 0.0
        for ctx_ids, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                ids, lm.prefix_token_id, 15, 1)):
            inp = torch.tensor([ctx_ids + cont])
            lp = torch.log_softmax(plain.model(inp).logits[0].float(), -1)
            want += sum(float(lp[len(ctx_ids) + j - 1, t]) for j, t in enumerate(cont))
    assert got == pytest.approx(want, abs=1e-3)
    with torch.no_grad():  # and the windows matter: the whole text in one differs
        lp = torch.log_softmax(plain.model(seq).logits[0].float(), -1)
    whole = sum(float(lp[j, seq[0, j + 1]]) for j in range(seq.shape[1] - 1))
    assert abs(whole - got) > 1e-3


def test_bad_arguments_name_what_is_wrong(decoders):
    with pytest.raises(ValueError, match="unknown.*temprature"):
        SafeDecodeLM(decoder=decoders["plain"], temprature=1)
    for bad in (0, "many"):
        with pytest.raises(ValueError, match="batch_size"):
            SafeDecodeLM(decoder=decoders["plain"], batch_size=bad)
    with pytest.raises(ValueError, match="max_gen_toks"):
        SafeDecodeLM(decoder=decoders["plain"], max_gen_toks=0)
    with pytest.raises(ValueError, match="unknown method"):
        SafeDecodeLM(method="acdd")
    lm = SafeDecodeLM(decoder=decoders["plain"])
    lm.max_length = 4  # a continuation that leaves its context no room
    with pytest.raises(ValueError, match="context: 4 tokens to score"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("Hi", " one two three four"), 0)])
    lm = SafeDecodeLM(decoder=decoders["plain"])
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"num_beams": 2}), 0)])


    # registering ours leaves lm-eval's own models findable (its registry fills lazily)
    code = ("import safedecode.eval.harness; from lm_eval.api.registry import get_model; "
            "print(get_model('local-completions').__name__, get_model('safedecode').__name__)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["LocalCompletionsAPI", "SafeDecodeLM"], out.stderr[-2000:]


def test_command_line_loads_a_model_and_method_spec(tasks, decoders, tiny_model_dir, tmp_path):
    """``safedecode-lm-eval``: lm-eval's command line, the ``safedecode`` model loaded from
    ``model_args`` (a model folder, a method spec with a knob) = the same method offline."""
    main(["--model", "safedecode", "--model_args",
          f"pretrained={tiny_model_dir},method=acd-text:alpha=0.5", "--batch_size", "4",
          "--tasks", "sd_choice", "--include_path", str(tasks.root), "--output_path",
          str(tmp_path), "--log_samples"])
    (path,) = tmp_path.rglob("samples_sd_choice_*.jsonl")
    got = [json.loads(line) for line in path.read_text().splitlines()]
    got = [[float(r[0][0]) for r in d["resps"]] for d in sorted(got, key=lambda d: d["doc_id"])]
    acd = decoders["acd-text"]
    dec = SafeDecoder(acd.model, acd.tok, methods.get("acd-text", alpha=0.5))
    want = _lls(_evaluate(SafeDecodeLM(decoder=dec), tasks, ["sd_choice"])["sd_choice"])
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
