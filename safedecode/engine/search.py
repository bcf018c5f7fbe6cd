"""``Search``: a method that chooses among answers decoded by the engine (DeAL's lookahead,
the reward router) rather than drawing one answer from a distribution.

The engine side of the contract: :class:`~.decoder.SafeDecoder` runs any ``Search`` over an
engine on its :attr:`Search.engine_method`, without knowing which search it is (the searches
live in :mod:`safedecode.methods`, which import the engine, never the other way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine, GenerationResult
    from .sampling import SamplingParams
    from .step import Built

Event = tuple[int, "int | None", str, "GenerationResult | None"]


class Search:
    """Base of the search methods. A subclass provides:

    - ``name`` (str); ``reward``, if it has one (moved next to the policy with
      ``.to(device)`` where it can be);
    - ``engine_method``: the :class:`Method` the engine decodes with;
    - ``sequences_per_request``: sequences one request holds at once (the engine's slots);
    - ``drop_rows``: whether the engine may drop a gated method's decided rows (only a search
      that reads no branch's own logits after its choice);
    - :meth:`events`.
    """

    drop_rows: bool = False
    reward = None

    def events(self, engine: Engine, built: Sequence[Built], texts: Sequence[str],
               params: SamplingParams | Sequence[SamplingParams],
               on_step: Callable[[int, int], None] | None = None) -> Iterator[Event]:
        """Run every request (``built[i]``, its reward scored against ``texts[i]``) in
        ``engine`` (on :attr:`engine_method`, with no other requests), yielding
        ``(i, token_id, text, result)`` for each part of request ``i``'s answer once final
        (``token_id`` None where it carries no token of its own; ``result`` on its last);
        ``on_step(requests_done, requests)`` after each step."""
        raise NotImplementedError(f"{type(self).__name__}: a Search subclass implements "
                                  "events() (see safedecode.engine.search)")

