"""The result store of a benchmark run: ``results.sqlite`` plus the images beside it.

Schema (``SCHEMA_VERSION`` 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- JSON: schema version, generation
                                                    -- settings, one entry per variant
    results(id INTEGER PRIMARY KEY,
            prompt_id TEXT, seed INTEGER, variant TEXT,   -- UNIQUE (prompt_id, seed, variant)
            suite TEXT, category TEXT, prompt TEXT,
            settings TEXT,        -- JSON: everything that decided the image
            image TEXT,           -- path relative to the run folder
            image_sha256 TEXT,
            seconds REAL,         -- generation wall time per image (batch time / batch size)
            batch_size INTEGER, worker TEXT, created_at TEXT,
            model_evals REAL,     -- denoiser evaluations per image (rows / images of the call;
                                  -- CFG: 2 per step), NULL in stores made before it existed
            model_calls INTEGER)  -- denoiser forward calls of the pipeline call that made it
    metrics(result_id INTEGER REFERENCES results(id), name TEXT, value REAL, details TEXT,
            PRIMARY KEY (result_id, name))          -- value NULL = metric failed

Crash safety (a run may be killed at any moment, ``kill -9`` included):

1. an image is written to a temporary file in its final folder, fsynced, then moved into place
   with ``os.replace`` (atomic), *before* its row exists;
2. a batch's rows and their metrics are inserted in one transaction (``BEGIN IMMEDIATE``), so
   a row present means its image and metrics are complete: the work is done;
3. an image without a row (killed between 1 and 2) is simply generated again and replaced;
   temporary files left by a kill are removed by the next run.

Several processes may write at once: WAL journal, a 60 s busy timeout, and
``INSERT ... ON CONFLICT DO NOTHING`` on the unique key, so a unit can never be recorded twice.
All SQL is parameterised.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["CONFIG_NAME", "DB_NAME", "SCHEMA_VERSION", "ResultRow", "Store", "StoreMismatch",
           "remove_stale_temp_files", "shard_lock", "write_image_atomic"]

DB_NAME = "results.sqlite"
CONFIG_NAME = "bench_config.json"
"""The resolved config of the latest run, saved next to the results."""
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
_TMP_SUFFIX = ".tmp"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS results (
        id INTEGER PRIMARY KEY,
        prompt_id TEXT NOT NULL,
        seed INTEGER NOT NULL,
        variant TEXT NOT NULL,
        suite TEXT NOT NULL,
        category TEXT NOT NULL,
        prompt TEXT NOT NULL,
        settings TEXT NOT NULL,
        image TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        seconds REAL NOT NULL,
        batch_size INTEGER NOT NULL,
        worker TEXT NOT NULL,
        created_at TEXT NOT NULL,
        model_evals REAL,
        model_calls INTEGER,
        UNIQUE (prompt_id, seed, variant))""",
    """CREATE TABLE IF NOT EXISTS metrics (
        result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value REAL,
        details TEXT,
        PRIMARY KEY (result_id, name))""",
)


class StoreMismatch(ValueError):
    """The run folder holds results made with other settings."""


@dataclass(frozen=True)
class ResultRow:
    """One generated image, ready to be recorded."""

    prompt_id: str
    seed: int
    variant: str
    suite: str
    category: str
    prompt: str
    settings: dict[str, Any]
    image: str
    image_sha256: str
    seconds: float
    batch_size: int
    worker: str
    metrics: dict[str, tuple[float | None, dict | None]] = field(default_factory=dict)
    """metric name -> (value, details)."""
    model_evals: float | None = None
    """Denoiser evaluations (batch rows) per image."""
    model_calls: int | None = None
    """Denoiser forward calls of the pipeline call (all its images together)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """A connection to ``results.sqlite`` in ``out_dir`` (created if needed)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            self._setup()
        except sqlite3.DatabaseError as err:
            self.conn.close()
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise
            raise ValueError(f"{self.path} is not an asyndm results database ({err}); move "
                             "it away or use another output folder") from None

    def _setup(self) -> None:
        # switching to WAL needs a moment alone with the file: retry while others hold it
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
                self.conn.execute("PRAGMA foreign_keys = ON")
                with self.transaction() as cur:
                    for statement in _SCHEMA:
                        cur.execute(statement)
                    # stores made before the cost columns existed gain them (NULL there)
                    have = {r[1] for r in cur.execute("PRAGMA table_info(results)")}
                    for col, kind in (("model_evals", "REAL"), ("model_calls", "INTEGER")):
                        if col not in have:
                            cur.execute(f"ALTER TABLE results ADD COLUMN {col} {kind}")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.ensure_meta("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)."""
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def ensure_meta(self, key: str, value: Any) -> None:
        """Record ``value`` under ``key``, or raise :class:`StoreMismatch` if it differs."""
        text = _dumps(value)
        with self.transaction() as cur:
            cur.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                        (key, text))
            old = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]
        if old != text:
            raise StoreMismatch(f"{self.path} holds results with {key} = {old}, not {text}; "
                                "use another output folder or the same settings")

    def meta(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"])
                for r in self.conn.execute("SELECT key, value FROM meta")}

    def done_keys(self) -> set[tuple[str, int, str]]:
        """``(prompt_id, seed, variant)`` of every recorded result."""
        rows = self.conn.execute("SELECT prompt_id, seed, variant FROM results")
        return {(r[0], r[1], r[2]) for r in rows}

    def add_results(self, rows: list[ResultRow]) -> int:
        """Record ``rows`` and their metrics in one transaction; returns how many were new."""
        added = 0
        with self.transaction() as cur:
            for r in rows:
                cur.execute(
                    "INSERT INTO results (prompt_id, seed, variant, suite, category, prompt, "
                    "settings, image, image_sha256, seconds, batch_size, worker, created_at, "
                    "model_evals, model_calls) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (r.prompt_id, r.seed, r.variant, r.suite, r.category, r.prompt,
                     _dumps(r.settings), r.image, r.image_sha256, float(r.seconds),
                     r.batch_size, r.worker, _now(), r.model_evals, r.model_calls),
                )
                if cur.rowcount == 1:
                    added += 1
                    self._insert_metrics(cur, cur.lastrowid, r.metrics)
        return added

    @staticmethod
    def _insert_metrics(cur: sqlite3.Cursor, result_id: int,
                        metrics: dict[str, tuple[float | None, dict | None]]) -> None:
        for name, (value, details) in metrics.items():
            cur.execute(
                "INSERT INTO metrics (result_id, name, value, details) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (result_id, name, value, None if details is None else _dumps(details)),
            )

    def add_metrics(self, scores: dict[int, dict[str, tuple[float | None, dict | None]]]) -> None:
        """Record metrics of existing results: ``{result_id: {name: (value, details)}}``."""
        with self.transaction() as cur:
            for result_id, metrics in scores.items():
                self._insert_metrics(cur, result_id, metrics)

    def results(self) -> list[sqlite3.Row]:
        """All result rows, ordered by suite, prompt, seed, variant."""
        return self.conn.execute(
            "SELECT * FROM results ORDER BY suite, prompt_id, seed, variant").fetchall()

    def metric_values(self) -> list[sqlite3.Row]:
        """``(result_id, name, value)`` of every recorded metric."""
        return self.conn.execute("SELECT result_id, name, value FROM metrics").fetchall()

    def missing_metrics(self, name: str) -> list[sqlite3.Row]:
        """Results that have no row for metric ``name``."""
        return self.conn.execute(
            "SELECT r.* FROM results r WHERE NOT EXISTS (SELECT 1 FROM metrics m "
            "WHERE m.result_id = r.id AND m.name = ?) ORDER BY r.id", (name,)).fetchall()


def write_image_atomic(image: Image.Image, path: Path) -> str:
    """Write ``image`` as PNG to ``path`` atomically; returns the file's sha256."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return hashlib.sha256(data).hexdigest()


@contextmanager
def shard_lock(root: Path, index: int, count: int) -> Iterator[None]:
    """Hold the run folder's lock of shard ``index`` of ``count`` for the body.

    A second process on the same shard is refused at once (``ValueError``) instead of
    generating the same images again; other shards (``accelerate launch``) run alongside.
    The lock is an ``flock`` on a hidden file, released by the OS if the process dies.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".lock-shard-{index}-of-{count}"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"{root}: shard {index + 1}/{count} is being run by {holder}; "
                             "wait for it to finish (a later run resumes) or use another "
                             "--out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temp_files(root: Path, older_than_s: float = 3600.0) -> int:
    """Delete temporary image files that killed runs left behind; returns how many.

    A temporary file is named ``.NAME.PID.tmp`` and lives for milliseconds; it is stale
    when process ``PID`` no longer runs (the store is local: SQLite WAL needs one host) or
    when it is older than ``older_than_s``. Files of running workers are left alone.
    """
    now, n = time.time(), 0
    for tmp in root.rglob(f".*{_TMP_SUFFIX}"):
        pid = tmp.name[: -len(_TMP_SUFFIX)].rpartition(".")[2]
        try:
            dead = not pid.isdigit() or not _pid_alive(int(pid))
            if dead or now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n
