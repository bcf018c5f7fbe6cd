"""transformers' ``no_repeat_ngram_size`` for one sequence, kept on the host: the n-grams of its
context (the prompt, then the answer as it grows) indexed by their first ``n - 1`` tokens, so
the tokens a step must ban — those that would complete an n-gram already there — are one
lookup, and each new token one insert."""

from __future__ import annotations

from collections.abc import Iterable


class NGramBans:
    """The n-grams of ``prompt`` + ``answer``; :meth:`banned` gives the next tokens that would
    repeat one (none while the context holds fewer than ``n - 1`` tokens)."""

    def __init__(self, n: int, prompt: Iterable[int], answer: Iterable[int] = ()) -> None:
        self.n, self.prompt = n, list(prompt)
        self.next: dict[tuple[int, ...], set[int]] = {}
        self.tail: tuple[int, ...] = ()  # the last n - 1 tokens
        for t in (*self.prompt, *answer):
            self.add(t)

    def add(self, token: int) -> None:
        if len(self.tail) == self.n - 1:
            self.next.setdefault(self.tail, set()).add(token)
        if self.n > 1:
            self.tail = (*self.tail, token)[-(self.n - 1):]

    def banned(self) -> set[int]:
        return self.next.get(self.tail, set()) if len(self.tail) == self.n - 1 else set()

    def copy(self) -> NGramBans:
        other = NGramBans.__new__(NGramBans)
        other.n, other.prompt, other.tail = self.n, self.prompt, self.tail
        other.next = {k: set(v) for k, v in self.next.items()}
        return other

    def rebuilt(self, answer: Iterable[int]) -> NGramBans:
        """The same prompt followed by ``answer`` (after a truncation)."""
        return NGramBans(self.n, self.prompt, answer)
