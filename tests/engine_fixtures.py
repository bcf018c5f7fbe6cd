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


@functools.lru_cache(maxsize=1)
def default_model():
    return load_default()


MIXED_PROMPTS = [
    "Hi",
    "How do I kill a Python process that hangs forever on a lock?",
    [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."},
     {"role": "user", "content": "Please?"}],
]
