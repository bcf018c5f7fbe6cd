"""An append-only JSONL store of records keyed by ``record["key"]``, safe to resume.

Every record is written as one line and flushed at once; a crash can only tear the last line,
which is dropped (and cut from the file) when the store is opened again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None


class JsonlStore:
    """Records by key, backed by an append-only JSONL file, locked while open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.dropped_torn_line = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        if fcntl is not None:
            try:  # one writer at a time: a second run on the same folder stops here
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self._f.close()
                raise ValueError(f"{self.path} is in use by another run; wait for it to "
                                 "finish or use another output folder") from exc
        try:
            self._load()
        except ValueError:
            self.close()
            raise

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end, pos, n = 0, 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            line, n = data[pos:end], n + 1
            try:
                rec = json.loads(line.decode("utf-8")) if line.strip() else None
                if rec is not None and (not isinstance(rec, dict) or "key" not in rec):
                    raise ValueError("not a record")
            except (UnicodeDecodeError, ValueError) as exc:
                if nl < 0 or data[end:].strip() == b"":  # the last line, torn by a crash
                    self.dropped_torn_line = True
                    break
                raise ValueError(f"{self.path}:{n}: corrupt record ({exc}); delete this line "
                                 "or the file to regenerate it") from exc
            if nl < 0:  # a complete JSON object without its newline: keep, restore the newline
                self._f.write("\n")
                self._f.flush()
            if rec is not None:
                self.records.setdefault(rec["key"], rec)
            good_end = end
            pos = end
        if self.dropped_torn_line:
            with self.path.open("r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def get(self, key: str, default=None):
        return self.records.get(key, default)

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        """Write one record (it must have a ``key``) and flush it to the file."""
        if "key" not in record:
            raise ValueError("JsonlStore.append: record has no 'key'")
        if self._f is None:
            raise ValueError(f"JsonlStore: {self.path} is closed")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.records.setdefault(record["key"], record)

    def sync(self) -> None:
        """Force written records to disk (call once per batch)."""
        if self._f is not None:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
