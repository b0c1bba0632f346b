"""selftest --mutate: generated probe-core mutants and the mutation score."""

import textwrap
from pathlib import Path


from smpkprobes.tools import _mutate

SAMPLE = textwrap.dedent('''\
    async def arm(self, sites):
        """Docstrings are not mutated."""
        if not sites and self.n < 2:
            return
        await self.poke(sites)
        await self.sync()
        self.count += 1
''')


def _ops(mutants):
    return sorted((m.op, m.detail) for m in mutants)


def test_each_operator_applies_where_its_node_is():
    """The sample gets exactly the mutants its nodes allow, and each is one edit that
    compiles."""
    muts = _mutate.generate("sample", SAMPLE)
    assert _ops(muts) == sorted([
        ("bool", "and -> or"), ("bool", "drop not"), ("bool", "negate condition"),
        ("compare", "< -> <="), ("off-by-one", "2 -> 3"), ("off-by-one", "2 -> 1"),
        ("off-by-one", "1 -> 2"), ("off-by-one", "1 -> 0"),
        ("skip-await", "await self.poke(sites)"), ("skip-await", "await self.sync()"),
        ("drop", "self.count += 1"),
        ("swap-awaits", "await self.poke(sites) <-> await self.sync()"),
    ])
    for m in muts:
        compile(_mutate.apply(SAMPLE, m), "sample", "exec")


def test_a_mutant_is_the_edit_it_names():
    """apply() makes exactly the named change, and diff() shows it as a unified diff."""
    muts = {(m.op, m.detail): m for m in _mutate.generate("sample", SAMPLE)}
    swapped = _mutate.apply(SAMPLE, muts[("swap-awaits",
                                          "await self.poke(sites) <-> await self.sync()")])
    assert swapped == SAMPLE.replace("await self.poke(sites)\n    await self.sync()",
                                     "await self.sync()\n    await self.poke(sites)")
    assert _mutate.apply(SAMPLE, muts[("compare", "< -> <=")]) == \
        SAMPLE.replace("self.n < 2", "self.n <= 2")
    assert _mutate.apply(SAMPLE, muts[("drop", "self.count += 1")]) == \
        SAMPLE.replace("self.count += 1", "pass")
    d = _mutate.diff(SAMPLE, muts[("bool", "drop not")], "x.py")
    assert "-    if not sites and self.n < 2:\n+    if (sites) and self.n < 2:\n" in d


def test_the_draw_is_seeded_and_covers_the_probe_core_only():
    """The same N and seed draw the same mutants; the views (debugfs, tracefs) are not
    probe logic and are left out."""
    mods = [name for name, _ in _mutate.core_modules()]
    assert mods and all(name.startswith("smpkprobes.kprobes.") for name in mods)
    assert not [name for name in mods if "tracefs" in name or "debugfs" in name]
    a = [m.ident for m, _ in _mutate.draw(12, 3)]
    assert a == [m.ident for m, _ in _mutate.draw(12, 3)]
    assert a != [m.ident for m, _ in _mutate.draw(12, 4)]
    assert len(set(a)) == 12


def test_the_suites_name_their_runs():
    """round1 is the first round's ten scenarios; current adds the new ones, each seed under
    its drawn schedule."""
    r1 = _mutate.suite("round1", seeds=1)
    assert [j.scenario for j in r1] == list(_mutate.ROUND1)
    cur = _mutate.suite("current", seeds=1)
    assert {"aggregate_churn", "long_context_unregister", "unit_shapes"} <= \
        {j.scenario for j in cur}
    assert all("--quanta" in j.argv for j in cur)


def test_scoring_kills_a_real_bug_and_reports_what_it_cannot_reach():
    """End to end, in child processes: skipping the grace period of unregistration is
    killed by unregister_while_firing (with the replay command of the run that caught it);
    a mutant on a line the suite never reaches is 'not reached', and not run."""
    cands = _mutate.candidates()
    killable = next((m, src) for m, src in cands if m.op == "skip-await"
                    and m.detail == "await self._kernel.synchronize()"
                    and m.module.endswith("_registry"))
    unreached = next((m, src) for m, src in cands if m.module.endswith("_hit")
                     and m.op == "drop" and "unrecoverable" in m.detail)
    suite = [_mutate.Job("unregister_while_firing", ("--seed", "0", "--size", "5", "--quiet"))]
    score = _mutate.score_mutants([killable, unreached], suite, "test", 0, jobs=2)
    verdicts = {r.mutant.ident: r for r in score.results}
    k, u = verdicts[killable[0].ident], verdicts[unreached[0].ident]
    assert (k.verdict, k.how, u.verdict, u.runs) == ("killed", "fail", "not reached", 0)
    assert k.by == "smpkprobes run unregister_while_firing --seed 0 --size 5 --quiet"
    assert "-        await self._kernel.synchronize()" in k.diff
    assert score.killed == 1 and "1/2 killed" in _mutate.format_score(score)


def test_the_baseline_chooses_the_runs_that_reach_a_line():
    """The covered baseline records, per run, the probe-core lines it reaches: a line of
    the jprobe entry handler is reached by the jprobe scenario only, so a mutant there runs
    that scenario alone; a module constant runs at import, so every run reaches it; a line
    no run reaches is reached by none.  A run that fails unmutated leaves the suite, with
    its reason."""
    import ast
    import inspect
    from smpkprobes.kprobes import _jprobes
    path = inspect.getsourcefile(_jprobes)
    tree = ast.parse(Path(path).read_text())
    fn = next(n for n in ast.walk(tree) if getattr(n, "name", "") == "setjmp_pre_handler")
    entry = fn.body[1].lineno                    # the first statement after the docstring
    const = next(n.lineno for n in tree.body if isinstance(n, ast.Assign)
                 and n.targets[0].id == "MAX_STACK_SIZE")
    suite = [_mutate.Job("kprobe_example", ("--seed", "0", "--quiet")),
             _mutate.Job("jprobe_example", ("--seed", "0", "--quiet")),
             _mutate.Job("unregister_while_firing", ("--mutant", "no_backup_on_stray_trap",
                                                     "--seed", "58", "--quiet"))]
    base = _mutate.baseline(suite, 30.0, jobs=2)
    assert [j.scenario for j in base.jobs] == ["kprobe_example", "jprobe_example"]
    assert len(base.dropped) == 1 and "no_backup_on_stray_trap" in base.dropped[0][0]
    assert all(len(d) == 32 for d in base.digests) and all(s > 0 for s in base.seconds)
    assert base.reaching({(path, entry)}) == [1]
    assert sorted(base.reaching({(path, const)})) == [0, 1]
    assert base.reaching({(path, 10**6)}) == []
