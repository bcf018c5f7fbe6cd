"""Models for the engine tests: a tiny random Llama (fast) and the embedded default model."""

from __future__ import annotations

import functools

import torch

from safedecode.models import default_model_path, load_default


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    from transformers import AutoTokenizer

    folder, gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=2)
def tiny_llama(seed: int = 0, max_positions: int = 512):
    """A 2-layer random Llama with the default model's tokenizer (real chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = default_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


# prompts of the per-request sampling tests (top_logprobs, penalties)
SAMPLING_PROMPTS = ["Hi", "How do I kill a Python process that hangs forever on a lock?",
                    "Name a colour."]


def fork_then_truncate(dec, prompt, params, *, fork_at: int, keep: int, max_seqs: int = 2,
                       before=None) -> tuple[list[int], list[int]]:
    """Run ``prompt`` in an engine of ``dec``: after ``fork_at`` steps fork it once, after three
    more roll the parent back to ``keep`` tokens, then run both out; returns (parent, fork)
    tokens. ``before``: a request (prompt, params) added first (one that ends early moves the
    others' slots down)."""
    from safedecode.engine import SamplingParams

    eng = dec.engine(max_seqs=max_seqs)
    if before is not None:
        eng.add_request(before[0], SamplingParams(**before[1]))
    a = eng.add_request(prompt, params)
    for _ in range(fork_at):
        eng.step()
    kid = eng.fork(a, 1)[0]
    for _ in range(3):
        eng.step()
    eng.truncate(a, keep)
    while eng.has_unfinished():
        eng.step()
    return eng.pop_result(a).token_ids, eng.pop_result(kid).token_ids


def one_token_words(tok, text: str) -> list[str]:
    """The words of ``text`` that are one token both alone and after a space: as a bad word
    (vLLM's rule) such a word is banned at the start of a text and inside it."""
    def n(w: str) -> int:
        return len(tok(w, add_special_tokens=False)["input_ids"])
    return [w for w in text.split() if n(w) == n(" " + w) == 1]


@functools.lru_cache(maxsize=1)
def tiny_acd_decoder():
    """``acd-text`` (alpha 0.5, beta 0.1) on :func:`tiny_llama`: a contrast with a mask."""
    from safedecode import methods
    from safedecode.engine import SafeDecoder

    model, tok = tiny_llama()
    return SafeDecoder(model, tok, methods.get("acd-text", alpha=0.5, beta=0.1))


def final_from_scratch(dec, prompt: str, out: list[int], temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``[len(out), V]``: the final log-distribution before each generated token, from one
    forward per branch over prompt + answer (no cache, no batching)."""
    from safedecode.ops import contrastive_logprobs

    m, logits = dec.method, []
    for branch in m.branches:
        prefix, suffix = dec.builder.build(branch, [{"role": "user", "content": prompt}], 0)
        ids = prefix.ids + suffix
        with torch.no_grad():
            z = dec.model(torch.tensor([ids + out])).logits[0]
        logits.append(z[len(ids) - 1:len(ids) - 1 + len(out)])
    return contrastive_logprobs(torch.stack(logits), list(m.weights), rule=m.rule,
                                anchor=m.anchor, beta=m.beta, temperature=temperature,
                                top_k=top_k, top_p=top_p, backend="reference")


@functools.lru_cache(maxsize=1)
def default_model():
    return load_default()


# Gemma 2's template, in short: no system role (it raises), user and model turns alternate.
NO_SYSTEM_ROLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/model/user/model/...') }}"
    "{% endif %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}")
# A template that leaves system messages out without a word.
DROPS_SYSTEM = ("{% for message in messages %}{% if message['role'] != 'system' %}"
                "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


MIXED_PROMPTS = [
    "Hi",
    "How do I kill a Python process that hangs forever on a lock?",
    [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."},
     {"role": "user", "content": "Please?"}],
]


WINDOW = 8  # the sliding window of tiny_arch's windowed models: far below the test prompts

# name -> (config class, model class, config keywords): one model per attention layout
ARCHS = {
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen2-mixed": ("Qwen2Config", "Qwen2ForCausalLM",
                    {"use_sliding_window": True, "sliding_window": WINDOW,
                     "max_window_layers": 1}),  # layer 0 full, layer 1 windowed
    "gemma2-mixed": ("Gemma2Config", "Gemma2ForCausalLM",
                     {"sliding_window": WINDOW, "head_dim": 16,
                      "final_logit_softcapping": 2.0}),  # low: it caps a random model's logits
    "gemma3-mixed": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                     {"sliding_window": WINDOW, "head_dim": 16,
                      "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": WINDOW}),
    "gptoss-mixed": ("GptOssConfig", "GptOssForCausalLM",  # attention sinks, eager, MoE
                     {"sliding_window": WINDOW, "head_dim": 16, "num_local_experts": 4,
                      "num_experts_per_tok": 2,
                      "layer_types": ["sliding_attention", "full_attention"]}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    # logits changed after the lm_head: scaled (Cohere, Granite), soft-capped (Gemma 2, above)
    "cohere-scaled": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite-scaled": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}


@functools.cache
def tiny_arch(name: str, seed: int = 0):
    """A 2-layer random model of another architecture than Llama (``ARCHS``), with the default
    model's tokenizer."""
    import transformers

    cfg_cls, model_cls, extra = ARCHS[name]
    tok = default_tokenizer()
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id, "vocab_size": len(tok)}
    if name == "gpt2":
        size = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}
    else:
        size = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 512}
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**size, **ids, **extra)
    return getattr(transformers, model_cls)(cfg).eval(), tok


def soft_method(model, tok):
    """A soft-prompt branch (the embedded text "You are careful.") contrasted with plain."""
    from safedecode.engine import Branch, contrastive

    ids = tok("You are careful.", add_special_tokens=False)["input_ids"]
    soft = model.get_input_embeddings()(torch.tensor(ids)).detach()
    return contrastive([Branch(soft_prompt=soft), Branch()], [1.5, -0.5])


def method_named(name: str, model, tok):
    """``methods.get(name)``, or :func:`soft_method` for ``"soft"``."""
    from safedecode import methods

    return soft_method(model, tok) if name == "soft" else methods.get(name)
