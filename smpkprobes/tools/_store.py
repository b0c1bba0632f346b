"""The campaign store: every seed a stress campaign ran, in one SQLite file.

A campaign is one scenario with one set of flags (its "arguments") on one version of the
code.  The store keeps, per campaign, every seed's outcome and, per kind of failure, the
first (lowest) seed that failed that way, how many did, and its shrunk reproducer once there
is one.  A campaign can be killed and resumed at any moment:

  * only the client writes, and each finished chunk of seeds is one transaction, so after a
    SIGKILL the file holds whole chunks and nothing else (WAL mode: a reader never blocks the
    writer, and a killed writer leaves a consistent file);
  * a seed is the primary key within its campaign: recording one twice is an error, not a
    duplicate, and a resumed run asks the store which seeds to skip.

One client at a time runs a campaign: it holds a lock on the campaign (a byte-range lock on
FILE.lock, which the system drops when the process dies, SIGKILL included), and a second
client of the same campaign is refused while the first runs.

The code digest (a hash of every source file and kernel image of the installed smpkprobes)
says which code produced the outcomes: resuming a campaign with other code would mix two
programs' results, so `open_campaign` refuses that unless a new campaign is asked for.
"""

from __future__ import annotations

import hashlib
import os
import importlib.util
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORE = Path(".smpkprobes") / "campaigns.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS campaigns (
    id          INTEGER PRIMARY KEY,
    scenario    TEXT NOT NULL,
    arguments   TEXT NOT NULL,      -- JSON list: the scenario's flags, without --seed
    arch        TEXT NOT NULL,
    policy      TEXT NOT NULL,
    version     TEXT NOT NULL,      -- the smpkprobes version that ran it
    code_digest TEXT NOT NULL,
    created     REAL NOT NULL       -- Unix time
);
CREATE TABLE IF NOT EXISTS seeds (
    campaign    INTEGER NOT NULL REFERENCES campaigns(id),
    seed        INTEGER NOT NULL,
    outcome     TEXT NOT NULL,      -- pass, fail, timeout or crash (the worker died)
    digest      TEXT NOT NULL,      -- the run's trace digest ("" when it did not finish)
    kind        TEXT,               -- the failure's kind (NULL when it passed)
    message     TEXT,               -- its first failed expectation
    seconds     REAL NOT NULL,      -- the run's duration on its worker
    quanta      INTEGER NOT NULL,
    replay      TEXT NOT NULL,      -- the command that replays it
    worker      TEXT NOT NULL,      -- the Dask worker's address, or "local"
    recorded    REAL NOT NULL,      -- Unix time the client recorded it
    PRIMARY KEY (campaign, seed)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (  -- each time a client ran some of a campaign's seeds
    campaign    INTEGER NOT NULL REFERENCES campaigns(id),
    started     REAL NOT NULL,      -- Unix time
    engine      TEXT NOT NULL       -- where the seeds ran
);
CREATE TABLE IF NOT EXISTS kinds (
    campaign    INTEGER NOT NULL REFERENCES campaigns(id),
    kind        TEXT NOT NULL,
    first_seed  INTEGER NOT NULL,   -- the lowest seed that failed this way
    count       INTEGER NOT NULL,
    message     TEXT NOT NULL,      -- the first seed's failure
    recording   TEXT,               -- JSON [schedule, coins] of the first seed's run
    shrunk      TEXT,               -- the shrunk reproducer, a command
    shrunk_note TEXT,               -- what shrinking said (overrides, replays)
    PRIMARY KEY (campaign, kind)
) WITHOUT ROWID;
"""


class StoreError(Exception):
    """A campaign the store cannot open as asked; the message says what to do."""


@dataclass(frozen=True)
class CampaignInfo:
    id: int
    scenario: str
    arguments: list[str]
    arch: str
    policy: str
    version: str
    code_digest: str
    created: float


@dataclass(frozen=True)
class SeedRow:
    """One recorded seed, as `Store.record` takes it and `Store.seeds` gives it back."""
    seed: int
    outcome: str
    digest: str
    kind: str | None
    message: str | None
    seconds: float
    quanta: int
    replay: str
    worker: str
    recorded: float = 0.0
    recording: str | None = None     # JSON [schedule, coins], for failures (not stored per seed)


_code_digest: str | None = None


def code_digest() -> str:
    """A hash of the installed smpkprobes: every .py file and kernel image of the package and
    of its `cpus` and `scenarios` subpackages, by relative path and content (cached)."""
    global _code_digest
    if _code_digest is None:
        roots = []
        for name in ("smpkprobes", "smpkprobes.cpus", "smpkprobes.scenarios"):
            spec = importlib.util.find_spec(name)
            roots.append((name, Path(list(spec.submodule_search_locations)[0])))
        h = hashlib.sha256()
        for name, root in roots:
            files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                     and (p.suffix in (".py", ".json", ".ko") or p.name == "vmlinux")]
            for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
                rel = p.relative_to(root).as_posix()
                if name == "smpkprobes" and rel.split("/", 1)[0] in ("cpus", "scenarios"):
                    continue
                h.update(f"{name}/{rel}\0".encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
        _code_digest = h.hexdigest()[:16]
    return _code_digest


def project_version() -> str:
    from .. import __version__
    return __version__


class Store:
    """One SQLite file (or ":memory:").  Writes go through `record` and `set_shrunk`, each one
    transaction; `seconds` adds up the time spent in them (the store's cost)."""

    def __init__(self, path: str | Path = DEFAULT_STORE):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.db.execute("PRAGMA schema_version")
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot open the store {self.path}: {err} (give another file "
                             f"with --store)") from None
        except sqlite3.DatabaseError:
            pass                        # said below, as not a campaign store
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")    # durable across a process kill
            self.db.executescript(_SCHEMA)
            with self._tx():
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                                (str(SCHEMA_VERSION),))
            (schema,), = self.db.execute("SELECT value FROM meta WHERE key = 'schema'")
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a campaign store: {err} "
                             f"(give another file with --store)") from None
        if schema != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has store schema {schema}, this smpkprobes reads "
                             f"{SCHEMA_VERSION} (give another file with --store)")
        self.seconds = 0.0
        self._lock_fd: int | None = None

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self, cid: int) -> None:
        """Hold campaign `cid` for this process until `close` (or its death)."""
        try:
            import fcntl
        except ImportError:             # no POSIX locks here: one client is trusted
            return
        if self.path == ":memory:":
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, cid)
        except OSError:
            raise StoreError(f"campaign {cid} in {self.path} is being run by another client "
                             f"(wait for it to finish, or stop it and run again to resume)"
                             ) from None

    def _tx(self):
        return _Transaction(self.db)

    # -- campaigns ------------------------------------------------------------------------
    def open_campaign(self, scenario: str, arguments: list[str], arch: str, policy: str,
                      new: bool = False, resume: bool = False) -> tuple[CampaignInfo, bool]:
        """The campaign of `scenario` with `arguments` on this code: the latest one recorded,
        or a new one.  Returns (campaign, whether it was resumed)."""
        digest, version = code_digest(), project_version()
        args = json.dumps(list(arguments))
        row = self.db.execute("SELECT * FROM campaigns WHERE scenario = ? AND arguments = ? "
                              "ORDER BY id DESC LIMIT 1", (scenario, args)).fetchone()
        what = f"{scenario} {' '.join(arguments)}".strip()
        if row is not None and not new:
            old = _info(row)
            if old.code_digest != digest:
                raise StoreError(
                    f"campaign {old.id} ({what}) in {self.path} was run by other code (digest "
                    f"{old.code_digest}, version {old.version}; this is {digest}, {version}) "
                    f"(pass --new to start a new campaign with this code)")
            self._lock(old.id)
            return old, True
        if resume:
            raise StoreError(f"no campaign of {what} in {self.path} to resume "
                             f"(drop --resume to start one)")
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO campaigns (scenario, arguments, arch, policy, version, "
                "code_digest, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (scenario, args, arch, policy, version, digest, time.time()))
        self._lock(cur.lastrowid)
        return self.campaign(cur.lastrowid), False

    def campaign(self, cid: int) -> CampaignInfo:
        row = self.db.execute("SELECT * FROM campaigns WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise StoreError(f"no campaign {cid} in {self.path} "
                             f"(see `smpkprobes campaign list`)")
        return _info(row)

    def campaigns(self) -> list[CampaignInfo]:
        return [_info(r) for r in self.db.execute("SELECT * FROM campaigns ORDER BY id")]

    # -- seeds ----------------------------------------------------------------------------
    def recorded(self, cid: int, lo: int, hi: int) -> set[int]:
        """The seeds in [lo, hi) already recorded for campaign `cid`."""
        return {s for (s,) in self.db.execute(
            "SELECT seed FROM seeds WHERE campaign = ? AND seed >= ? AND seed < ?",
            (cid, lo, hi))}

    def record(self, cid: int, rows: list[SeedRow]) -> None:
        """Record finished seeds and update the failure kinds, in one transaction."""
        t0 = time.perf_counter()
        now = time.time()
        with self._tx():
            self.db.executemany(
                "INSERT INTO seeds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(cid, r.seed, r.outcome, r.digest, r.kind, r.message, r.seconds, r.quanta,
                  r.replay, r.worker, now) for r in rows])
            for r in rows:
                if r.kind is None:
                    continue
                old = self.db.execute("SELECT first_seed FROM kinds WHERE campaign = ? AND "
                                      "kind = ?", (cid, r.kind)).fetchone()
                if old is None:
                    self.db.execute("INSERT INTO kinds VALUES (?, ?, ?, 1, ?, ?, NULL, NULL)",
                                    (cid, r.kind, r.seed, r.message or "", r.recording))
                elif r.seed < old[0]:
                    # A lower seed took over as the kind's first: its reproducer is shrunk
                    # from that seed from now on.
                    self.db.execute("UPDATE kinds SET first_seed = ?, count = count + 1, "
                                    "message = ?, recording = ?, shrunk = NULL, "
                                    "shrunk_note = NULL WHERE campaign = ? AND kind = ?",
                                    (r.seed, r.message or "", r.recording, cid, r.kind))
                else:
                    self.db.execute("UPDATE kinds SET count = count + 1 WHERE campaign = ? "
                                    "AND kind = ?", (cid, r.kind))
        self.seconds += time.perf_counter() - t0

    def seeds(self, cid: int, lo: int | None = None, hi: int | None = None) -> list[SeedRow]:
        """The recorded seeds of campaign `cid` (in [lo, hi) if given), in seed order."""
        q, params = "SELECT * FROM seeds WHERE campaign = ?", [cid]
        if lo is not None:
            q += " AND seed >= ? AND seed < ?"
            params += [lo, hi]
        return [SeedRow(*r[1:]) for r in self.db.execute(q + " ORDER BY seed", params)]

    def start_session(self, cid: int, engine: str) -> None:
        t0 = time.perf_counter()
        with self._tx():
            self.db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (cid, time.time(), engine))
        self.seconds += time.perf_counter() - t0

    def sessions(self, cid: int) -> list[tuple[float, str]]:
        """(start time, engine) of each client session of campaign `cid`."""
        return self.db.execute("SELECT started, engine FROM sessions WHERE campaign = ? "
                               "ORDER BY started", (cid,)).fetchall()

    def count(self, cid: int) -> tuple[int, int]:
        """(seeds recorded, of which failed) for campaign `cid`."""
        n, bad = self.db.execute("SELECT count(*), count(kind) FROM seeds WHERE campaign = ?",
                                 (cid,)).fetchone()
        return n, bad

    # -- kinds of failure -----------------------------------------------------------------
    def kinds(self, cid: int) -> list[dict]:
        """The campaign's failure kinds, by first seed."""
        cur = self.db.execute("SELECT kind, first_seed, count, message, recording, shrunk, "
                              "shrunk_note FROM kinds WHERE campaign = ? ORDER BY first_seed",
                              (cid,))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur]

    def set_shrunk(self, cid: int, kind: str, first_seed: int, command: str,
                   note: str) -> None:
        """Record the shrunk reproducer of `kind`, shrunk from `first_seed` (ignored if a lower
        seed has become the kind's first since)."""
        t0 = time.perf_counter()
        with self._tx():
            self.db.execute("UPDATE kinds SET shrunk = ?, shrunk_note = ? WHERE campaign = ? "
                            "AND kind = ? AND first_seed = ?",
                            (command, note, cid, kind, first_seed))
        self.seconds += time.perf_counter() - t0


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *exc):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _info(row) -> CampaignInfo:
    cid, scenario, args, arch, policy, version, digest, created = row
    return CampaignInfo(cid, scenario, json.loads(args), arch, policy, version, digest, created)
