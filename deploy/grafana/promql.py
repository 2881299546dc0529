"""A small PromQL parser and evaluator for the expressions of Fovea's dashboard and alert rules.

It follows the grammar of Prometheus's query language (operators and their precedence, vector selectors with
label matchers, range selectors, aggregations with by/without, vector matching with on/ignoring) for the subset
these files use, and refuses anything else, so that a typo or an unknown function fails a test offline. The
evaluator computes instant vectors from scraped samples (render.py draws the dashboard with it); it is not a
Prometheus: no staleness handling, lookback or extrapolation of rates to the window's edges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

FUNCTIONS = {"rate": 1, "irate": 1, "increase": 1, "histogram_quantile": 2, "time": 0, "abs": 1, "clamp_min": 2}
RANGE_FUNCTIONS = {"rate", "irate", "increase"}
AGGREGATIONS = {"sum", "min", "max", "avg", "count"}
SET_OPS = {"and", "or", "unless"}
KEYWORDS = AGGREGATIONS | SET_OPS | {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
# Binary operators from lowest to highest precedence, as in Prometheus.
LEVELS = [{"or"}, {"and", "unless"}, {"==", "!=", ">", "<", ">=", "<="}, {"+", "-"}, {"*", "/", "%"}]
COMPARISONS = LEVELS[2]
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
TOKEN = re.compile(
    r"""\s*(?:
    (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z_:]))
    |(?P<duration>\[[^\]]*\])
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%<>=(){},])
    )""",
    re.VERBOSE,
)
UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


class PromQLError(ValueError):
    pass


def tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"unexpected character at {pos}: {text[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def seconds(duration: str) -> float:
    if not DURATION.match(duration):
        raise PromQLError(f"bad duration {duration!r}")
    return sum(float(n) * UNITS_S[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))


# ---- syntax tree ----------------------------------------------------------


@dataclass
class Number:
    value: float


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)
    range_s: float | None = None


@dataclass
class Call:
    name: str
    args: list[Node]


@dataclass
class Aggregate:
    op: str
    expr: Node
    labels: list[str] = field(default_factory=list)
    without: bool = False


@dataclass
class Binary:
    op: str
    left: Node
    right: Node
    on: list[str] | None = None  # on(...) labels; None: match on all labels but those in ignoring
    ignoring: list[str] = field(default_factory=list)
    bool_: bool = False


@dataclass
class Negate:
    expr: Node


Node = Number | Selector | Call | Aggregate | Binary | Negate


class Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokens(text)
        self.i = 0

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        k, v = self.peek()
        if (value is not None and v != value) or (kind is not None and k != kind):
            raise PromQLError(f"expected {value or kind} at token {self.i}, got {v or 'end'!r}")
        self.i += 1
        return v

    def parse(self) -> Node:
        node = self.binary(0)
        if self.peek()[0] != "eof":
            raise PromQLError(f"unexpected {self.peek()[1]!r} after a complete expression")
        return node

    def binary(self, level: int) -> Node:
        if level == len(LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[1] in LEVELS[level] and self.peek()[0] in ("op", "ident"):
            op = self.take()
            node = Binary(op, left, Number(0))
            if op in COMPARISONS and self.peek()[1] == "bool":
                self.take()
                node.bool_ = True
            if self.peek()[1] in ("on", "ignoring"):
                which = self.take()
                names = self.label_list()
                if which == "on":
                    node.on = names
                else:
                    node.ignoring = names
                if self.peek()[1] in ("group_left", "group_right"):
                    raise PromQLError("group_left/group_right are not supported here")
            node.right = self.binary(level + 1)
            left = node
        return left

    def unary(self) -> Node:
        if self.peek()[1] in ("-", "+"):
            sign = self.take()
            inner = self.unary()
            return Negate(inner) if sign == "-" else inner
        return self.primary()

    def label_list(self) -> list[str]:
        self.take("(")
        names: list[str] = []
        while self.peek()[1] != ")":
            names.append(self.take(kind="ident"))
            if self.peek()[1] == ",":
                self.take(",")
        self.take(")")
        return names

    def primary(self) -> Node:
        kind, value = self.peek()
        if kind == "number":
            self.take()
            return Number(float(value))
        if value == "(":
            self.take("(")
            node = self.binary(0)
            self.take(")")
            return node
        if value == "{":
            return self.selector("")
        if kind != "ident":
            raise PromQLError(f"unexpected {value or 'end'!r}")
        if value in AGGREGATIONS:
            return self.aggregate()
        if self.peek(1)[1] == "(":
            return self.call()
        if value in KEYWORDS:
            raise PromQLError(f"unexpected keyword {value!r}")
        return self.selector(self.take())

    def aggregate(self) -> Node:
        node = Aggregate(self.take(), Number(0))
        if self.peek()[1] in ("by", "without"):
            node.without = self.take() == "without"
            node.labels = self.label_list()
        self.take("(")
        node.expr = self.binary(0)
        self.take(")")
        if self.peek()[1] in ("by", "without"):
            node.without = self.take() == "without"
            node.labels = self.label_list()
        return node

    def call(self) -> Node:
        name = self.take()
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name!r}")
        self.take("(")
        args: list[Node] = []
        while self.peek()[1] != ")":
            args.append(self.binary(0))
            if self.peek()[1] == ",":
                self.take(",")
            elif self.peek()[1] != ")":
                raise PromQLError(f"expected , or ) in {name}(), got {self.peek()[1]!r}")
        self.take(")")
        if len(args) != FUNCTIONS[name]:
            raise PromQLError(f"{name}() takes {FUNCTIONS[name]} argument(s), got {len(args)}")
        wants_range = [isinstance(a, Selector) and a.range_s is not None for a in args]
        if name in RANGE_FUNCTIONS and not wants_range[0]:
            raise PromQLError(f"{name}() needs a range vector, e.g. {name}(metric[5m])")
        if name not in RANGE_FUNCTIONS and any(wants_range):
            raise PromQLError(f"{name}() takes no range vector")
        return Call(name, args)

    def selector(self, name: str) -> Selector:
        matchers: list[tuple[str, str, str]] = []
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                label = self.take(kind="ident")
                op = self.take(kind="op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad label matcher operator {op!r}")
                raw = self.take(kind="string")
                matchers.append((label, op, raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")))
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
        if not name and not any(op in ("=", "=~") and v for _, op, v in matchers):
            raise PromQLError("a selector needs a metric name or a non-empty matcher")
        node = Selector(name, matchers)
        if self.peek()[0] == "duration":
            node.range_s = seconds(self.take()[1:-1].strip())
        if self.peek()[1] == "offset":
            raise PromQLError("offset is not supported here")
        return node


def parse(text: str) -> Node:
    return Parser(text).parse()


def walk(node: Node) -> Iterator[Node]:
    yield node
    children: list[Node] = []
    if isinstance(node, Call):
        children = node.args
    elif isinstance(node, Aggregate | Negate):
        children = [node.expr]
    elif isinstance(node, Binary):
        children = [node.left, node.right]
    for child in children:
        yield from walk(child)


def metric_names(text: str) -> set[str]:
    """Names of the metrics an expression selects (as written: a histogram's _bucket series included)."""
    return {n.name for n in walk(parse(text)) if isinstance(n, Selector) and n.name}


# ---- evaluation -----------------------------------------------------------

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]
Sample = tuple[str, Labels, float]


@dataclass
class Scrapes:
    """Samples by scrape time: [(t, [(name, labels, value), ...]), ...], oldest first."""

    points: list[tuple[float, list[Sample]]]

    def instant(self, sel: Selector, t: float) -> Vector:
        for ts, samples in reversed(self.points):
            if ts <= t:
                return {labels: v for name, labels, v in samples if matches(sel, name, labels)}
        return {}

    def window(self, sel: Selector, t: float) -> dict[Labels, list[tuple[float, float]]]:
        out: dict[Labels, list[tuple[float, float]]] = {}
        for ts, samples in self.points:
            if t - (sel.range_s or 0) <= ts <= t:
                for name, labels, v in samples:
                    if matches(sel, name, labels):
                        out.setdefault(labels, []).append((ts, v))
        return out


def matches(sel: Selector, name: str, labels: Labels) -> bool:
    if sel.name and name != sel.name:
        return False
    d = dict(labels)
    for label, op, value in sel.matchers:
        have = name if label == "__name__" else d.get(label, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and bool(re.fullmatch(value, have)) != (op == "=~"):
            return False
    return True


def _increase(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (_, a), (_, b) in zip(points, points[1:], strict=False):
        total += b - a if b >= a else b  # a counter reset starts from zero
    return total


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket the rank falls in."""
    buckets.sort()
    if len(buckets) < 2 or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == math.inf:
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / (count - prev_count) if count > prev_count else 0)
        prev_le, prev_count = le, count
    return math.nan


def _key(labels: Labels, on: list[str] | None, ignoring: list[str]) -> Labels:
    if on is not None:
        return frozenset((k, v) for k, v in labels if k in on)
    return frozenset((k, v) for k, v in labels if k not in ignoring and k != "__name__")


OPS: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),
    "%": lambda a, b: math.fmod(a, b) if b else math.nan,
    "==": lambda a, b: float(a == b),
    "!=": lambda a, b: float(a != b),
    ">": lambda a, b: float(a > b),
    "<": lambda a, b: float(a < b),
    ">=": lambda a, b: float(a >= b),
    "<=": lambda a, b: float(a <= b),
}


def evaluate(node: Node, data: Scrapes, t: float) -> Vector | float:
    """An instant vector (labels -> value) or a scalar, at time t."""
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Negate):
        inner = evaluate(node.expr, data, t)
        return -inner if isinstance(inner, float) else {k: -v for k, v in inner.items()}
    if isinstance(node, Selector):
        return data.instant(node, t)
    if isinstance(node, Call):
        return _call(node, data, t)
    if isinstance(node, Aggregate):
        return _aggregate(node, data, t)
    return _binary(node, data, t)


def _call(node: Call, data: Scrapes, t: float) -> Vector | float:
    if node.name == "time":
        return t
    if node.name in RANGE_FUNCTIONS:
        sel = node.args[0]
        assert isinstance(sel, Selector)
        out: Vector = {}
        for labels, points in data.window(sel, t).items():
            if len(points) < 2 or points[-1][0] <= points[0][0]:
                continue
            span = points[-1][0] - points[0][0]
            if node.name == "irate":
                (_, a), (_, b) = points[-2], points[-1]
                out[_drop_name(labels)] = (b - a if b >= a else b) / (points[-1][0] - points[-2][0])
            else:
                inc = _increase(points)
                out[_drop_name(labels)] = inc / span if node.name == "rate" else inc
        return out
    if node.name == "histogram_quantile":
        q = evaluate(node.args[0], data, t)
        vec = evaluate(node.args[1], data, t)
        if not isinstance(q, float) or isinstance(vec, float):
            raise PromQLError("histogram_quantile(scalar, vector)")
        groups: dict[Labels, list[tuple[float, float]]] = {}
        for labels, v in vec.items():
            d = dict(labels)
            le = d.pop("le", None)
            if le is not None:
                groups.setdefault(frozenset(d.items()), []).append((float(le), v))
        return {k: _quantile(q, b) for k, b in groups.items()}
    arg = evaluate(node.args[0], data, t)
    if node.name == "abs":
        return abs(arg) if isinstance(arg, float) else {k: abs(v) for k, v in arg.items()}
    low = evaluate(node.args[1], data, t)
    assert isinstance(low, float)
    return max(arg, low) if isinstance(arg, float) else {k: max(v, low) for k, v in arg.items()}


def _drop_name(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _aggregate(node: Aggregate, data: Scrapes, t: float) -> Vector:
    vec = evaluate(node.expr, data, t)
    if isinstance(vec, float):
        raise PromQLError(f"{node.op}() needs a vector")
    groups: dict[Labels, list[float]] = {}
    for labels, v in vec.items():
        if node.without:
            key = frozenset((k, val) for k, val in labels if k not in node.labels and k != "__name__")
        else:
            key = frozenset((k, val) for k, val in labels if k in node.labels)
        groups.setdefault(key, []).append(v)
    fold: dict[str, Callable[[list[float]], float]] = {
        "sum": sum,
        "min": min,
        "max": max,
        "avg": lambda xs: sum(xs) / len(xs),
        "count": lambda xs: float(len(xs)),
    }
    return {k: fold[node.op](vs) for k, vs in groups.items()}


def _binary(node: Binary, data: Scrapes, t: float) -> Vector | float:
    left, right = evaluate(node.left, data, t), evaluate(node.right, data, t)
    if node.op in SET_OPS:
        if isinstance(left, float) or isinstance(right, float):
            raise PromQLError(f"{node.op} works on vectors only")
        keys = {_key(k, node.on, node.ignoring) for k in right}
        if node.op == "and":
            return {k: v for k, v in left.items() if _key(k, node.on, node.ignoring) in keys}
        if node.op == "unless":
            return {k: v for k, v in left.items() if _key(k, node.on, node.ignoring) not in keys}
        mine = {_key(k, node.on, node.ignoring) for k in left}
        return {**left, **{k: v for k, v in right.items() if _key(k, node.on, node.ignoring) not in mine}}
    fn = OPS[node.op]
    filters = node.op in COMPARISONS and not node.bool_
    if isinstance(left, float) and isinstance(right, float):
        return fn(left, right)
    if isinstance(left, float) or isinstance(right, float):
        scalar, vec, scalar_left = (left, right, True) if isinstance(left, float) else (right, left, False)
        assert isinstance(vec, dict) and isinstance(scalar, float)
        out: Vector = {}
        for k, v in vec.items():
            r = fn(scalar, v) if scalar_left else fn(v, scalar)
            if filters:
                if r:
                    out[k] = v
            else:
                out[_drop_name(k)] = r
        return out
    by_key = {_key(k, node.on, node.ignoring): v for k, v in right.items()}
    result: Vector = {}
    for k, v in left.items():
        other = by_key.get(_key(k, node.on, node.ignoring))
        if other is None:
            continue
        r = fn(v, other)
        if filters:
            if r:
                result[k] = v
        else:
            result[_key(k, node.on, node.ignoring) if node.on is not None else _drop_name(k)] = r
    return result


def parse_exposition(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (the text format's sample lines; comments skipped)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.append((s.name, frozenset(s.labels.items()), float(s.value)))
    return out
