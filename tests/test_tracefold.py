"""The trace digest's fold (smpkprobes/machine/_tracefold.py): the C fold and its Python twin
give exactly the bytes of every event's repr, so digests do not depend on which one ran."""

from __future__ import annotations

import random

import pytest

from smpkprobes.machine import _tracefold
from smpkprobes.machine._tracefold import fold_twin

native = _tracefold._native_fold
needs_native = pytest.mark.skipif(native is None, reason="the C fold is not built here")

EDGE_ITEMS = [0, 1, -1, 2**63 - 1, -2**63, 2**63, 2**64 - 1, 2**64, -2**63 - 1, 10**40,
              0xffffffff81001234, "opt", "", "it's", 'say "hi"', "back\\slash", "tab\t",
              "\x7f", "caf\u00e9", "\u2603", True, False, None, 1.5, float("nan"), (1, 2),
              (), ("x",), b"bytes", [1], {"k": 1}]


class Shouty(int):
    def __repr__(self) -> str:
        return "Shouty!"


def events(rng: random.Random, n: int) -> list:
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.05:
            out.append(rng.choice(EDGE_ITEMS))          # not a tuple at all
        else:
            out.append(tuple(rng.choice(EDGE_ITEMS + [Shouty(3), "ss", 42])
                             for _ in range(rng.randrange(0, 6))))
    return out


def test_the_twin_is_the_concatenated_reprs():
    evs = [("opt", 0, 5, 6), ("x",), (), "plain", 7]
    assert fold_twin(evs) == b"('opt', 0, 5, 6)('x',)()'plain'7"


@needs_native
@pytest.mark.parametrize("seed", range(20))
def test_native_fold_is_the_twin_on_every_kind_of_item(seed):
    evs = events(random.Random(seed), 300)
    assert native(evs) == fold_twin(evs)


@needs_native
def test_native_fold_on_each_edge_item_alone_and_in_tuples():
    for x in EDGE_ITEMS + [Shouty(3)]:
        for ev in (x, (x,), (x, x), ("hit", 0, x, 1)):
            assert native([ev]) == fold_twin([ev]), ev
    assert native([]) == b"" == fold_twin([])


@needs_native
def test_native_fold_takes_any_sequence_and_refuses_anything_else():
    assert native((("a", 1),)) == b"('a', 1)"
    with pytest.raises(TypeError):
        native(5)
