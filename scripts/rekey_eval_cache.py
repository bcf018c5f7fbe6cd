"""Re-key eval caches written before ``model_fingerprint`` ignored the config's
``transformers_version`` (session 10).

The old fingerprint hashed the library version into every cache key: an upgrade from
transformers 5.24.0 to 5.25.0 turned the default model's ``0fc5bb331f9376d5`` into
``f19657ee50df5d13`` and made every cached generation miss, although the 452 generations then
re-made under 5.25.0 were token for token the cached ones. This rewrites the records (and their
annotations) of the given old fingerprints to the model's current fingerprint: each stored key
is first recomputed from the record under its old fingerprint (it must match), then under the
new one; a record already present under the new key is kept once (the first).

    python scripts/rekey_eval_cache.py --model default --old 0fc5bb331f9376d5 \\
        --old f19657ee50df5d13 benchmarks/results/efficacy ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from safedecode.eval.runner import model_fingerprint, record_key
from safedecode.models import load_model


def rekey(folder: Path, old: set[str], new: str) -> tuple[int, int]:
    """Rewrite ``folder``'s generations and annotations; returns (re-keyed, duplicates)."""
    gens = folder / "generations.jsonl"
    rows = [json.loads(line) for line in gens.open()]
    keymap, out, seen, dups = {}, [], set(), 0
    for r in rows:
        if r["model_fingerprint"] in old:
            item = SimpleNamespace(id=r["item_id"], prompt=r["prompt"])
            args = (r["method_fingerprint"], r["dataset"], item, r["decoding"])
            if record_key(r["model_fingerprint"], *args) != r["key"]:
                raise SystemExit(f"{gens}: record {r['key']} does not re-compute; left alone")
            keymap[r["key"]] = record_key(new, *args)
            r["key"], r["model_fingerprint"] = keymap[r["key"]], new
        if r["key"] in seen:
            dups += 1
            continue
        seen.add(r["key"])
        out.append(r)
    gens.write_text("".join(json.dumps(r) + "\n" for r in out))
    notes = folder / "annotations.jsonl"
    if notes.is_file():
        kept, have = [], set()
        for line in notes.open():
            a = json.loads(line)
            rec, _, kind = a["key"].partition("|")
            for o in old:
                kind = kind.replace(o, new)
            a["key"] = f"{keymap.get(rec, rec)}|{kind}"
            if a["key"] not in have:
                have.add(a["key"])
                kept.append(a)
        notes.write_text("".join(json.dumps(a) + "\n" for a in kept))
    return len(keymap), dups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--old", action="append", required=True, help="an old model fingerprint")
    a = ap.parse_args()
    new = model_fingerprint(load_model(a.model)[0])
    for folder in a.folders:
        n, dups = rekey(folder, set(a.old), new)
        print(f"{folder}: {n} records re-keyed to {new}, {dups} duplicates dropped")


if __name__ == "__main__":
    main()
