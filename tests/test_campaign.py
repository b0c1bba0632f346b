"""Stress campaigns: the Dask engine (embedded and on a real cluster), the SQLite store that
survives a SIGKILL of the client, worker deaths, and the `campaign` command.

The real cluster is a `dask scheduler` and two `dask worker` processes on 127.0.0.1, started
once for this module (Dask's startup takes seconds)."""

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

distributed = pytest.importorskip("distributed")

from smpkprobes.tools import _campaign, _cli, _store, _stress  # noqa: E402

SCENARIO = "unregister_while_firing"
# The stress defaults: each seed draws its own schedule, quanta and preemption
# (`_stress.draw_policy`).  Most of these seeds fail, in two kinds; seeds 6 and 15 pass.
ARGS = ["--mutant", "slot_reused_at_once"]
SEEDS = range(0, 16)


def outcomes_in(db: str, cid: int = 1) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT seed, outcome, kind, digest FROM seeds WHERE campaign = ? "
                           "ORDER BY seed", (cid,)).fetchall()
    finally:
        con.close()


def count_in(db: str) -> int:
    if not os.path.exists(db):
        return 0
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute("SELECT count(*) FROM seeds").fetchone()[0]
    except sqlite3.OperationalError:           # no table yet
        return 0
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference() -> list[tuple]:
    """The uninterrupted run, in this process, one seed after another."""
    outs = _stress.run_seeds(SCENARIO, ARGS, SEEDS, progress=False)
    kinds = {o.kind for o in outs if not o.ok}
    assert len(kinds) >= 2 and any(o.ok for o in outs)     # a mix worth comparing
    assert len({tuple(_stress.draw_policy(s)) for s in SEEDS}) >= 4     # and of schedules
    return [(o.seed, "pass" if o.ok else "fail", o.kind, o.digest) for o in outs]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real Dask cluster on loopback: `dask scheduler` and two `dask worker`s."""
    d = tmp_path_factory.mktemp("dask")
    sched_file = d / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker"]
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "fork"}
    procs = [subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", "127.0.0.1:0",
                               "--scheduler-file", str(sched_file)], cwd=d, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        address = None
        while address is None:      # the file may be seen before it is wholly written
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                pass
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            procs.append(subprocess.Popen(
                [*worker, address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                 "--name", f"w{i}", "--local-directory", str(d)], cwd=d, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):          # each in its own session: it and its children
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def stress_cmd(db, *more) -> list[str]:
    return [sys.executable, "-m", "smpkprobes.tools._cli", "stress", SCENARIO, *ARGS,
            "--seeds", f"{SEEDS.start}:{SEEDS.stop}", "--store", str(db), "--no-progress",
            "--no-shrink", *more]


# == the real distributed path ============================================================
def test_a_campaign_on_a_real_cluster_gives_the_local_outcomes(cluster, reference, tmp_path,
                                                              capsys):
    """`stress --scheduler` on a dask scheduler + two dask workers records the same outcomes,
    digest for digest, as the uninterrupted run in one process, spread over both workers."""
    db = tmp_path / "c.sqlite"
    status = _cli.main(["stress", SCENARIO, *ARGS, "--seeds", "0:16", "--scheduler", cluster,
                        "--store", str(db), "--no-progress", "--no-shrink"])
    assert status == 1
    assert "2 Dask worker(s) on the cluster at tcp://127.0.0.1:" in capsys.readouterr().out
    assert outcomes_in(db) == reference
    con = sqlite3.connect(db)
    workers = {w for (w,) in con.execute("SELECT DISTINCT worker FROM seeds")}
    con.close()
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)


def test_a_sigkilled_client_resumes_with_nothing_lost_and_nothing_run_twice(cluster,
                                                                            reference,
                                                                            tmp_path):
    """The client is SIGKILLed at random points (during start-up, and after a random count
    of seeds is recorded), then resumed: what was recorded stays, a resumed run runs only
    the rest, and the store ends with every seed once, equal to the uninterrupted run."""
    db = tmp_path / "k.sqlite"
    rng_seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(rng_seed)
    why = f"(random kill points from seed {rng_seed})"
    targets = sorted(rng.sample(range(1, len(SEEDS) - 4), 3))
    before = 0
    for trial, target in enumerate([None, *targets]):
        proc = subprocess.Popen(stress_cmd(db, "--scheduler", cluster),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        if target is None:              # at a random moment of start-up
            time.sleep(rng.uniform(0.0, 2.0))
        else:
            while count_in(db) < target and proc.poll() is None:
                assert time.monotonic() < deadline, why
                time.sleep(0.02)
        proc.kill()
        out = proc.communicate()[0]
        now = count_in(db)
        assert now >= before, why                    # nothing recorded is lost
        if proc.returncode != -signal.SIGKILL:
            # It finished before the kill landed: then it must have been complete.
            assert now == len(SEEDS), f"{why}\n{out}"
        resumed = re.search(r"(\d+) of these seeds were recorded before, (\d+) run now", out)
        if resumed:
            assert int(resumed.group(1)) == before, why
        before = now
    done = subprocess.run(stress_cmd(db, "--scheduler", cluster), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    if before:
        assert (f"{before} of these seeds were recorded before, {len(SEEDS) - before} run now"
                in done.stdout), why
    assert outcomes_in(db) == reference, why


def test_a_sigkilled_client_takes_its_local_cluster_down_with_it(tmp_path):
    """SIGKILL of a client running an embedded LocalCluster leaves no worker processes."""
    psutil = pytest.importorskip("psutil")
    db = tmp_path / "l.sqlite"
    proc = subprocess.Popen(stress_cmd(db, "--jobs", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while count_in(db) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert alive == [], [(p.pid, p.cmdline(), p.ppid(), p.status()) for p in alive]


WATCHED = """
import os, sys, time, dask
from smpkprobes.tools import _campaign
dask.config.set({_campaign.CLIENT_PID_KEY: int(sys.argv[1])})
_campaign.dask_setup(None)
time.sleep(float(sys.argv[2]))
sys.exit(0)
"""


def test_a_worker_exits_once_its_client_is_gone():
    """The preload's watch: a worker whose parent is not (or no longer) the client that
    started it exits, status 1, within a poll or two; one whose parent is the client lives
    on; one with no client pid configured (a cluster not ours) has no watch."""
    def run(client, sleep):
        return subprocess.run([sys.executable, "-c", WATCHED, str(client), str(sleep)],
                              timeout=60).returncode
    assert run(os.getpid(), 1.5) == 0
    assert run(1 if os.getpid() != 1 else 2, 30) == 1       # well before the 30 s sleep ends
    env_free = WATCHED.replace("dask.config.set", "dict")
    assert subprocess.run([sys.executable, "-c", env_free, "1", "1.5"],
                          timeout=60).returncode == 0

def test_a_killed_worker_leaves_every_seed_recorded_once(cluster, reference, tmp_path):
    """One Dask worker is SIGKILLed mid-campaign: its chunk runs again elsewhere, the campaign
    finishes and every seed is recorded once, with the uninterrupted run's outcomes."""
    db = tmp_path / "w.sqlite"
    killed = []

    with _campaign.Campaign.open(SCENARIO, ARGS, scheduler=cluster, store=str(db)) as camp:
        pids = camp.engine.worker_pids()
        assert len(pids) == 2

        def kill_one(result):
            if not killed:
                victim = sorted(pids)[0] if result.worker != sorted(pids)[0] else \
                    sorted(pids)[1]
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)
        camp.on_chunk = kill_one
        outs = camp.run(SEEDS, progress=False)
    assert killed
    assert [(o.seed, "pass" if o.ok else "fail", o.kind, o.digest) for o in outs] == reference
    assert outcomes_in(db) == reference


# == the store ============================================================================
def test_the_same_command_again_resumes_and_reuses_the_shrunk_reproducer(tmp_path, capsys):
    """A second identical stress command runs no seed, prints the same summary and takes
    the shrunk reproducer from the store instead of shrinking again."""
    argv = ["stress", "concurrent_hits", "--seeds", "3:5", "--no-progress", "--mutant",
            "no_text_sync", "--size", "40", "--shrink-runs", "12"]
    assert _cli.main(argv) == 1
    first = capsys.readouterr().out
    assert _cli.main(argv) == 1
    second = capsys.readouterr().out
    assert "campaign 1 resumed from" in second and "2 of these seeds were recorded before, " \
        "0 run now" in second
    assert "(shrunk before, from the store)" in second
    shrunk = [ln.strip() for ln in first.splitlines() if "--replay" in ln]
    assert shrunk and shrunk[-1] in [ln.strip() for ln in second.splitlines()]
    store = _store.Store(os.environ["SMPKPROBES_STORE"])
    assert store.count(1) == (2, 2)
    (kind,) = store.kinds(1)
    assert kind["first_seed"] == 3 and kind["count"] == 2 and kind["shrunk"] == shrunk[-1]
    store.close()


def test_other_code_is_refused_unless_new(tmp_path, capsys, monkeypatch):
    """A campaign recorded by other code (another code digest) is refused with exit 2 and
    what to do; --new starts campaign 2; --resume with no campaign is refused."""
    argv = ["stress", "reentrancy", "--seeds", "0:1", "--no-progress"]
    assert _cli.main(argv) == 0
    real = _store.code_digest()
    monkeypatch.setattr(_store, "_code_digest", "0123456789abcdef")
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"^smpkprobes: error: campaign 1 \(reentrancy\) in .* was run by other "
                     r"code .*\(pass --new to start a new campaign with this code\)$", err)
    assert _cli.main([*argv, "--new"]) == 0
    store = _store.Store(os.environ["SMPKPROBES_STORE"])
    assert [c.code_digest for c in store.campaigns()] == [real, "0123456789abcdef"]
    store.close()
    assert _cli.main(["stress", "reentrancy", "--cpus", "2", "--seeds", "0:1",
                      "--no-progress", "--resume"]) == 2
    assert "no campaign of reentrancy --cpus 2" in capsys.readouterr().err
    assert _cli.main([*argv, "--resume", "--new"]) == 2
    assert "smpkprobes: error: --resume and --new contradict" in capsys.readouterr().err


def test_a_store_keeps_each_seed_once():
    """Recording a seed twice is refused by the store (the primary key), not duplicated."""
    store = _store.Store(":memory:")
    info, resumed = store.open_campaign("x", [], "x86_64", "random")
    row = _store.SeedRow(0, "pass", "d", None, None, 0.1, 3, "smpkprobes run x --seed 0",
                         "local")
    store.record(info.id, [row])
    with pytest.raises(sqlite3.IntegrityError):
        store.record(info.id, [row])
    assert store.count(info.id) == (1, 0) and not resumed


# == shrinking on the engine ==============================================================
class _Wide(_campaign.LocalEngine):
    """Local replays, handed out three at a time as a three-worker cluster would."""
    workers = 3

    def __init__(self):
        self.windows = []

    def replays(self, name, argvs, timeout):
        self.windows.append(len(argvs))
        return super().replays(name, argvs, timeout)


def test_shrinking_in_windows_finds_what_one_at_a_time_finds():
    """Delta debugging with candidates tried a window at a time gives the same reproducer,
    after the same count of replays, as trying them one by one."""
    name, extra = "concurrent_hits", ["--mutant", "no_text_sync", "--size", "40"]
    out = _stress.run_once(name, _stress.seed_argv(extra, 3), keep_schedule=True)
    assert not out.ok

    def shrunk(engine):
        return _stress.shrink(name, extra, 3, out.schedule, out.coins, out.kind,
                              max_runs=12, engine=engine)
    one, wide = shrunk(_campaign.LocalEngine()), _Wide()
    many = shrunk(wide)
    assert (many.recording, many.runs, many.failure) == (one.recording, one.runs, one.failure)
    assert max(wide.windows) == 3


# == the campaign command =================================================================
def test_campaign_list_show_and_report(tmp_path, capsys):
    """`campaign list` lists, `show` summarises, `report` prints the summary and writes an
    HTML page with the four plots."""
    db = str(tmp_path / "r.sqlite")
    assert _cli.main(["stress", "concurrent_hits", "--seeds", "3:5", "--no-progress",
                      "--mutant", "no_text_sync", "--size", "40", "--shrink-runs", "6",
                      "--store", db]) == 1
    capsys.readouterr()
    assert _cli.main(["campaign", "list", "--store", db]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^\s+1\s+2\s+2\s+1\s+x86_64\s+\S+\s+", listing, re.M)
    assert "concurrent_hits --mutant no_text_sync --size 40" in listing
    assert _cli.main(["campaign", "show", "1", "--store", db]) == 0
    shown = capsys.readouterr().out
    assert "2 seeds run (3:5), 0 passed, 2 failed, 1 kind(s) of failure" in shown
    drawn = " ".join(_stress.draw_policy(3))        # the seed's own schedule flags
    assert f"    shrunk: smpkprobes run concurrent_hits {drawn} --mutant no_text_sync " \
        f"--size 40 --seed 3 --schedule " in shown and " --replay " in shown
    page = tmp_path / "r.html"
    assert _cli.main(["campaign", "report", "1", "--store", db, "--html", str(page)]) == 0
    assert capsys.readouterr().out == shown + f"report: {page}\n"
    text = page.read_text()
    assert text.count("<img ") == 4 and "Throughput per worker" in text


def test_campaign_errors_say_what_to_do(tmp_path, capsys):
    """An unknown store, a missing or unknown campaign ID: exit 2 and what to do."""
    db = str(tmp_path / "none.sqlite")
    assert _cli.main(["campaign", "list", "--store", db]) == 2
    assert capsys.readouterr().err == (f"smpkprobes: error: no campaign store at {db} (run "
                                       f"`smpkprobes stress` first, or give the file with "
                                       f"--store)\n")
    _store.Store(db).close()
    assert _cli.main(["campaign", "show", "--store", db]) == 2
    assert "needs a campaign ID (see `smpkprobes campaign list`)" in capsys.readouterr().err
    assert _cli.main(["campaign", "report", "7", "--store", db]) == 2
    assert capsys.readouterr().err == (f"smpkprobes: error: no campaign 7 in {db} (see "
                                       f"`smpkprobes campaign list`)\n")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database, not even close\n")
    assert _cli.main(["stress", "reentrancy", "--seeds", "0:1", "--store", str(junk)]) == 2
    assert capsys.readouterr().err == (f"smpkprobes: error: {junk} is not a campaign store: "
                                       f"file is not a database (give another file with "
                                       f"--store)\n")
    assert _cli.main(["stress", "reentrancy", "--scheduler", "127.0.0.1:1"]) == 2
    assert "is not a scheduler address (give tcp://HOST:PORT" in capsys.readouterr().err


def test_a_campaign_runs_on_one_client_at_a_time(tmp_path, capsys):
    """While a client holds a campaign, a second client of it is refused with exit 2; once
    the first is gone (even SIGKILLed) the campaign can be resumed."""
    db = tmp_path / "one.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from smpkprobes.tools._store import Store; "
         f"Store({str(db)!r}).open_campaign('reentrancy', [], 'x86_64', 'random'); "
         "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        argv = ["stress", "reentrancy", "--seeds", "0:1", "--no-progress", "--store", str(db)]
        assert _cli.main(argv) == 2
        assert capsys.readouterr().err == (
            f"smpkprobes: error: campaign 1 in {db} is being run by another client (wait for "
            f"it to finish, or stop it and run again to resume)\n")
    finally:
        holder.kill()
        holder.communicate()
    assert _cli.main(argv) == 0


def test_a_resumed_range_shrinks_a_seed_recorded_earlier(tmp_path, capsys):
    """A kind first seen by an earlier session is shrunk from the range's own first failing
    seed, run again for its recording."""
    argv = ["stress", "concurrent_hits", "--no-progress", "--mutant", "no_text_sync",
            "--size", "40", "--shrink-runs", "4"]
    assert _cli.main([*argv, "--seeds", "3:5", "--no-shrink"]) == 1
    capsys.readouterr()
    assert _cli.main([*argv, "--seeds", "4:6"]) == 1
    out = capsys.readouterr().out
    assert "1 of these seeds were recorded before, 1 run now" in out
    assert re.search(r"shrinking the schedule of seed 4 \([1-9]\d* choices", out)
    assert "minimal reproducer" in out


def test_the_mutant_table_is_a_set_of_campaigns(tmp_path, capsys):
    """`selftest --mutants --store FILE` records each mutant and scenario as a campaign; run
    again, it runs no seed and prints the same table."""
    db = tmp_path / "m.sqlite"
    argv = ["selftest", "--mutants", "--only", "no_text_sync", "--max-seeds", "2", "--first",
            "--store", str(db)]
    assert _cli.main(argv) == 0
    first = capsys.readouterr().out
    store = _store.Store(db)
    (c,) = store.campaigns()
    assert (c.scenario, c.arguments) == ("unregister_while_firing", ["--mutant",
                                                                     "no_text_sync"])
    recorded = store.count(c.id)
    sessions = len(store.sessions(c.id))
    assert _cli.main(argv) == 0
    assert capsys.readouterr().out == first
    assert store.count(c.id) == recorded and len(store.sessions(c.id)) == sessions
    store.close()


DIES = '''"""dies: a scenario whose seed 2 kills the process running it."""
import os


async def scenario(m, report, args):
    if args.seed == 2:
        os._exit(3)
    report.expect(True, "nothing")
'''


@pytest.mark.skipif(_campaign._multiprocessing_method() != "fork",
                    reason="the workers must be forked to see the scenario made here")
def test_a_seed_that_kills_every_worker_is_recorded_as_a_crash(tmp_path, monkeypatch):
    """A seed whose run kills its worker each time: its chunk is split, the other seeds of
    the chunk pass, and the seed is recorded once, as a crash."""
    (tmp_path / "dies.py").write_text(DIES)
    monkeypatch.setattr(_stress, "SCENARIOS", tmp_path)
    monkeypatch.setattr(_stress, "_loaded", {})
    db = str(tmp_path / "d.sqlite")
    with _campaign.Campaign.open("dies", ["--cpus", "1"], jobs=2, store=db) as camp:
        assert _campaign.chunks_of(list(range(40)), camp.engine.workers)[0] == [0, 1]
        outs = camp.run(range(40), progress=False)
    assert [o.seed for o in outs if not o.ok] == [2]
    assert outs[2].kind == "worker died"
    assert [(s, o) for s, o, _, _ in outcomes_in(db) if o != "pass"] == [(2, "crash")]
    assert len(outcomes_in(db)) == 40


class _DyingCluster:
    """A stand-in for a Dask client whose one worker dies whenever it runs a killer seed.
    As Dask's scheduler does, each death counts against every task the worker held, and a
    task counted three times fails with KilledWorker.  The worker holds every task in
    flight and runs them in submission order."""

    def __init__(self, killers):
        from distributed import KilledWorker
        self.KilledWorker, self.killers, self.held, self.ran = KilledWorker, killers, [], []

    def submit(self, fn, name, extra, chunk, timeout, pure, key):
        fut = _FakeFuture(self, chunk)
        self.held.append(fut)
        return fut

    def next_done(self):
        fut = self.held[0]
        if fut.error:
            self.ran.append(("blamed", fut.chunk))
        elif set(fut.chunk) & self.killers:
            for f in self.held:                  # three deaths, each blaming all it held
                f.error = self.KilledWorker(f.chunk, None, 2)
            self.ran.append(("died", [f.chunk for f in self.held]))
        else:
            self.ran.append(("ran", fut.chunk))
        return self.held.pop(0)

    def scheduler_info(self):
        return {"workers": {"w": {}}}

    def cancel(self, futs):
        raise AssertionError("nothing should be left in flight")


class _FakeFuture:
    def __init__(self, cluster, chunk):
        self.cluster, self.chunk, self.error = cluster, chunk, None

    def result(self):
        if self.error:
            raise self.error
        return _campaign.ChunkResult("w", "digest",
                                     [_stress.Outcome(s, True, [], None, "", 0.0, 0)
                                      for s in self.chunk])

    def release(self):
        pass


class _AsCompleted:
    def __init__(self, cluster):
        self.cluster = cluster

    def add(self, fut):
        pass

    def __iter__(self):
        while self.cluster.held:
            yield self.cluster.next_done()


def test_a_seed_queued_behind_a_worker_killer_is_tried_alone_before_it_is_blamed(monkeypatch):
    """Dask blames every task a dead worker held, the queued ones too: a lone seed that
    shared a worker with a killer each time is only a suspect.  It is tried again alone,
    after the rest, and passes; the killer, tried alone, is the one crash."""
    import distributed
    cluster = _DyingCluster(killers={2})
    monkeypatch.setattr(distributed, "as_completed", lambda: _AsCompleted(cluster))
    engine = object.__new__(_campaign.DaskEngine)
    engine.client, engine.workers = cluster, 1
    got = {tuple(c): [(o.seed, o.ok, o.kind) for o in r.outcomes]
           for c, r in engine.stream("dies", [], [[0, 1], [2, 3], [4, 5], [6, 7]], 60.0)}
    assert sorted(got) == [(0, 1), (2,), (3,), (4,), (5,), (6,), (7,)]
    assert cluster.ran == [
        ("ran", [0, 1]),
        ("died", [[2, 3], [4, 5], [6, 7]]),     # the chunks queued behind [2, 3] are split
        ("blamed", [4, 5]), ("blamed", [6, 7]),
        ("died", [[2], [4], [6]]),              # 4 and 6 become suspects, like 2
        ("blamed", [4]), ("blamed", [6]),
        ("ran", [7]), ("ran", [5]), ("ran", [3]),
        ("died", [[2]]), ("ran", [4]), ("ran", [6])]    # the suspects, one at a time
    assert [k for k, outs in got.items() if not outs[0][1]] == [(2,)]
    assert got[(2,)] == [(2, False, "worker died")]
