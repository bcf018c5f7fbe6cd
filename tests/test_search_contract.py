"""The engine's ``Search`` contract is open: a search written outside the package (best of n
by a reward) runs through ``SafeDecoder`` like DeAL and the router — the decoder sizes the
engine by its sequences per request, hands it the built prompts, the texts to score and each
request's parameters, and returns what its events say."""

from __future__ import annotations

from dataclasses import dataclass

from engine_fixtures import tiny_llama

from safedecode import methods
from safedecode.engine import Method, SafeDecoder, SamplingParams
from safedecode.engine.search import Search


def _vowels(texts):
    return [sum(c in "aeiou" for c in t) / max(1, len(t)) for t in texts]


@dataclass(frozen=True)
class BestOf(Search):
    """``n`` sampled answers per request (seeds ``seed .. seed + n - 1``), the one with the
    most vowels kept."""

    engine_method: Method
    n: int = 3
    name: str = "best-of"

    @property
    def sequences_per_request(self) -> int:
        return self.n

    def events(self, engine, built, texts, params, on_step=None):
        params = [params] * len(built) if isinstance(params, SamplingParams) else params
        for i, (b, p) in enumerate(zip(built, params, strict=True)):
            ids = engine.add_built(b, p, index=i, n=self.n)
            while engine.has_unfinished():
                engine.step()
            results = [engine.pop_result(r) for r in ids]
            best = max(range(self.n), key=lambda c: _vowels([results[c].text])[0])
            yield i, None, results[best].text, results[best]
            if on_step is not None:
                on_step(i + 1, len(built))


def test_a_search_written_outside_runs_through_the_decoder():
    model, tok = tiny_llama()
    plain = methods.get("plain")
    prompts = ["Tell me about cats.", "Name a river."]
    got = SafeDecoder(model, tok, BestOf(plain)).generate(prompts, max_new_tokens=6,
                                                          temperature=1.0, seed=5)
    ref = SafeDecoder(model, tok, plain)
    for prompt, r in zip(prompts, got, strict=True):
        each = [ref.generate(prompt, max_new_tokens=6, temperature=1.0, seed=5 + c)[0].text
                for c in range(3)]
        assert len(set(each)) > 1  # the seeds differ: there is a choice to make
        assert r.text == max(each, key=lambda t: _vowels([t])[0])
    streamed = list(SafeDecoder(model, tok, BestOf(plain)).stream(
        prompts, max_new_tokens=6, temperature=1.0, seed=5))
    assert [e.text for e in streamed] == [r.text for r in got]
