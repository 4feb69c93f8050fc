"""Reading the Grafana dashboard (deploy/grafana/edgeloop.json) for its tests: the PromQL
of every panel, the metric names each query selects, and the sample names a service's
/metrics exposes, so a test can say which panel asks for a series nobody exports.

Names are compared as Prometheus stores them: the sample names of the text exposition
format (a counter family `x` is scraped as `x_total`, a histogram `h` as `h_bucket`,
`h_count`, `h_sum`), never the family names of the `# TYPE` lines. A labelled metric no
code has observed yet has `# HELP`/`# TYPE` lines but no sample: Prometheus stores
nothing for it, and a panel over it stays empty, so it does not count as exported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "edgeloop.json"

# PromQL keywords that read like identifiers (PromQL's lexer, promql/parser/lex.go).
_KEYWORDS = frozenset(
    {"and", "or", "unless", "atan2", "by", "without", "on", "ignoring", "group_left",
     "group_right", "bool", "offset", "inf", "nan"}
)  # fmt: skip
# Aggregation operators are keywords too: `sum by (le) (x)` as well as `sum(x) by (le)`.
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
     "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)  # fmt: skip
# Keywords followed by a parenthesised list of label names, not expressions.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)[A-Za-z0-9_]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z0-9_]+|\[\[[^\]]*\]\]")  # Grafana's forms
_NAME_MATCHER = re.compile(r'__name__\s*=\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)')


@dataclass(frozen=True)
class Selector:
    """A metric name a query selects, with the functions it sits inside (outermost first)."""

    name: str
    functions: tuple[str, ...]


def selectors(expr: str) -> list[Selector]:
    """The metric names `expr` selects, in order, with their enclosing function calls.

    Identifiers are metric names unless they are function calls (followed by `(`),
    keywords and aggregation operators, label names inside `{...}` or after `by`/
    `without`/`on`/`ignoring`/`group_left`/`group_right`, or parts of strings, durations
    (`[5m]`, `offset 1h`), numbers or Grafana variables (`$__rate_interval`, `${cohort}`).
    A `{__name__="x"}` matcher selects `x`.

    Args:
        expr: one PromQL expression (Grafana variables allowed).

    Returns:
        One `Selector` per metric name written in the expression.

    Raises:
        ValueError: unbalanced brackets, an unterminated string, an aggregation without
            its expression.
    """
    scan = _Scanner(expr)
    while scan.i < len(expr):
        scan.step()
    if scan.stack:
        raise ValueError(f"unbalanced '(' in {expr!r}")
    return scan.out


class _Scanner:
    """One pass over a PromQL expression; `step` consumes one token."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.i = 0
        self.out: list[Selector] = []
        self.stack: list[str] = []  # per open "(": the function name, "" for grouping

    def step(self) -> None:
        expr, i = self.expr, self.i
        c = expr[i]
        if c == "#":  # a comment runs to the end of the line
            end = expr.find("\n", i)
            self.i = len(expr) if end < 0 else end
        elif c in "\"'`":
            self.i = _string_end(expr, i)
        elif c == "$" or expr.startswith("[[", i):
            m = _VARIABLE.match(expr, i)
            self.i = m.end() if m else i + 1
        elif c == "{":
            end = _closing(expr, i, "{", "}")
            m = _NAME_MATCHER.search(expr, i, end)
            if m is not None:
                self.out.append(Selector(m.group(1)[1:-1], tuple(self.stack)))
            self.i = end + 1
        elif c == "[":  # a range or subquery duration
            self.i = _closing(expr, i, "[", "]") + 1
        elif c in "()":
            self._paren(c)
        elif c.isdigit() or (c == "." and expr[i + 1 : i + 2].isdigit()):
            m = _NUMBER.match(expr, i)
            self.i = m.end() if m else i + 1
        elif m := _IDENT.match(expr, i):
            self._word(m.group(0), m.end())
        else:  # whitespace, operators, commas, @
            self.i = i + 1

    def _paren(self, c: str) -> None:
        if c == "(":
            self.stack.append("")
        elif not self.stack:
            raise ValueError(f"unbalanced ')' at {self.i} in {self.expr!r}")
        else:
            self.stack.pop()
        self.i += 1

    def _word(self, word: str, end: int) -> None:
        expr, n = self.expr, len(self.expr)
        self.i = end
        j = _skip_space(expr, end)
        lower = word.lower()
        if lower in _LABEL_LISTS:
            if j < n and expr[j] == "(":
                self.i = _closing(expr, j, "(", ")") + 1
        elif lower in _AGGREGATIONS:
            if expr.startswith(("by", "without"), j):  # `sum by (le) (...)`
                k = _skip_space(expr, j + (2 if expr.startswith("by", j) else 7))
                j = _skip_space(expr, _closing(expr, k, "(", ")") + 1)
            if j >= n or expr[j] != "(":
                raise ValueError(f"{word} without its expression at {end} in {expr!r}")
            self.stack.append(lower)
            self.i = j + 1
        elif lower in _KEYWORDS:
            pass
        elif j < n and expr[j] == "(":
            self.stack.append(word)
            self.i = j + 1
        else:
            self.out.append(Selector(word, tuple(self.stack)))


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (see `selectors`)."""
    return {s.name for s in selectors(expr)}


def _skip_space(expr: str, i: int) -> int:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return i


def _string_end(expr: str, i: int) -> int:
    m = _STRING.match(expr, i)
    if m is None:
        raise ValueError(f"unterminated string at {i} in {expr!r}")
    return m.end()


def _closing(expr: str, start: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at `start`, skipping strings."""
    depth, i = 0, start
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _string_end(expr, i)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {open_!r} at {start} in {expr!r}")


@dataclass(frozen=True)
class Query:
    panel: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard JSON model."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    out = [
        Query(str(p.get("title", "")), str(t["expr"]))
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, Mapping) else str(q or "")
        # label_values(metric, label): the metric is what the variable needs.
        m = re.fullmatch(r"\s*label_values\(\s*(.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", text)
        out.append(Query(f"variable ${var['name']}", m.group(1) if m else text))
    return out


def unknown_metrics(dashboard: Mapping[str, Any], exported: set[str]) -> list[tuple[str, str]]:
    """(panel, metric) for every metric a query selects that is not in `exported`."""
    return sorted(
        {
            (q.panel, name)
            for q in queries(dashboard)
            for name in metric_names(q.expr)
            if name not in exported
        }
    )


def type_problems(dashboard: Mapping[str, Any], declared: Mapping[str, str]) -> list[str]:
    """PromQL that does not fit the metric types in `declared` (sample name -> type):
    rate()/irate()/increase() over anything but a counter or a histogram's series, a
    counter charted raw, histogram_quantile() over anything but `_bucket` series, or
    aggregated by labels that leave out `le`. One line per problem, panel first."""
    problems = []
    for q in queries(dashboard):
        for sel in selectors(q.expr):
            kind = declared.get(sel.name)
            ranged = sorted({"rate", "irate", "increase"} & set(sel.functions))
            if ranged and kind not in ("counter", "histogram"):
                problems.append(f"{q.panel}: {'/'.join(ranged)} over {kind} {sel.name}")
            elif not ranged and kind == "counter":
                problems.append(f"{q.panel}: counter {sel.name} charted without rate/increase")
            if "histogram_quantile" in sel.functions and not sel.name.endswith("_bucket"):
                problems.append(f"{q.panel}: histogram_quantile over {sel.name}")
        for inner in re.findall(r"histogram_quantile\((.*)", q.expr):
            groups = re.findall(r"\bby\s*\(([^)]*)\)", inner)
            if groups and "le" not in {g.strip() for g in groups[0].split(",")}:
                problems.append(f"{q.panel}: histogram_quantile aggregated without le")
    return problems


def exposition_samples(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (lines with a value, not `#` lines)."""
    names = set()
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            m = _IDENT.match(line)
            if m is not None:
                names.add(m.group(0))
    return names


# Sample suffixes per family type, as the text format writes them (prometheus_client's
# family names carry no `_total`; the exposition adds it). `_created` is exported too
# but no panel should chart it.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


def declared_samples(registry: Any) -> dict[str, str]:
    """Sample name -> family type for every collector of a prometheus_client registry,
    observed or not (what the service can export)."""
    out = {}
    for family in registry.collect():
        for suffix in _SUFFIXES[family.type]:
            out[family.name + suffix] = family.type
    return out
