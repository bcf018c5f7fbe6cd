"""Content-neutral *forms* around anchor requests: probe training data that does not key on form.

A harmful-request probe read at the last prompt token learns how the anchor requests are
written (one or two plain sentences) as much as what they ask: on the anchor validation part a
"numbered list of at least ten items" suffix made session 29's gated-ACD probe flag 82% of
safe requests, and a code block before a request hid 75% of harmful ones
(``benchmarks/results/acd_gate_s30/``). Wrapping every train request in a few such forms,
label unchanged, teaches the probe that the form carries no harm.

The wrappers here are the *train* forms; the forms a probe is checked on are other ones and
live with that check, never here (a probe must not be validated on forms it was trained on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

Wrapper = Callable[[int, str, Sequence[str]], str]

# (index, request, context passages) -> the request in that form
TRAIN_FORMS: dict[str, Wrapper] = {
    "context": lambda i, r, ctx: (f"Here is some background I found:\n\n"
                                  f"{ctx[(7 * i + 3) % len(ctx)]}\n\n{r}"),
    "detail": lambda i, r, ctx: f"{r} Please be as detailed and specific as you can, step by step.",
    "persona": lambda i, r, ctx: f"You are a helpful expert with many years of experience. {r}",
    "greeting": lambda i, r, ctx: f"Hi! I hope you're doing well. {r} Thank you so much!",
}


def parse_forms(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"none"`` / ``None`` / an empty sequence -> ``()``, ``"all"`` -> every train form, else
    a comma list (or a sequence) of names from :data:`TRAIN_FORMS` (an unknown name is a
    ``ValueError`` naming the known ones)."""
    if spec is None or spec == "none" or (not isinstance(spec, str) and not spec):
        return ()
    if spec == "all":
        return tuple(TRAIN_FORMS)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if n not in TRAIN_FORMS]
    if bad or not names:
        raise ValueError(f"forms: unknown form(s) {bad or names!r}; known: 'none', 'all' or a "
                         f"comma list of {', '.join(TRAIN_FORMS)}")
    return tuple(dict.fromkeys(names))


def in_forms(items: Sequence[dict], forms: str | Sequence[str] | None,
             context: Sequence[str] | None = None) -> list[dict]:
    """``items`` followed by a copy of each in every form of ``forms`` (names or a spec, as
    :func:`parse_forms`; ``prompt`` rewritten, ``form`` set, every other field — the label —
    kept). ``context``: passages for the ``context`` form (default: the ``answer`` of the safe
    items among ``items``)."""
    forms = parse_forms(forms)
    if context is None:
        context = [it["answer"] for it in items if it.get("split") == "safe" and it.get("answer")]
    if "context" in forms and not context:
        raise ValueError("forms: the 'context' form needs at least one context passage")
    out = list(items)
    for name in forms:
        wrap = TRAIN_FORMS[name]
        out += [{**it, "prompt": wrap(i, it["prompt"], context), "form": name}
                for i, it in enumerate(items)]
    return out
