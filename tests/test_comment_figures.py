"""Code comments say why, never what was measured: a figure measured on some machine goes stale with the next
recording and belongs in docs/, beside the command and committed folder that reproduce it (the project's rules).

What counts as a measured figure: a sentence of a comment or docstring (in bench/, alure/, and the shell scripts of
slurm/ and scripts/) that holds a number with a unit or a speed-up ('20 ms', '245 MiB', '1.2-3.2x', '27%', '0.47/0.72')
*and* a word that ties it to a run ('took', 'held', 'measured', 'faster', 'on the 2-core reference machine', ...). A
definition ('4 MiB keeps small tensors fused', 'the 95% interval') has no such word and passes."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"(?<![\w.])~?\d[\d,]*(?:\.\d+)?(?:\s?[-/]\s?~?\d+(?:\.\d+)?)*\s?"
                    r"(?:%|x\b|ms\b|us\b|s\b|seconds?\b|minutes?\b|min\b|hours?\b|[KMG]iB\b|[KMG]B\b|Gbit/s)"
                    r"|(?<![\w.])\d\.\d+\s?/\s?\d\.\d+(?![\w.])")
"""A number with a unit or an x (ranges and pairs too), or a pair of fractions ('0.47/0.72')."""
MEASURED = re.compile(r"\b(?:took|held(?= ~?\d)|faster|slower|reached|ran (?:at|in|for)|measured(?=[),;.]| at| on| here| about)"
                      r"|reference machine|this machine)(?!\w)", re.I)
"""Words that make a figure a result of some run rather than a definition."""


def comment_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring-like string statement of a Python file, or every # comment of a
    shell script."""
    src = path.read_text()
    if path.suffix == ".sh":
        return [(i, line.split("#", 1)[1]) for i, line in enumerate(src.splitlines(), 1)
                if line.lstrip().startswith("#") and not line.startswith("#!")]
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(src).readline)
             if tok.type == tokenize.COMMENT]
    # A block of # comments reads as one text: join consecutive lines.
    joined: list[tuple[int, str]] = []
    for line, text in found:
        if joined and joined[-1][0] + joined[-1][1].count("\n") + 1 == line:
            joined[-1] = (joined[-1][0], joined[-1][1] + "\n" + text.lstrip("# "))
        else:
            joined.append((line, text.lstrip("# ")))
    strings = [(node.lineno, node.value.value) for node in ast.walk(ast.parse(src))
               if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               and isinstance(node.value.value, str)]
    return joined + strings


def measured_figures(text: str) -> list[str]:
    """The sentences of `text` that quote a measured figure."""
    sentences = re.split(r"(?<=[.;:])\s+(?=[A-Z(])|\n\s*\n", " ".join(text.split()))
    return [s for s in sentences if FIGURE.search(s) and MEASURED.search(s)]


def sources() -> list[Path]:
    files = [p for pkg in ("bench", "alure") for p in sorted((ROOT / pkg).rglob("*.py"))]
    return files + sorted((ROOT / "slurm").rglob("*.sh")) + sorted((ROOT / "scripts").rglob("*.sh"))


def test_tells_a_measured_figure_from_a_definition():
    assert measured_figures("Fused: updating it took ~20 ms per step with fused=True.")
    assert measured_figures("One rank held 245 MiB on the 2-core reference machine.")
    assert measured_figures("1.1-1.7x faster Horovod collectives from 2 MiB.")
    assert measured_figures("held 4/8 MiB allreduces to 0.47/0.72 of raw MPI")
    assert not measured_figures("4 MiB keeps small tensors fused and sends large ones as they are.")
    assert not measured_figures("The median step time with its 95% interval.")
    assert not measured_figures("Fused, because it is faster than the for-loop (docs/modes.md).")


def test_no_comment_quotes_a_measured_figure():
    found = [f"{path.relative_to(ROOT)}:{line}: {sentence[:160]}" for path in sources()
             for line, text in comment_texts(path) for sentence in measured_figures(text)]
    assert not found, "measured figures in comments (move them to docs/, keep the why):\n" + "\n".join(found)
