"""The numbers the docs quote, read from the committed files they come from (docs/quotes.toml), so docs cannot drift
from the results: each quote's text, with the file's value put in, must stand in its doc.

A quote whose file is not committed yet is pending: `scripts/record_references.sh` (make references) writes it, and
until then the quote skips with that reason; once the file is there it is checked like any other, so the next
recording makes the docs be quoted again from it.
"""
from __future__ import annotations

import json
import re
import tomllib
from functools import cache
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
QUOTES = REPO / "docs" / "quotes.toml"
PENDING_REASON = "recorded by make references"
AGGREGATES = {"min": min, "max": max, "median": lambda v: float(pd.Series(v).median())}


@cache
def quotes() -> list[dict]:
    return tomllib.loads(QUOTES.read_text())["quote"]


@cache
def doc_text(doc: str) -> str:
    """The doc with its line breaks and runs of spaces made one space: a quote may wrap over lines."""
    return re.sub(r"\s+", " ", (REPO / doc).read_text())


@cache
def table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def per_value(setting, count: int) -> list:
    """A quote's `scale`, `fmt` or `where`: one for every value, or a list of one per value."""
    if isinstance(setting, list):
        assert len(setting) == count, f"{setting}: one per value ({count})"
        return setting
    return [setting] * count


def raw_values(quote: dict, path: Path) -> list[float]:
    """The quote's numbers as its file holds them: per column, the rows `where` selects (a csv; a list: one query per
    column), or the value at each `key` (a json path, parts split by "/"); several rows are one value only if they agree (a point's columns repeat
    on its repeats' rows), or `COLUMN:agg` says how to make them one."""
    if path.suffix == ".json":
        found = []
        for key in quote["keys"]:
            value = json.loads(path.read_text())
            for part in key.split("/"):
                value = value[int(part)] if isinstance(value, list) else value[part]
            found.append(float(value))
        return found
    wheres = per_value(quote.get("where"), len(quote["columns"]))
    found = []
    for column, where in zip(quote["columns"], wheres):
        rows = table(path).query(where) if where else table(path)
        assert len(rows), f"{quote['file']}: no row where {where}"
        column, _, agg = column.partition(":")
        selected = list(rows[column].dropna().astype(float))
        assert selected, f"{quote['file']}: column {column} is empty where {where}"
        if agg:
            found.append(AGGREGATES[agg](selected))
        else:
            assert len(set(selected)) == 1, (f"{quote['file']}: {column} where {where} has several values "
                                             f"{sorted(set(selected))}: narrow `where` or give COLUMN:min|max|median")
            found.append(selected[0])
    return found


def rendered(quote: dict, values: list[float]) -> str:
    """The quote's text with its values in: each divided into `numerator` if given, times its `scale`, formatted by
    its `fmt` (a format spec, e.g. .2f)."""
    assert quote["text"].count("{}") == len(values), f"{quote['text']!r}: one {{}} per value ({len(values)})"
    if "numerator" in quote:
        values = [quote["numerator"] / v for v in values]
    scales = per_value(quote.get("scale", 1), len(values))
    formats = per_value(quote.get("fmt", ".3g"), len(values))
    return quote["text"].format(*(format(v * k, f) for v, k, f in zip(values, scales, formats)))


def check(quote: dict) -> None:
    path = REPO / quote["file"]
    if not path.exists():
        if quote.get("pending"):
            pytest.skip(f"{PENDING_REASON}: {quote['file']} is not committed yet")
        pytest.fail(f"{quote['file']} missing: the quote is not pending, so its file must be committed")
    text = rendered(quote, raw_values(quote, path))
    assert text in doc_text(quote["doc"]), (
        f"{quote['doc']} should say {text!r} ({quote['file']}); quote it again from the file, or mend the entry "
        f"in docs/quotes.toml")


@pytest.mark.parametrize("quote", quotes(), ids=lambda q: f"{q['doc']}:{q['text']}")
def test_the_doc_says_what_the_committed_file_holds(quote):
    check(quote)


def test_every_quote_names_an_existing_doc_and_a_results_file_and_committed_ones_are_not_pending():
    for q in quotes():
        assert (REPO / q["doc"]).is_file(), q
        assert q["file"].startswith("results/"), q
        assert ("where" in q or "columns" in q) != ("keys" in q), f"a csv quote has columns, a json one keys: {q}"
        if q.get("pending"):
            # a pending file is one the recording script writes: the script must name its folder
            assert str(Path(q["file"]).parent) in (REPO / "scripts/record_references.sh").read_text(), q
    assert any(not q.get("pending") for q in quotes())


def test_a_drifted_doc_or_a_changed_file_fails_the_check(tmp_path, monkeypatch):
    """The check can fail: the same quote against a doc that says another number, or a file that holds one."""
    summary = tmp_path / "results" / "s" / "summary.csv"
    summary.parent.mkdir(parents=True)
    summary.write_text("mode,np,point_efficiency\ndense-reduce,2,0.7349\ndense-reduce,2,0.7349\n")
    (tmp_path / "doc.md").write_text("dense-reduce\nreaches 0.73 at np=2\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    doc_text.cache_clear()
    table.cache_clear()
    quote = {"doc": "doc.md", "text": "dense-reduce reaches {} at np=2", "file": "results/s/summary.csv",
             "where": "mode == 'dense-reduce' and np == 2", "columns": ["point_efficiency"], "fmt": ".2f"}
    try:
        check(quote)  # says it, over a line break
        with pytest.raises(AssertionError, match="should say 'dense-reduce reaches 0.74"):
            summary.write_text("mode,np,point_efficiency\ndense-reduce,2,0.741\n")
            table.cache_clear()
            check(quote)
        with pytest.raises(AssertionError, match="several values"):
            summary.write_text("mode,np,point_efficiency\ndense-reduce,2,0.741\ndense-reduce,2,0.75\n")
            table.cache_clear()
            check(quote)
        with pytest.raises(pytest.skip.Exception, match=PENDING_REASON):
            check(quote | {"file": "results/none/summary.csv", "pending": True})
        with pytest.raises(pytest.fail.Exception, match="missing"):
            check(quote | {"file": "results/none/summary.csv"})
    finally:
        doc_text.cache_clear()
        table.cache_clear()


def test_requote_puts_the_files_numbers_back_keeping_the_docs_line_breaks(tmp_path, monkeypatch, capsys):
    """scripts/requote_docs.py replaces only the numbers of a drifted quote, where its words stand once."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("requote_docs", REPO / "scripts" / "requote_docs.py")
    requote_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(requote_docs)
    summary = tmp_path / "results" / "s" / "summary.csv"
    summary.parent.mkdir(parents=True)
    summary.write_text("mode,np,point_efficiency,efficiency_ci_low\ndense-reduce,2,0.741,0.70\nauto,2,0.5,0.4\n")
    doc = tmp_path / "doc.md"
    doc.write_text("dense-reduce reaches 0.73 [0.61,\n  low] at np=2; auto 0.9 at np=2, auto 0.9 at np=2\n")
    quote = {"doc": "doc.md", "text": "dense-reduce reaches {} [{}, low] at np=2", "file": "results/s/summary.csv",
             "where": "mode == 'dense-reduce' and np == 2", "columns": ["point_efficiency", "efficiency_ci_low"],
             "fmt": ".2f"}
    twice = {**quote, "text": "auto {} at np=2", "where": "mode == 'auto'", "columns": ["point_efficiency"]}
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    monkeypatch.setattr(requote_docs, "REPO", tmp_path)
    monkeypatch.setattr(requote_docs, "quotes", lambda: [quote, twice])
    doc_text.cache_clear()
    table.cache_clear()
    try:
        assert requote_docs.requote(write=False) == 1  # the auto quote stands twice: for a person
        assert "0.73 [0.61" in doc.read_text()  # without --write nothing changes
        assert requote_docs.requote(write=True) == 1
        assert doc.read_text() == "dense-reduce reaches 0.74 [0.70,\n  low] at np=2; auto 0.9 at np=2, auto 0.9 at np=2\n"
        assert "2 places say 'auto {} at np=2'" in capsys.readouterr().err
    finally:
        doc_text.cache_clear()
        table.cache_clear()
