"""Put the committed files' numbers back into the docs that quote them (docs/quotes.toml), after a new recording:

    .venv/bin/python scripts/requote_docs.py            # show what would change
    .venv/bin/python scripts/requote_docs.py --write    # change the docs

For each quote whose doc no longer says what its file holds, the doc's words around the numbers are found (the quote's
text with any number where each {} stands, line breaks as they are in the doc) and only the numbers are replaced, so a
doc's line wrapping stays. A quote whose words are not found once is listed for a person to mend: its words changed,
or they stand twice. Read the prose around every changed number afterwards: a claim such as "below 1" or "not told
apart" is a person's to re-check, not this script's. tests/test_doc_quotes.py is the check; this only saves typing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_doc_quotes import doc_text, quotes, raw_values, rendered  # noqa: E402

NUMBER = r"(-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)"


def words_pattern(text: str) -> re.Pattern:
    """The quote's text as a pattern over the raw doc: each {} any number, each run of spaces any whitespace."""
    return re.compile(NUMBER.join(r"\s+".join(map(re.escape, re.split(r"\s+", part))) for part in text.split("{}")))


def requote(write: bool) -> int:
    unfound = []
    changed = {}
    for quote in quotes():
        path = REPO / quote["file"]
        if not path.exists():
            continue
        values = raw_values(quote, path)
        text = rendered(quote, values)
        if text in doc_text(quote["doc"]):
            continue
        doc = REPO / quote["doc"]
        raw = changed.get(doc, doc.read_text())
        matches = list(words_pattern(quote["text"]).finditer(raw))
        if len(matches) != 1:
            unfound.append(f"{quote['doc']}: {len(matches)} places say {quote['text']!r}; it should say {text!r}")
            continue
        # the numbers as rendered, one per {}: the text rendered with a mark either side of each
        numbers = rendered({**quote, "text": quote["text"].replace("{}", "\0{}\0")}, values).split("\0")[1::2]
        match = matches[0]
        pieces, last = [], 0
        for group, number in enumerate(numbers, start=1):
            pieces += [raw[last:match.start(group)], number]
            last = match.end(group)
        raw = "".join(pieces) + raw[last:]
        print(f"{quote['doc']}: {match.group(0)!r}\n    -> {text!r}")
        changed[doc] = raw
    if write:
        for doc, raw in changed.items():
            doc.write_text(raw)
    for line in unfound:
        print(f"not found: {line}", file=sys.stderr)
    print(f"{len(changed)} docs {'changed' if write else 'would change (--write to change them)'}; "
          f"{len(unfound)} quotes for a person to mend")
    return 1 if unfound else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="change the docs (default: only show the changes)")
    return requote(parser.parse_args().write)


if __name__ == "__main__":
    sys.exit(main())
