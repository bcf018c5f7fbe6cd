"""lm-evaluation-harness on a safedecode method: what a method costs in capability.

The safety evaluation (``safedecode eval``) measures refusals; this measures the other side —
a method's accuracy on lm-eval's tasks (MMLU, ARC, HellaSwag, GSM8K ...) beside the plain
model's. Extra ``harness`` (``pip install safedecode[harness]``)::

    safedecode-lm-eval --model safedecode \\
        --model_args pretrained=default,method=acd,adapter=ta-sft --tasks arc_easy --limit 100 \\
        --batch_size 16  # requests decoding at once (lm-eval's default is 1)

(or ``python -m safedecode.eval.harness``) is lm-eval's own command line with the model
``safedecode`` registered (``model_args``: ``pretrained`` a local model folder or ``default``,
``method`` a method spec as in ``safedecode eval`` — ``self-cd:alpha=2.5`` —, ``adapter``,
``dtype``, ``device``, ``max_gen_toks``). In Python:
``lm_eval.simple_evaluate(model=SafeDecodeLM(method="acd"), tasks=[...])``.

Log-likelihoods are the method's final distribution, as :meth:`SafeDecoder.score` gives them
(one multiple-choice context is computed once for all its choices); generations are
:meth:`SafeDecoder.generate`'s. A task's text is continued as it is (after each branch's own
system prompt, as a served completion); with ``--apply_chat_template`` each branch renders the
chat template around its own system prompt, and ``--system_instruction`` is the deployment's
system message that joins every branch. A served method is measured the same way by lm-eval's
``local-completions`` model against ``safedecode serve`` (its ``echo`` log-probs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

try:
    # lm-eval's own models are registered first (lm_eval.models): its registry fills itself
    # lazily only while empty, so registering ours first would hide them
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - the extra is part of the dev install
    raise ImportError("safedecode.eval.harness needs lm-evaluation-harness: "
                      "pip install 'safedecode[harness]'") from exc

# apply_chat_template's output: the messages, rendered per branch when the request is run
_CHAT = "\x00safedecode-chat:"
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "min_p",
             "seed", "max_new_tokens", "max_tokens"}


def _messages(context: str) -> list[dict] | None:
    return json.loads(context[len(_CHAT):]) if context.startswith(_CHAT) else None


@register_model("safedecode")
class SafeDecodeLM(TemplateLM):
    """lm-eval's ``LM`` over a :class:`~safedecode.engine.SafeDecoder` (its model, tokenizer
    and method); ``decoder`` gives one directly, else it is loaded from ``pretrained``."""

    def __init__(self, pretrained: str = "default", method: str = "plain",
                 adapter: str | None = None, dtype: str = "float32", device: str = "cpu",
                 batch_size: int | str = 16, max_gen_toks: int = 256, decoder=None,
                 **unused) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)  # lm-eval's, for its own batch-size search
        if unused:
            raise ValueError(f"model_args: unknown {sorted(unused)}; safedecode takes "
                             "pretrained, method, adapter, dtype, device, batch_size, "
                             "max_gen_toks")
        if decoder is None:
            from safedecode.engine import SafeDecoder
            from safedecode.eval.runner import parse_methods
            from safedecode.models import cuda_unavailable, load_model

            if str(device or "cpu").startswith("cuda") and cuda_unavailable():
                # lm-eval's command line asks for cuda:0 by default; its HF model falls back too
                logging.getLogger(__name__).warning("device %s: %s; using cpu", device,
                                                    cuda_unavailable())
                device = "cpu"
            specs = parse_methods(str(method))
            if len(specs) != 1:
                raise ValueError(f"method: one method spec, got {method!r}")
            model, tok = load_model(str(pretrained), dtype=dtype, device=device or "cpu",
                                    adapter=adapter)
            decoder = SafeDecoder(model, tok, specs[0].build())
        self.dec = decoder
        self.tokenizer = decoder.tok
        if self.tokenizer is None:
            raise ValueError("decoder: lm-eval needs a decoder with a tokenizer")
        try:  # lm-eval's "auto" searches for the largest batch: the engine's default here
            self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        except ValueError:
            self.batch_size = 0
        if self.batch_size < 1:
            raise ValueError(f"batch_size: an integer >= 1 or 'auto', got {batch_size!r}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) \
                or max_gen_toks < 1:
            raise ValueError(f"max_gen_toks: a positive integer, got {max_gen_toks!r}")
        self.max_gen_toks = max_gen_toks
        from safedecode.engine.engine import default_max_len

        built = decoder.builder.build_request(decoder.method.branches, [self.eot_token_id], 0,
                                              raw=True)
        # the room a raw request has after the longest branch prompt (the engines' context)
        self.max_length = default_max_len(decoder.model) - max(len(p) for p, _ in built)

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token before a text with no context (rolling windows, an empty context): BOS
        where the tokenizer has one, as lm-eval's HF model takes it, else EOS."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool = False, **kw) -> list[int]:
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def apply_chat_template(self, chat_history: list[dict],
                            add_generation_prompt: bool = True) -> str:
        """The messages, kept whole: each branch renders them around its own system prompt
        when the request runs."""
        if not add_generation_prompt:
            raise ValueError("apply_chat_template: an assistant turn to continue (a task's "
                             "gen_prefix) is not supported; the answer starts a new turn")
        return _CHAT + json.dumps(chat_history)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each (context, continuation) scored under the method; a chat context (from
        :meth:`apply_chat_template`) as messages, the continuation the answer's first tokens."""
        raw, chat = [], []
        for i, req in enumerate(requests):
            context, continuation = req.args
            msgs = _messages(context)
            if msgs is not None:
                chat.append((i, msgs, self.tok_encode(continuation)))
            elif context == "":
                raw.append((i, [self.prefix_token_id], self.tok_encode(continuation)))
            else:
                raw.append((i, *self._encode_pair(context, continuation)))
        out: list = [None] * len(requests)
        for group, is_raw in ((raw, True), (chat, False)):
            if group:
                idx, ctxs, conts = zip(*group, strict=True)
                for i, r in zip(idx, self._score(list(ctxs), list(conts), is_raw), strict=True):
                    out[i] = r
        return out

    def _loglikelihood_tokens(self, requests, **kw) -> list[tuple[float, bool]]:
        _, ctxs, conts = zip(*requests, strict=True) if requests else ((), (), ())
        return self._score(list(ctxs), list(conts), True)

    def _score(self, contexts: list, continuations: list[list[int]], raw: bool
               ) -> list[tuple[float, bool]]:
        if any(not c for c in continuations):
            raise ValueError("loglikelihood: a continuation with no tokens")
        if raw:  # the context cut from the left to fit, as lm-eval's HF model does
            contexts = [self._fit(ctx, len(cont)) for ctx, cont in
                        zip(contexts, continuations, strict=True)]
        res = self.dec.score(contexts, continuations, raw=raw, top_logprobs=1,
                             max_batch=self.batch_size)
        out = []
        for r, cont in zip(res, continuations, strict=True):
            greedy = all(top[0][0] == t or top[0][1] <= lp
                         for t, lp, top in zip(cont, r.logprobs, r.top_logprobs, strict=True))
            out.append((float(sum(r.logprobs)), greedy))
        return out

    def _fit(self, context: list[int], need: int) -> list[int]:
        room = self.max_length - need
        if room < 1:
            raise ValueError(f"context: {need} tokens to score or generate leave no room for "
                             f"it in this model's {self.max_length}; use a shorter "
                             "continuation or max_gen_toks")
        return context[-room:]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A text's log-likelihood in lm-eval's rolling windows (each window's context is the
        tokens before it), of ``max_length - 1`` tokens: the engine counts a scored request's
        last token against the context too."""
        from lm_eval import utils

        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued under the method until a stop string, EOS or
        ``max_gen_toks``; requests with the same settings run as one batch."""
        groups: dict[str, list] = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            params = self._gen_params(dict(kwargs or {}))
            groups.setdefault(json.dumps(params, sort_keys=True), []).append((i, context))
        out: list = [None] * len(requests)
        for key, items in groups.items():
            params = json.loads(key)
            raw = [(i, self._fit(self.tok_encode(c), params["max_new_tokens"]))
                   for i, c in items if _messages(c) is None]
            chat = [(i, _messages(c)) for i, c in items if _messages(c) is not None]
            for group, is_raw in ((raw, True), (chat, False)):
                if group:
                    idx, prompts = zip(*group, strict=True)
                    res = self.dec.generate(list(prompts), raw=is_raw,
                                            max_batch=self.batch_size, **params)
                    for i, r in zip(idx, res, strict=True):
                        out[i] = r.text
        return out

    def _gen_params(self, kw: dict) -> dict:
        """lm-eval's generation kwargs as :meth:`SafeDecoder.generate` keywords."""
        unknown = sorted(set(kw) - _GEN_KEYS)
        if unknown:
            raise ValueError(f"generation_kwargs: not supported by safedecode: {unknown}")
        until = kw.get("until") or []
        stop = [until] if isinstance(until, str) else list(until)
        max_new = kw.get("max_gen_toks", kw.get("max_new_tokens", kw.get("max_tokens")))
        params = {"max_new_tokens": int(max_new or self.max_gen_toks),
                  "stop": [s for s in stop if s]}
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        sample = kw["do_sample"] if kw.get("do_sample") is not None else temperature > 0
        params["temperature"] = (temperature or 1.0) if sample else 0.0
        for name in ("top_p", "top_k", "min_p", "seed"):
            if kw.get(name) is not None and sample:
                params[name] = kw[name]
        return params


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``safedecode`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
