"""docs/API.md, the API reference users read, names every public name of the package."""

import dataclasses
import re
from pathlib import Path

import pytest

import smpkprobes
import smpkprobes.scenario
from smpkprobes.kprobes._core import KprobesStatistics, KprobesSubsystem, PoolStatistics
from smpkprobes.tools._cli import COMMANDS

API = (Path(__file__).parent.parent / "docs" / "API.md").read_text()
FENCED = re.compile(r"^ *```.*?^ *```", re.S | re.M)
# Everything quoted as code: the fenced blocks, and the `inline` spans of the rest.
QUOTED = " ".join(FENCED.findall(API) + re.findall(r"`([^`]+)`", FENCED.sub("", API)))


def public(module) -> list[str]:
    return sorted(n for n in dir(module) if not n.startswith("_")
                  and getattr(getattr(module, n), "__module__", "").startswith("smpkprobes"))


NAMES = (
    [("smpkprobes", n) for n in public(smpkprobes)]
    + [("smpkprobes.scenario", n) for n in public(smpkprobes.scenario)]
    + [("m.kprobes", n) for n in dir(KprobesSubsystem)
       if re.match(r"(un)?register_|enable_|disable_|statistics$", n)]
    + [(rec.__name__, f.name) for rec in (smpkprobes.MachineStatistics, KprobesStatistics,
                                          PoolStatistics) for f in dataclasses.fields(rec)]
    + [("smpkprobes COMMAND", n) for n in COMMANDS]
)


@pytest.mark.parametrize("where, name", NAMES, ids=[f"{w}:{n}" for w, n in NAMES])
def test_every_public_name_is_documented(where, name):
    """Each public name appears, quoted as code, in docs/API.md."""
    assert re.search(rf"(?<!\w){re.escape(name)}(?!\w)", QUOTED), \
        f"{where}.{name} is public but docs/API.md does not mention it"


def test_the_reference_stands_on_its_own():
    """The reference points at nothing outside the repository (no shared spec files)."""
    assert "spec/" not in API and "KPROBES.md" not in API
