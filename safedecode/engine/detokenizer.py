"""Incremental detokenisation: a request's text as its tokens arrive, O(1) work per token.

Decoding the whole output at every step costs O(n) per token (O(n²) per answer). Here each step
decodes only a short window — the tokens since the last emitted boundary plus the few before it
as context (vLLM's *prefix / read offsets*) — and emits the new characters once they no longer end
in an incomplete UTF-8 sequence (``"\\ufffd"``), so multi-byte characters split over several
byte-level tokens come out whole. Stop strings are searched only in the tail that can hold a new
match, so one that spans tokens is found and the text is cut before it.

The concatenated deltas equal ``tokenizer.decode(ids, skip_special_tokens=...)``. A tokenizer that
cleans up tokenisation spaces (``clean_up_tokenization_spaces=True``) can change earlier characters
when later tokens arrive; for those the window is the whole output (the exact, O(n) path).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn one request's tokens into text deltas; ``skip_ids`` (EOS, stop ids) are not text;
    ``tokenizer=None`` gives no text.

    With stop strings, the last ``max(len(stop)) - 1`` characters are held back until it is
    clear that they do not start a stop string, so nothing of a stop string is ever streamed;
    :meth:`flush` releases the rest when the request ends. Stop strings are looked for once
    ``min_tokens`` tokens are in (a match found then may start earlier, as in vLLM).
    ``keep_stop``: the stop string ends the text rather than being cut (vLLM's
    ``include_stop_str_in_output``); ``skip_special``: special tokens are not text.
    """

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), skip_ids: Iterable[int] = (),
                 min_tokens: int = 0, keep_stop: bool = False, skip_special: bool = True):
        self.tok = tokenizer
        self.keep_stop = keep_stop  # the stop string ends the text instead of being cut
        self.skip_special = skip_special  # special tokens (other than skip_ids) are not text
        self.min_tokens = min_tokens  # stop strings are searched from this many tokens on
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.prefix = 0  # window start: context tokens already turned into text
        self.read = 0  # tokens whose text is in self.text
        self.text = ""
        self.emitted = 0  # characters of self.text returned so far
        self.stopped = False
        self.exact = tokenizer is not None and bool(
            getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def clone(self) -> IncrementalDetokenizer:
        """An independent copy (same tokenizer) that continues from this state (fork)."""
        other = copy.copy(self)
        other.ids, other.stop, other.skip = list(self.ids), list(self.stop), set(self.skip)
        return other

    def _decode(self, ids: list[int]) -> str:
        if not ids or self.tok is None:  # no tokenizer (token-id prompts): no text
            return ""
        return self.tok.decode(ids, skip_special_tokens=self.skip_special,
                               clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Append ``token``; return the text that is now final (possibly empty). A stop string
        cuts the text before it and sets :attr:`stopped`; later tokens add nothing."""
        if self.stopped or token in self.skip:
            return ""
        self.ids.append(int(token))
        if self.exact:  # whole-output decode: earlier characters may change
            full = self.tok.decode(self.ids, skip_special_tokens=self.skip_special)
            if full.endswith(REPLACEMENT):
                return ""
            self.read = len(self.ids)
            self._set_text(full, len(self.text) if full.startswith(self.text) else 0)
            return self._release()
        before = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if len(window) <= len(before) or window.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self._set_text(self.text + window[len(before):], len(self.text))
        return self._release()

    def _set_text(self, text: str, new_from: int) -> None:
        # only a match that ends in the new characters can be new
        for s in self.stop if len(self.ids) >= self.min_tokens else ():
            at = text.find(s, max(0, new_from - len(s) + 1))
            if at >= 0:
                text, self.stopped = text[:at + (len(s) if self.keep_stop else 0)], True
        self.text = text

    def _release(self, final: bool = False) -> str:
        end = len(self.text) if (final or self.stopped) else len(self.text) - self.hold
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def flush(self) -> str:
        """The request ended: the held-back text, and any undecoded tail as it decodes now (an
        incomplete UTF-8 sequence shows as U+FFFD, as a whole-output decode would)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            window = self._decode(self.ids[self.prefix:])
            if window.startswith(before):
                self._set_text(self.text + window[len(before):], len(self.text))
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)
