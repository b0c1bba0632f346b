"""The scenario harness: what every script in scenarios/ is built on.

A scenario is an async function `scenario(m, report, args)` that drives a booted machine and
states its expectations on `report`.  `scenario_main(scenario, __doc__)` gives it the common
command line (`--arch --cpus --seed --preempt` plus the trace exports), prints the report and
exits non-zero when an expectation failed, so the same script serves `python scenarios/X.py`,
`smpkprobes run X` and `smpkprobes stress X`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from ._system import Machine


@dataclass
class Report:
    """Lines to print, and expectations that decide the exit status."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    checks: int = 0

    def print(self, *parts) -> None:
        self.lines.append(" ".join(str(p) for p in parts))

    def expect(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(what)
            self.lines.append(f"EXPECTATION FAILED: {what}")
        return ok

    @property
    def ok(self) -> bool:
        return not self.failures


Scenario = Callable[[Machine, Report, argparse.Namespace], Awaitable[None]]


def parser(description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preempt", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="workload size (scenario-specific)")
    ap.add_argument("--quiet", action="store_true", help="print only the verdict")
    return ap


async def run(scenario: Scenario, args: argparse.Namespace, **machine_options) -> tuple[Report, Machine]:
    """Boot a machine as `args` says, run the scenario, return its report and the machine."""
    report = Report()
    async with Machine(arch=args.arch, cpus=args.cpus, seed=args.seed, preempt=args.preempt,
                       **machine_options) as m:
        await scenario(m, report, args)
        report.expect(not m.oopses, f"no oops ({len(m.oopses)} seen)")
    return report, m


def scenario_main(scenario: Scenario, description: str | None = None,
                  argv: list[str] | None = None, configure=None) -> int:
    """Parse the command line, run, print, and exit with 0 (all expectations held) or 1."""
    ap = parser(description)
    if configure is not None:
        configure(ap)
    args = ap.parse_args(argv)
    report, m = trio.run(functools.partial(run, scenario, args))
    if not args.quiet:
        for line in report.lines:
            print(line)
    verdict = "PASS" if report.ok else "FAIL"
    print(f"{verdict}: {report.checks - len(report.failures)}/{report.checks} expectations held "
          f"(arch {args.arch}, {args.cpus} CPUs, seed {args.seed}"
          f"{', preempt' if args.preempt else ''}; trace {m.trace_digest()})")
    return 0 if report.ok else 1


if __name__ == "__main__":   # pragma: no cover
    sys.exit("run a scenario from scenarios/ instead")
