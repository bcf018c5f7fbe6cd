"""The incremental detokeniser: same text as a whole-output decode, O(1) work per token, multi-byte
characters whole, stop strings that span tokens never streamed."""

from __future__ import annotations

import functools

import pytest
from engine_fixtures import default_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from safedecode.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain sentence.",
    "Ünïcödé: café, naïve, 東京タワー, emoji 🚀🎉 and math ∑∫√.",
    "  leading spaces\n\nand\tnewlines\n",
    "def f(x):\n    return x ** 2  # 😀",
]


@functools.cache
def _tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return _tok()


def _stream(tok, ids, **kw):
    d = IncrementalDetokenizer(tok, **kw)
    deltas = [d.add(t) for t in ids]
    deltas.append(d.flush())
    return d, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_equal_the_whole_decode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d, deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == d.text
    assert not any("\ufffd" in x for x in deltas)  # multi-byte characters come out whole


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_any_text_round_trips(text):
    tok = _tok()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    _, deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=40))
def test_arbitrary_token_ids_match_the_whole_decode(ids):
    tok = _tok()
    _, deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_work_per_token_is_bounded(tok):
    """Each step decodes a window of a few tokens, not the whole output."""
    ids = tok(" ".join(["the quick brown fox jumps over the lazy dog"] * 60),
              add_special_tokens=False)["input_ids"]
    assert len(ids) > 500
    sizes = []
    real = tok.decode

    class Spy:
        clean_up_tokenization_spaces = False

        def decode(self, x, **kw):
            sizes.append(len(x))
            return real(x, **kw)

    _, deltas = _stream(Spy(), ids)
    assert "".join(deltas) == real(ids, skip_special_tokens=True)
    assert max(sizes) <= 4 and len(sizes) <= 2 * len(ids) + 2


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tok):
    text = "Sure. The answer is forty-two. END OF ANSWER and then more text."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop=["END OF ANSWER"])
    streamed, used = "", 0
    for t in ids:
        streamed += d.add(t)
        used += 1
        if d.stopped:
            break
    streamed += d.flush()
    assert d.stopped and used < len(ids)
    assert streamed == d.text == "Sure. The answer is forty-two. "
    assert "END" not in streamed


def test_kept_stop_string_ends_the_text_and_min_tokens_delays_the_search(tok):
    """``keep_stop``: the stop string is the text's end (streamed whole); ``min_tokens``: a
    stop string in the first tokens is passed by, the next one found."""
    text = "Sure. The answer is forty-two. END OF ANSWER and then more text."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d, deltas = _stream(tok, ids, stop=["END OF ANSWER"], keep_stop=True)
    assert "".join(deltas) == d.text == "Sure. The answer is forty-two. END OF ANSWER"
    d, _ = _stream(tok, ids, stop=["."])
    assert d.text == "Sure"
    d, deltas = _stream(tok, ids, stop=["."], min_tokens=3)
    assert "".join(deltas) == d.text == "Sure. The answer is forty-two"


def test_special_tokens_as_text(tok):
    ids = [1, *tok("Hi", add_special_tokens=False)["input_ids"], 2]
    assert "".join(_stream(tok, ids)[1]) == "Hi"
    d, deltas = _stream(tok, ids, skip_special=False)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=False) == d.text
    assert d.text.startswith(tok.convert_ids_to_tokens(1))


def test_skip_ids_and_no_tokenizer(tok):
    eos = tok.eos_token_id
    ids = tok("Hi there", add_special_tokens=False)["input_ids"]
    d, deltas = _stream(tok, [*ids, eos], skip_ids=[eos])
    assert "".join(deltas) == "Hi there"
    none = IncrementalDetokenizer(None)
    assert none.add(5) == "" and none.flush() == "" and none.text == ""


def test_cleanup_tokenizers_take_the_exact_path(tok):
    class Cleaning:
        clean_up_tokenization_spaces = True

        def decode(self, ids, **kw):
            return tok.decode(ids, **kw).replace(" ,", ",")

    ids = tok("a , b , c", add_special_tokens=False)["input_ids"]
    d, deltas = _stream(Cleaning(), ids)
    assert d.exact and d.text == "a, b, c" and "".join(deltas) == "a, b, c"


@functools.cache
def _sentencepiece_like():
    """A Llama / Mistral / Gemma-style tokenizer: '▁' for spaces, byte fallback for characters
    outside its vocabulary, a decoder that strips the first space (trained here, tiny)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=500,
                                                            special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.sampled_from(TEXTS), st.text(max_size=40)),
       st.lists(st.integers(3, 499), max_size=30))
def test_sentencepiece_style_tokens_stream_as_the_whole_decode(text, ids):
    """Leading-space stripping and byte-fallback pieces of a multi-byte character: the deltas
    add up to the whole decode, for real texts and arbitrary ids."""
    tok = _sentencepiece_like()
    for seq in (tok(text, add_special_tokens=False)["input_ids"], ids):
        _, deltas = _stream(tok, seq)
        assert "".join(deltas) == tok.decode(seq, skip_special_tokens=True)
    emoji = tok("🚀 ok", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 4  # the rocket is four byte pieces
    _, deltas = _stream(tok, emoji)
    assert any("🚀" in x for x in deltas) and not any("\ufffd" in x for x in deltas)
