"""The mutation operators of `selftest --mutate` (see `_mutate`): every place in the probe
core where one applies, as a textual edit of the source, and the seeded draw of N of them."""

from __future__ import annotations

import ast
import difflib
import random
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
CORE = PACKAGE / "kprobes"
# The file views of the core (debugfs; tracefs and its kprobe_events modules, _tp_*): not
# the probe logic the stress suite hunts.
VIEWS = ("_debugfs", "_tracefs", "_tp_")


# == generating ==========================================================================
@dataclass(frozen=True, order=True)
class Mutant:
    module: str          # dotted module name, e.g. smpkprobes.kprobes._core
    line: int            # first line of the edit
    col: int
    op: str              # the operator (see the module docstring)
    detail: str          # what it does, e.g. "< -> <="
    edits: tuple[tuple[int, int, int, int, str], ...]   # (line, col, end_line, end_col, text)

    @property
    def ident(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}:{self.line}:{self.col}:{self.op}:{self.detail}"


_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In}
_OPTXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
          ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
          ast.NotIn: "not in"}


def core_modules() -> list[tuple[str, Path]]:
    """The probe-core modules, by dotted name, sorted."""
    out = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if path.stem == "__init__" or any(path.stem.startswith(v) for v in VIEWS) \
                or any(part.startswith(v) for v in VIEWS for part in rel.parts):
            continue
        out.append((".".join(rel.parts), path))
    return out


def _span(node) -> tuple[int, int, int, int]:
    return node.lineno, node.col_offset, node.end_lineno, node.end_col_offset


def _awaits(stmt) -> bool:
    return any(isinstance(n, ast.Await) for n in ast.walk(stmt))


def _is_docstring(stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _whole_lines(stmt, lines: list[str]) -> bool:
    """The statement alone on its lines (so it can be replaced line-wise)."""
    first, last = lines[stmt.lineno - 1], lines[stmt.end_lineno - 1]
    return (first[:stmt.col_offset].strip() == ""
            and last[stmt.end_col_offset:].strip() in ("", "\\")
            and not last[stmt.end_col_offset:].strip().startswith(";"))


def _stmt_bodies(fn) -> list[list[ast.stmt]]:
    """Every statement list inside a function, nested blocks included."""
    bodies = []
    for node in ast.walk(fn):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                bodies.append(block)
    return bodies


def _functions(tree) -> list:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def generate(module: str, source: str) -> list[Mutant]:
    """Every mutant of one module's functions."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found: set[Mutant] = set()

    def add(node, op, detail, edits):
        found.add(Mutant(module, node.lineno, node.col_offset, op, detail, tuple(edits)))

    for fn in _functions(tree):
        # (f-strings are left alone: their inner positions are not reliable in 3.11)
        in_fstring = {id(n) for j in ast.walk(fn) if isinstance(j, ast.JoinedStr)
                      for n in ast.walk(j)}
        body_nodes = [n for s in fn.body if not _is_docstring(s) for n in ast.walk(s)
                      if id(n) not in in_fstring]
        for node in body_nodes:
            if isinstance(node, ast.Compare):
                for i, cmp_op in enumerate(node.ops):
                    new = ast.Compare(node.left, list(node.ops), node.comparators)
                    new.ops[i] = _SWAP[type(cmp_op)]()
                    add(node, "compare",
                        f"{_OPTXT[type(cmp_op)]} -> {_OPTXT[_SWAP[type(cmp_op)]]}",
                        [(*_span(node), ast.unparse(new))])
            elif (isinstance(node, ast.Constant) and type(node.value) is int
                  and -64 <= node.value <= 4096):
                for delta in (1, -1):
                    v = node.value + delta
                    add(node, "off-by-one", f"{node.value} -> {v}",
                        [(*_span(node), f"({v})" if v < 0 else str(v))])
            elif isinstance(node, ast.BoolOp):
                other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
                new = ast.BoolOp(other, node.values)
                add(node, "bool", "and -> or" if isinstance(node.op, ast.And) else "or -> and",
                    [(*_span(node), f"({ast.unparse(new)})")])
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                add(node, "bool", "drop not",
                    [(*_span(node), f"({ast.unparse(node.operand)})")])
            elif isinstance(node, (ast.If, ast.While)) and not (
                    isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)):
                add(node.test, "bool", "negate condition",
                    [(*_span(node.test), f"not ({ast.unparse(node.test)})")])
        for body in _stmt_bodies(fn):
            real = [s for s in body if not _is_docstring(s)]
            for stmt in real:
                if not isinstance(stmt, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign,
                                         ast.Raise, ast.Delete)):
                    continue
                if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
                    continue
                if not _whole_lines(stmt, lines):
                    continue
                skip_await = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Await)
                what = ast.unparse(stmt).splitlines()[0][:60]
                add(stmt, "skip-await" if skip_await else "drop", what,
                    [(stmt.lineno, stmt.col_offset, stmt.end_lineno, stmt.end_col_offset,
                      "pass")])
            for a, b in zip(real, real[1:]):
                if (_awaits(a) and _awaits(b) and _whole_lines(a, lines)
                        and _whole_lines(b, lines) and a.col_offset == b.col_offset
                        and not isinstance(a, ast.Return) and not isinstance(b, ast.Return)
                        and b.lineno > a.end_lineno
                        and all(not lines[i].strip() or lines[i].strip().startswith("#")
                                for i in range(a.end_lineno, b.lineno - 1))):
                    ta = "\n".join(lines[a.lineno - 1:a.end_lineno])[a.col_offset:]
                    tb = "\n".join(lines[b.lineno - 1:b.end_lineno])[b.col_offset:]
                    add(a, "swap-awaits",
                        f"{ast.unparse(a).splitlines()[0][:30]} <-> "
                        f"{ast.unparse(b).splitlines()[0][:30]}",
                        [(a.lineno, a.col_offset, a.end_lineno, a.end_col_offset, tb),
                         (b.lineno, b.col_offset, b.end_lineno, b.end_col_offset, ta)])
    return sorted(found)


def apply(source: str, mutant: Mutant) -> str:
    """The module's source with the mutant's edits (applied last first, so spans hold)."""
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))

    def pos(line, col):
        # ast columns are UTF-8 byte offsets
        text = lines[line - 1].encode()[:col].decode(errors="ignore")
        return offsets[line - 1] + len(text)
    out = source
    for line, col, eline, ecol, text in sorted(mutant.edits, reverse=True):
        a, b = pos(line, col), pos(eline, ecol)
        out = out[:a] + text + out[b:]
    return out


def diff(source: str, mutant: Mutant, path: str) -> str:
    new = apply(source, mutant)
    return "".join(difflib.unified_diff(source.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        f"a/{path}", f"b/{path}", n=1))


def candidates() -> list[tuple[Mutant, str]]:
    """Every mutant of the probe core, with its module's source, in a fixed order."""
    out = []
    for module, path in core_modules():
        source = path.read_text()
        out.extend((m, source) for m in generate(module, source))
    return out


def compiles(source: str, mutant: Mutant) -> bool:
    try:
        compile(apply(source, mutant), mutant.module, "exec")
    except SyntaxError:
        return False
    return True


def draw(n: int, seed: int) -> list[tuple[Mutant, str]]:
    """N mutants that compile, drawn with `seed` from the candidate list (in that order)."""
    cands = candidates()
    order = list(range(len(cands)))
    random.Random(seed).shuffle(order)
    picked = []
    for i in order:
        if len(picked) == n:
            break
        if compiles(*reversed(cands[i])):
            picked.append(i)
    return [cands[i] for i in sorted(picked)]
