"""The on-disk index: a DuckDB database and the FAISS vector segments beside it.

Layout for ``--db pool.duckdb``::

    pool.duckdb                     samples, tokens, runs, scores (schema in migrations/)
    pool.duckdb.vectors/
        segment-000001.faiss        IndexIDMap2 over IndexFlatIP; ids are tokens.token_key

A run writes its segment file first (temporary name, then rename) and commits the rows that
reference it afterwards, in one transaction. A crash before the commit leaves an unreferenced
file that the next writing run deletes, and the database as it was.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from alembic.ddl.impl import DefaultImpl

import migrations
from trimdb import __version__
from trimdb.codecs import build_codec
from trimdb.errors import StorageError

log = logging.getLogger(__name__)

# The trained, empty codec index from which every segment of a trained codec starts.
CODEC_FILE = "codec.faiss"
# Every DuckDB database file has these magic bytes at offsets 8 to 11.
DUCKDB_MAGIC = b"DUCK"
DUCKDB_MAGIC_END = 12


@dataclass
class Segment:
    """One stored vector file and the token keys it covers."""

    segment_id: int
    file: str
    n_vectors: int
    dim: int


class Store:
    """An open trimdb database; use as a context manager."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False, create: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        # Segments opened by read_token_range, kept memory-mapped until close.
        self._open_segments: dict[int, tuple] = {}
        self._segment_ranges: list[tuple] | None = None
        if not self.path.exists() and not create:
            raise StorageError(f"no trimdb database at {self.path}; build one with `trimdb index CORPUS --db {self.path}`")
        if create and read_only:
            raise ValueError("a store cannot be created read-only")
        check_database_file(self.path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(
            f"duckdb:///{self.path}", connect_args={"read_only": read_only}, poolclass=sa.pool.StaticPool
        )
        try:
            self.connection = self.engine.connect()
        except (sa.exc.OperationalError, duckdb.IOException) as error:
            self.engine.dispose()
            raise StorageError(_lock_message(self.path, error)) from error
        self.raw = self.connection.connection.driver_connection
        try:
            self._check_schema()
        except BaseException:
            # An open connection would block other opens of this file in this process.
            self.close()
            raise

    @property
    def vectors_dir(self) -> Path:
        return Path(f"{self.path}.vectors")

    # Schema --------------------------------------------------------------------------------

    def _check_schema(self) -> None:
        current, head = schema_revision(self.connection), head_revision()
        self.connection.commit()
        if current == head:
            return
        if current is not None and not _is_known_revision(current):
            raise StorageError(
                f"{self.path} has schema revision {current}, which this trimdb {__version__} does not know; "
                "it was written by a newer trimdb: upgrade trimdb to open it"
            )
        if self.read_only:
            raise StorageError(
                f"{self.path} has schema revision {current}, older than {head}; run `trimdb migrate --db {self.path}` first"
            )
        upgrade_schema(self.connection, "head")
        self.connection.commit()
        log.info("upgraded %s from schema revision %s to %s", self.path, current, head)

    # Transactions and queries --------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Yield the raw DuckDB connection inside one transaction, rolled back on any error."""
        if self.read_only:
            raise StorageError(f"{self.path} is open read-only")
        if self.connection.in_transaction():
            self.connection.commit()
        try:
            with self.connection.begin():
                yield self.raw
        except (sa.exc.DBAPIError, duckdb.Error) as error:
            message = _duckdb_write_failure(error)
            if message is None:
                raise
            raise StorageError(message) from error

    def query(self, sql: str, parameters: list | tuple | None = None):
        return self.raw.execute(sql, parameters or [])

    def query_arrow(self, sql: str, parameters: list | tuple | None = None) -> pa.Table:
        """Run a query and return its rows as an Arrow table, without the copy of a DB-API result."""
        return self.raw.sql(sql, params=list(parameters or [])).to_arrow_table()

    def catalog(self) -> dict:
        rows = self.query("SELECT key, value FROM catalog").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def next_id(self, table: str, column: str) -> int:
        return int(self.query(f"SELECT coalesce(max({column}), 0) + 1 FROM {table}").fetchall()[0][0])

    def start_run(self, connection, kind: str, arguments: dict, settings: dict) -> int:
        run_id = self.next_id("runs", "run_id")
        self.insert_run(connection, run_id, kind, arguments, settings)
        return run_id

    def insert_run(self, connection, run_id: int, kind: str, arguments: dict, settings: dict) -> None:
        connection.execute(
            "INSERT INTO runs (run_id, kind, started_at, trimdb_version, arguments, settings) VALUES (?, ?, ?, ?, ?, ?)",
            [run_id, kind, _now(), __version__, json.dumps(arguments), json.dumps(settings)],
        )

    def finish_run(self, connection, run_id: int, stats: dict) -> None:
        connection.execute(
            "UPDATE runs SET finished_at = ?, stats = ? WHERE run_id = ?", [_now(), json.dumps(stats), run_id]
        )

    def insert_arrow(self, connection, table: str, data) -> None:
        """Append a pyarrow table (columns named as in ``table``) in one statement."""
        connection.register("_trimdb_batch", data)
        try:
            columns = ", ".join(data.column_names)
            connection.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _trimdb_batch")
        finally:
            connection.unregister("_trimdb_batch")

    # Vector segments -----------------------------------------------------------------------

    def write_segment(self, segment_id: int, vectors: np.ndarray, keys: np.ndarray,
                      codec: str = "float32") -> tuple[str, int]:
        """Write vectors (N, D) float32 under int64 ids; return (file name, bytes). Atomic by rename."""
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"vectors {vectors.shape} and keys {keys.shape} do not match")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.vectors_dir.mkdir(exist_ok=True)
        index = faiss.IndexIDMap2(self._codec_template(codec, vectors))
        index.add_with_ids(vectors, np.ascontiguousarray(keys, dtype=np.int64))
        name = f"segment-{segment_id:06d}.faiss"
        _write_index_atomically(index, self.vectors_dir / name)
        return name, (self.vectors_dir / name).stat().st_size

    def _codec_template(self, codec: str, vectors: np.ndarray):
        """Return an empty trained index of ``codec``, training and saving it on first use."""
        path = self.vectors_dir / CODEC_FILE
        if path.exists():
            template = faiss.read_index(str(path))
            if template.d != vectors.shape[1]:
                raise StorageError(f"{path} encodes {template.d} dimensions but the vectors have {vectors.shape[1]}")
            return template
        template, trained = build_codec(codec, vectors)
        if trained:
            _write_index_atomically(template, path)
        return faiss.clone_index(template)

    def segments(self) -> list[Segment]:
        rows = self.query("SELECT segment_id, file, n_vectors, dim FROM segments ORDER BY segment_id").fetchall()
        return [Segment(*row) for row in rows]

    def open_segment(self, segment: Segment):
        """Memory-map one segment and check it against its catalog row."""
        path = self.vectors_dir / segment.file
        if not path.exists():
            raise StorageError(
                f"vector file {path} is missing: the database lists it as segment {segment.segment_id}. "
                "Restore the file or rebuild the index"
            )
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        if index.ntotal != segment.n_vectors or index.d != segment.dim:
            raise StorageError(
                f"vector file {path} holds {index.ntotal} vectors of dimension {index.d}, but the database "
                f"expects {segment.n_vectors} of dimension {segment.dim}; rebuild the index"
            )
        return index

    def _token_ranges(self) -> list[tuple]:
        """Return (segment_id, first token key, last token key) of every segment, read once per Store."""
        if self._segment_ranges is None:
            self._segment_ranges = self.query(
                "SELECT segment_id, first_token_key, last_token_key FROM segments ORDER BY segment_id").fetchall()
        return self._segment_ranges

    def read_token_range(self, first_key: int, count: int) -> np.ndarray:
        """Return the vectors (count, D) of ``count`` consecutive token keys from ``first_key``.

        A run assigns consecutive keys to the vectors of its segment in order, so a key's row in
        its segment is its offset from the segment's first key.
        """
        for segment_id, first, last in self._token_ranges():
            if first <= first_key and first_key + count - 1 <= last:
                break
        else:
            raise StorageError(f"token keys {first_key}..{first_key + count - 1} are in no single vector segment")
        if segment_id not in self._open_segments:
            segment = next(s for s in self.segments() if s.segment_id == segment_id)
            index = self.open_segment(segment)
            # An open segment can hold all of its codes in memory (FAISS maps only some index types
            # from disk), so one segment stays open at a time. Ascending reads open each one once.
            self._open_segments.clear()
            self._open_segments[segment_id] = (index, faiss.downcast_index(index.index))
        return self._open_segments[segment_id][1].reconstruct_n(first_key - first, count)

    def read_tokens(self, keys: np.ndarray) -> np.ndarray:
        """Return the vectors (n, D) of ascending token keys, reading each run of consecutive keys at once."""
        if len(keys) == 0:
            segments = self.segments()
            return np.zeros((0, segments[0].dim if segments else 0), dtype=np.float32)
        segment_starts = np.array([first for _, first, _ in self._token_ranges()], dtype=np.int64)
        # A run ends where keys stop being consecutive or where the next key starts a segment.
        breaks = (np.diff(keys) != 1) | np.isin(keys[1:], segment_starts)
        starts = np.concatenate([[0], np.flatnonzero(breaks) + 1])
        ends = np.concatenate([starts[1:], [len(keys)]])
        return np.concatenate([self.read_token_range(int(keys[a]), int(b - a)) for a, b in zip(starts, ends)])

    def iter_vectors(self, segment: Segment, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (token keys (n,), vectors (n, D)) of one segment in chunks of at most ``chunk`` rows."""
        index = self.open_segment(segment)
        keys = faiss.vector_to_array(index.id_map).astype(np.int64)
        flat = faiss.downcast_index(index.index)
        for start in range(0, segment.n_vectors, chunk):
            count = min(chunk, segment.n_vectors - start)
            yield keys[start:start + count], flat.reconstruct_n(start, count)
        del flat, index  # the flat index is owned by the ID map; release both together

    def remove_orphan_segments(self) -> None:
        """Delete vector files that no committed segment row references (left by a crashed run)."""
        if not self.vectors_dir.exists():
            return
        known = {segment.file for segment in self.segments()}
        if known:
            known.add(CODEC_FILE)
        ann = self.catalog().get("ann")
        if ann is not None:
            known.add(ann["file"])
        for path in self.vectors_dir.iterdir():
            if path.name not in known:
                log.warning("removing %s: no committed run references it", path)
                path.unlink()

    def size_bytes(self) -> int:
        """Return the bytes of the database file, its write-ahead log (if any) and its vector files."""
        total = self.path.stat().st_size
        wal = Path(f"{self.path}.wal")
        if wal.exists():
            total += wal.stat().st_size
        if self.vectors_dir.exists():
            total += sum(p.stat().st_size for p in self.vectors_dir.iterdir())
        return total

    def close(self) -> None:
        self._open_segments = {}
        self.connection.close()
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_index_atomically(index, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        faiss.write_index(index, str(temporary))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        # FAISS raises RuntimeError for a failed write, with the OS reason in parentheses at the end.
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:
            match = re.search(r"\(([^()]+)\)$", str(error).strip())
            reason = match.group(1) if match else str(error).strip()
        raise StorageError(_write_failure_message(temporary, reason)) from error


def _write_failure_message(path: Path, reason: str) -> str:
    return (f"failed to write {path}: {reason}. Free space on the disk that holds {path.parent} "
            "(or raise the file size limit, `ulimit -f`) and rerun")


def _duckdb_write_failure(error: Exception) -> str | None:
    """Return the message for a DuckDB error (raw or wrapped by SQLAlchemy) that is a failed write, else None."""
    original = getattr(error, "orig", None) or error
    # DuckDB 2.0 words a failed write as: Could not write file "PATH": OS REASON.
    match = re.search(r'Could not (?:write|write all bytes to|fsync) file "([^"]+)": (.+)', str(original))
    if match is None:
        return None
    return _write_failure_message(Path(match.group(1)), match.group(2))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def check_database_file(path: Path) -> None:
    """Raise StorageError when an existing file does not start with a DuckDB header.

    DuckDB opens some other files (a JSONL file, for one) as an empty in-memory database without
    an error, so writes to it would vanish and reads would fail later with an unrelated message.
    A missing or empty file passes: DuckDB creates the first and reports the second itself.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as file:
        header = file.read(DUCKDB_MAGIC_END)
    if header[DUCKDB_MAGIC_END - len(DUCKDB_MAGIC):] != DUCKDB_MAGIC:
        raise StorageError(
            f"{path} is not a DuckDB database file; pass the --db file of a trimdb index, or a new path to create one"
        )


def _lock_message(path: Path, error: Exception) -> str:
    text = str(error)
    if "lock" in text.lower():
        holder = re.search(r"lock is held in (.+?) \(PID (\d+)\)", text)
        detail = f"{holder.group(1)}, PID {holder.group(2)}" if holder else text.splitlines()[0]
        return (
            f"database {path} is in use by another process ({detail}); wait for it to finish. DuckDB lets "
            "one process write a database file, or several processes read it, but not both at once"
        )
    write_failure = _duckdb_write_failure(error)
    if write_failure:
        return write_failure
    return f"cannot open database {path}: {text.splitlines()[0] if text else type(error).__name__}"


# Alembic -----------------------------------------------------------------------------------


class DuckDBImpl(DefaultImpl):
    """Alembic has no DuckDB dialect implementation; the default one handles trimdb's DDL."""

    __dialect__ = "duckdb"
    transactional_ddl = True


def _alembic_config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _is_known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    return any(script.revision == revision for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions())


def schema_revision(connection: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(connection: sa.Connection, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)


def downgrade_schema(connection: sa.Connection, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(_alembic_config(connection), revision)
