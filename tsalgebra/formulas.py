"""Polynomial formulas as text: one circuit output per line, in named
inputs, with numbers and + - * / ^ ** ( ) only.  Read by the command line's
``verify`` (a formula file) and by :func:`tsalgebra.verify` (circuits given as
strings), so both refuse the same things the same way: the text is checked
before sympy sees it, so no other names can be evaluated and nothing can hang
or exhaust memory."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

__all__ = ["FORMULA_MAX_DEGREE", "FORMULA_MAX_TERMS", "QUOTE_CHARS", "parse_formulas"]

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op>\*\*|[-+*/^()]))")


def _names_in(line: str) -> list[str] | None:
    """The identifiers of a formula line, or None when it holds anything but
    numbers, identifiers, + - * / ^ ** ( ) and spaces."""
    names, pos = [], 0
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if m is None or m.end() == pos:
            return None if line[pos:].strip() else names
        if m.group("name"):
            names.append(m.group("name"))
        pos = m.end()
    return names


QUOTE_CHARS = 60  # an offending line is quoted this far: a data file passed by mistake is one long line
FORMULA_MAX_DEGREE = 64  # far above any model here (two attention layers: 25); (x+1)^400 is refused at once
FORMULA_MAX_TERMS = 100_000  # monomials of the expanded line: sympy expands 1e5 terms in about a second
FORMULA_MAX_DIGITS = 60  # digits of one literal
FORMULA_MAX_EXPONENT = 308  # decimal exponent of a literal: beyond it, not a float64 (and sympy may hang)


class _FormulaBound:
    """A recursive-descent reading of one formula line that bounds, before
    sympy sees it, the degree and the number of monomials of its expansion;
    ValueError (the message without the file:line) for what would hang or
    exhaust memory: huge literals, symbolic or huge exponents, division by a
    polynomial, an expansion beyond the limits."""

    def __init__(self, line: str, symbols: int) -> None:
        self.tokens = [m for m in _TOKEN.finditer(line) if m.group().strip()]
        self.pos, self.symbols = 0, symbols

    def peek(self) -> str | None:
        return self.tokens[self.pos].group().strip() if self.pos < len(self.tokens) else None

    def take(self) -> Any:
        self.pos += 1
        return self.tokens[self.pos - 1]

    def check(self) -> None:
        self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")

    def _terms(self, degree: int) -> float:
        """Monomials of degree <= ``degree`` in the symbols (log-safe float)."""
        return math.comb(self.symbols + degree, degree) if degree <= FORMULA_MAX_DEGREE else math.inf

    def _bounded(self, degree: int, terms: float) -> tuple[int, float, Any]:
        if degree > FORMULA_MAX_DEGREE:
            raise ValueError(f"degree {degree} exceeds {FORMULA_MAX_DEGREE}")
        terms = min(terms, self._terms(degree))
        if terms > FORMULA_MAX_TERMS:
            raise ValueError(f"its expansion may hold {terms:.3g} monomials (more than {FORMULA_MAX_TERMS:,})")
        return degree, terms, None

    def expr(self) -> tuple[int, float, Any]:
        d, t, _ = self.term()
        while self.peek() in ("+", "-"):
            self.take()
            d2, t2, _ = self.term()
            d, t, _ = self._bounded(max(d, d2), t + t2)
        return d, t, None

    def term(self) -> tuple[int, float, Any]:
        d, t, c = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take().group().strip()
            d2, t2, c2 = self.unary()
            if op == "/":
                if d2 > 0:
                    raise ValueError("division by a polynomial (a circuit is a polynomial)")
                continue
            d, t, c = *self._bounded(d + d2, t * t2)[:2], None
        return d, t, c

    def unary(self) -> tuple[int, float, Any]:
        if self.peek() in ("+", "-"):
            self.take()
        return self.power()

    def power(self) -> tuple[int, float, Any]:
        d, t, c = self.atom()
        if self.peek() in ("^", "**"):
            self.take()
            tok = self.take() if self.pos < len(self.tokens) else None
            if tok is None or not tok.group("num") or not tok.group("num").isdigit():
                raise ValueError("an exponent must be a non-negative integer literal")
            k = int(tok.group("num")) if len(tok.group("num")) < 6 else FORMULA_MAX_DEGREE + 1
            if d * k > FORMULA_MAX_DEGREE or (d == 0 and k > FORMULA_MAX_DEGREE):
                raise ValueError(f"power {tok.group('num')} (degree {d * k if d else k} exceeds {FORMULA_MAX_DEGREE})")
            return self._bounded(d * k, t ** k if k else 1)
        return d, t, c

    def atom(self) -> tuple[int, float, Any]:
        tok = self.take() if self.pos < len(self.tokens) else None
        if tok is None:
            raise ValueError("unexpected end of line")
        if tok.group("num"):
            mantissa, _, exponent = tok.group("num").lower().partition("e")
            if len(mantissa.replace(".", "")) > FORMULA_MAX_DIGITS:
                raise ValueError(f"a literal of more than {FORMULA_MAX_DIGITS} digits")
            if exponent and abs(int(exponent)) > FORMULA_MAX_EXPONENT:
                raise ValueError(f"the literal {tok.group('num')[:20]} is beyond float64 (exponent over "
                                 f"{FORMULA_MAX_EXPONENT})")
            return 0, 1, tok.group("num")
        if tok.group("name"):
            return 1, 1, None
        if tok.group().strip() == "(":
            inner = self.expr()
            if self.peek() != ")":
                raise ValueError("unbalanced parentheses")
            self.take()
            return inner
        raise ValueError(f"unexpected {tok.group().strip()!r}")


def _quoted(line: str) -> str:
    """``line`` for a message: its first QUOTE_CHARS characters (repr), and
    its length where it is longer (the whole line was copied into the error,
    and the command line's rewriting of the message ran over all of it)."""
    if len(line) <= QUOTE_CHARS:
        return repr(line)
    return f"{line[:QUOTE_CHARS]!r}... ({len(line):,} characters)"


def parse_formulas(text: str, names: Sequence[str], source: str = "<formulas>") -> list[Any]:
    """Polynomial formulas, one per non-empty line ('#' starts a comment),
    in the symbols ``names``, with numbers and + - * / ^ ** ( ) only.  The
    text is checked before sympy sees it, so no other names can be evaluated
    and nothing can hang or exhaust memory: literals, exponents, degree and
    the size of the expansion are bounded (:class:`_FormulaBound`), division
    only by constants.  Raises ValueError naming ``source`` and the line."""
    import sympy
    from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations

    symbols = {n: sympy.Symbol(n) for n in names}
    exprs = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        found = _names_in(line)
        if found is None:
            raise ValueError(f"{source}:{lineno}: only numbers, symbols and + - * / ^ ( ) are allowed: "
                             f"{_quoted(line)}")
        stray = sorted(set(found) - set(names))
        if stray:
            raise ValueError(f"{source}:{lineno}: unknown names {[n[:QUOTE_CHARS] for n in stray[:6]]}"
                             f"{f' and {len(stray) - 6:,} more' if len(stray) > 6 else ''}; the inputs are "
                             f"{list(names)[:4]}{'...' if len(names) > 4 else ''} (see --symbols)")
        try:
            _FormulaBound(line, len(names)).check()
        except ValueError as exc:
            raise ValueError(f"{source}:{lineno}: refused: {exc}: {_quoted(line)}") from None
        try:
            e = parse_expr(line, local_dict=dict(symbols), global_dict={"Integer": sympy.Integer, "Float": sympy.Float,
                           "Rational": sympy.Rational, "Symbol": sympy.Symbol},
                           transformations=standard_transformations + (convert_xor,))
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise ValueError(f"{source}:{lineno}: cannot parse {_quoted(line)}: {str(exc)[:200]}") from None
        exprs.append(e)
    if not exprs:
        raise ValueError(f"{source}: no formulas (one polynomial per output line)")
    return exprs
