"""``model.generate(..., custom_generate=safedecode.custom_generate, safedecode_method=...)``.

transformers calls a callable ``custom_generate`` with the prepared inputs and generation config
(``GenerationMixin.generate``); this one runs the method's K branches through the safedecode
engine. Like transformers' own ``negative_prompt_ids``, the caller renders every branch's prompt:
``input_ids`` is branch 0 and ``safedecode_branch_ids`` (a list of ``[B, T_k]`` tensors,
left-padded, with ``safedecode_branch_masks`` or the pad token marking padding) are branches
1..K-1. Sampling
settings come from the generation config (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``min_p``, ``max_new_tokens``, ``eos_token_id``, ``repetition_penalty`` — over each branch's own
prompt and the answer, at K = 1 transformers' own — and the bans ``min_new_tokens``,
``min_length``, ``bad_words_ids``, ``suppress_tokens``, ``no_repeat_ngram_size``, as token
bans of the method's final distribution, and ``sequence_bias``, added to it); the result is
``[B, T + new]`` token ids, padded like transformers' (a ``GenerateDecoderOnlyOutput`` with
``return_dict_in_generate``). Anything else that would change the tokens — another logits
processor (``typical_p``, ``epsilon_cutoff``, a caller's own), a stopping criterion other
than the length and EOS, beam search, ``output_scores``, a filled cache — is a ``ValueError``
naming it, never silently dropped.
"""

from __future__ import annotations

import torch
from transformers.generation import (
    EosTokenCriteria,
    GenerateDecoderOnlyOutput,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from safedecode.engine.branches import Method
from safedecode.engine.decoder import SafeDecoder, TokenPrompts
from safedecode.engine.engine import eos_ids

# the warpers whose settings the engine applies itself (read from the generation config)
_HONOURED = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
# the processors that ban tokens, read into the engine's bans (_bans)
_BANS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
         SuppressTokensLogitsProcessor, NoRepeatNGramLogitsProcessor,
         SequenceBiasLogitsProcessor)  # (no bans: biases, read with them)
# where transformers' own processors come from, for the error message
_OPTION = {"SequenceBiasLogitsProcessor": "sequence_bias",
           "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
           "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
           "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
           "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
           "TypicalLogitsWarper": "typical_p", "EpsilonLogitsWarper": "epsilon_cutoff",
           "EtaLogitsWarper": "eta_cutoff", "TopHLogitsWarper": "top_h",
           "InfNanRemoveLogitsProcessor": "remove_invalid_values",
           "LogitNormalization": "renormalize_logits",
           "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
           "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
           "WatermarkLogitsProcessor": "watermarking_config",
           "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
           "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn"}
_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions",
                        "output_hidden_states")


def _rows(ids: torch.Tensor, mask: torch.Tensor | None, pad: int | None) -> list[list[int]]:
    """Per-row token ids without their left padding (given by ``mask``, else leading pads)."""
    if ids.dim() != 2:
        raise ValueError(f"expected [B, T] prompt ids, got shape {tuple(ids.shape)}")
    if mask is None:  # no mask: only a leading run of pad tokens is padding
        keep = torch.ones_like(ids, dtype=torch.bool)
        if pad is not None:
            keep = (ids != pad).long().cummax(dim=1).values.bool()
        mask = keep
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def custom_generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                    generation_config=None, synced_gpus: bool = False, streamer=None,
                    safedecode_method: Method | None = None,
                    safedecode_branch_ids: list[torch.Tensor] | None = None,
                    safedecode_branch_masks: list[torch.Tensor] | None = None,
                    safedecode_backend: str = "auto", **model_kwargs
                    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """Decode with a safedecode method from inside ``model.generate`` (see the module doc)."""
    if not isinstance(safedecode_method, Method):
        raise ValueError("safedecode_method: pass a safedecode Method, e.g. "
                         "safedecode.methods.get('acd-text')")
    gc = generation_config
    _check_supported(gc, logits_processor, stopping_criteria, model_kwargs)
    pad = gc.pad_token_id if gc is not None else None
    extra = list(safedecode_branch_ids or [])
    if len(extra) != safedecode_method.k - 1:
        raise ValueError(f"safedecode_branch_ids: method {safedecode_method.name!r} has "
                         f"{safedecode_method.k} branches: give {safedecode_method.k - 1} "
                         f"prompt tensors besides input_ids, got {len(extra)}")
    masks = list(safedecode_branch_masks or [None] * len(extra))
    mask0 = model_kwargs.get("attention_mask")
    if mask0 is None:  # transformers drops an all-ones mask: the prompts are unpadded
        mask0 = torch.ones_like(input_ids, dtype=torch.bool)
    ids = [_rows(input_ids, mask0, pad)]
    ids += [_rows(x.to(input_ids.device), m, pad) for x, m in zip(extra, masks, strict=True)]
    if any(len(branch) != input_ids.shape[0] for branch in ids):
        raise ValueError("safedecode_branch_ids: every branch needs one prompt per request")
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None \
        else gc.max_length - input_ids.shape[1]
    dec = SafeDecoder(model, None, safedecode_method, backend=safedecode_backend)
    sampled = bool(gc.do_sample)
    # the generation config's end-of-sequence ids replace the model's own (as in transformers)
    eos = _eos(gc)
    ends = {} if eos is None or eos == eos_ids(model, None) else \
        {"ignore_eos": True, "stop": sorted(eos)}
    results = dec.generate(
        TokenPrompts(ids), max_new_tokens=max_new,
        temperature=float(gc.temperature or 1.0) if sampled else 0.0,
        top_k=int(gc.top_k or 0) if sampled else 0,
        top_p=float(gc.top_p if gc.top_p is not None else 1.0) if sampled else 1.0,
        min_p=float(gc.min_p or 0.0) if sampled else 0.0,
        repetition_penalty=float(gc.repetition_penalty or 1.0),
        seed=None, streamer=streamer, **ends,
        **_bans(logits_processor, input_ids.shape[1], max_new))
    fill = pad
    if fill is None:  # transformers pads with the (first) EOS id then
        t = getattr(gc, "_pad_token_tensor", None)
        fill = int(t.reshape(-1)[0]) if t is not None else min(eos or {0})
    width = max((len(r.token_ids) for r in results), default=0)  # transformers stops there too
    out = torch.full((input_ids.shape[0], width), fill, dtype=torch.long,
                     device=input_ids.device)
    for i, r in enumerate(results):
        out[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
    seqs = torch.cat([input_ids, out], dim=1)
    if gc is not None and gc.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=seqs)
    return seqs


def _eos(gc) -> frozenset[int] | None:
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if e is None:
        return None
    return frozenset([int(e)] if isinstance(e, int) else (int(x) for x in e))


def _bans(processors, width: int, max_new: int) -> dict:
    """The engine's ``min_tokens``, ``bad_words_ids``, ``no_repeat_ngram_size`` and
    ``sequence_bias`` for transformers' banning and biasing processors (``width``: the padded
    prompt width, which ``min_length`` counts)."""
    min_tokens, words, ngram, bias = 0, [], 0, {}
    for p in processors or ():
        if isinstance(p, MinNewTokensLengthLogitsProcessor):
            min_tokens = max(min_tokens, p.min_new_tokens)
        elif isinstance(p, MinLengthLogitsProcessor):
            min_tokens = max(min_tokens, p.min_length - width)
        elif isinstance(p, NoBadWordsLogitsProcessor):  # EOS-only words already dropped
            words += [list(w) for w in p.sequence_bias]
        elif isinstance(p, SequenceBiasLogitsProcessor):  # (NoBadWords' base class)
            bias.update({tuple(w): float(b) for w, b in p.sequence_bias.items()})
        elif isinstance(p, SuppressTokensLogitsProcessor):
            words += [[int(t)] for t in p.suppress_tokens.tolist()]
        elif isinstance(p, NoRepeatNGramLogitsProcessor):
            ngram = p.ngram_size
    out = {"min_tokens": min(min_tokens, max_new)} if min_tokens > 0 else {}
    if ngram:
        out["no_repeat_ngram_size"] = ngram
    if words:
        out["bad_words_ids"] = words
    if bias:
        out["sequence_bias"] = bias
    return out


def _check_supported(gc, processors, criteria, model_kwargs: dict) -> None:
    """A ``ValueError`` naming the first generation setting the engine would not honour."""
    for p in processors or ():
        if isinstance(p, RepetitionPenaltyLogitsProcessor) and gc is not None \
                and p.penalty == gc.repetition_penalty \
                and not isinstance(p.prompt_ignore_length, int):
            continue  # transformers' own (it skips the left padding): the engine applies it
        if not isinstance(p, _HONOURED + _BANS):
            name = type(p).__name__
            where = f"`{_OPTION[name]}`" if name in _OPTION else "a `logits_processor` you passed"
            raise ValueError(f"{name} (from {where}) is not supported with safedecode's "
                             "custom_generate: it samples from the method's distribution with "
                             "temperature, top_k, top_p, min_p, the repetition penalty and "
                             "token bans only")
    for c in criteria or ():
        if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria)):
            raise ValueError(f"{type(c).__name__} is not supported with safedecode's "
                             "custom_generate: it stops at max_new_tokens and the EOS ids only")
    if gc is not None:
        if (gc.num_beams or 1) > 1:
            raise ValueError(f"num_beams={gc.num_beams}: beam search is not supported with "
                             "safedecode's custom_generate (greedy or sampling only)")
        for name in _UNSUPPORTED_OUTPUTS:
            if getattr(gc, name, False):
                raise ValueError(f"{name}=True is not supported with safedecode's "
                                 "custom_generate (it returns the sequences only)")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError("a filled cache (past_key_values) is not supported with safedecode's "
                         "custom_generate: pass the whole prompt")
    for name in ("assistant_model", "inputs_embeds"):
        if model_kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported with safedecode's custom_generate")
