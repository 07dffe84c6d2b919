#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-only
"""Run the cohort bench's queries on DuckDB and PostgreSQL over the same Parquet files.

    run_peers.py DIR [--runs N] [--out FILE] [--engines duckdb,postgres] [--pg-dsn DSN]

DIR holds one <table>.parquet per table, queries.sql (queries each preceded by a line
"-- name: <name>", each returning one row with one column "count") and expected.json
({"<name>": <count>}). Every *.parquet in DIR is loaded as a table named after the file.

For each engine: load the tables and build the indexes (timed), then for each query one
warm-up run and N timed runs (client wall time: planning, execution and fetching the one
row). Prints a JSON report to stdout (or --out FILE) and a readable table to stderr.
Exits 1 if any count differs from expected.json or a query fails.

PostgreSQL is reached through --pg-dsn (or the usual PG* environment variables); the
tables are created in a schema "peers", dropped first if it exists. run_peers.sh starts
a throwaway server and passes the DSN.
"""

import argparse
import gc
import glob
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
NAME_LINE = re.compile(r"^\s*--\s*name:\s*(\S+)\s*$")
PG_SCHEMA = "peers"

# DuckDB type (as DESCRIBE prints it) -> PostgreSQL type.
PG_TYPES = {
    "BIGINT": "bigint",
    "INTEGER": "integer",
    "SMALLINT": "smallint",
    "TINYINT": "smallint",
    "UTINYINT": "smallint",
    "USMALLINT": "integer",
    "UINTEGER": "bigint",
    "UBIGINT": "numeric(20)",
    "HUGEINT": "numeric(39)",
    "BOOLEAN": "boolean",
    "DOUBLE": "double precision",
    "FLOAT": "real",
    "VARCHAR": "text",
    "DATE": "date",
    "TIME": "time",
    "TIMESTAMP": "timestamp",
    "TIMESTAMP_S": "timestamp",
    "TIMESTAMP_MS": "timestamp",
    "TIMESTAMP_NS": "timestamp",
    "TIMESTAMP WITH TIME ZONE": "timestamptz",
    "UUID": "uuid",
}

# Reported with the results, so that a reader sees what PostgreSQL ran with.
PG_REPORTED_SETTINGS = [
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "hash_mem_multiplier",
    "maintenance_work_mem",
    "max_worker_processes",
    "max_parallel_workers",
    "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers",
    "random_page_cost",
    "effective_io_concurrency",
    "jit",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "autovacuum",
    "dynamic_shared_memory_type",
    "lc_collate",
    "server_encoding",
]


class Fail(Exception):
    pass


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


def q(ident):
    return '"' + ident + '"'


def sql_str(s):
    return "'" + s.replace("'", "''") + "'"


def loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def check_idle(engine):
    """The 1-minute load average before an engine's run, with a warning if the machine is busy."""
    la = loadavg()
    if la is not None and la > 0.5:
        log(f"  warning: load average {la} before the {engine} run: other work is using the cores, "
            "timings will be noisy")
    return la


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- inputs


def find_tables(d):
    tables = {}
    for path in sorted(glob.glob(os.path.join(d, "*.parquet"))):
        name = os.path.basename(path)[: -len(".parquet")]
        if not IDENT.match(name):
            raise Fail(f"{path}: table name {name!r} is not a plain lower-case SQL identifier")
        tables[name] = os.path.abspath(path)
    if not tables:
        raise Fail(f"no *.parquet files in {d}")
    return tables


def parse_queries(text):
    queries, name, buf = {}, None, []

    def flush():
        if name is None:
            return
        sql = "\n".join(buf).strip()
        while sql.endswith(";"):
            sql = sql[:-1].rstrip()
        if not sql:
            raise Fail(f"queries.sql: query {name!r} is empty")
        queries[name] = sql

    for line in text.splitlines():
        m = NAME_LINE.match(line)
        if m:
            flush()
            name, buf = m.group(1), []
            if name in queries:
                raise Fail(f"queries.sql: query name {name!r} appears twice")
        elif name is not None:
            buf.append(line)
        elif line.strip() and not line.strip().startswith("--"):
            raise Fail("queries.sql: SQL before the first '-- name:' line")
    flush()
    if not queries:
        raise Fail("queries.sql: no '-- name: <name>' queries")
    return queries


def index_plan(columns):
    """Indexes for a table with these columns: code, and person_id (with field if present)."""
    plan = []
    if "code" in columns:
        plan.append(["code"])
    if "person_id" in columns:
        plan.append(["person_id", "field"] if "field" in columns else ["person_id"])
    return plan


def index_name(table, cols):
    return f"{table}_{'_'.join(cols)}_idx"


# ---------------------------------------------------------------- timing


def one_count(rows, description):
    if len(rows) != 1 or len(rows[0]) != 1:
        raise Fail(f"expected one row with one column, got {len(rows)} row(s) of {len(rows[0]) if rows else 0}")
    col = description[0][0] if description else "?"
    if col != "count":
        log(f"    note: result column is {col!r}, not 'count'")
    v = rows[0][0]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return int(v)


def time_query(run_once, runs):
    """One warm-up, then `runs` timed runs; returns (count, [ms...])."""
    count = run_once()
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            c = run_once()
            times.append((time.perf_counter() - t0) * 1000.0)
            if c != count:
                raise Fail(f"count changed between runs: {count} then {c}")
    finally:
        gc.enable()
    return count, times


def run_queries(engine, queries, expected, runs, run_once_for, problems):
    out = {}
    for name, sql in queries.items():
        try:
            count, times = time_query(run_once_for(sql), runs)
        except Fail as e:
            problems.append(f"{engine} {name}: {e}")
            out[name] = {"error": str(e)}
            log(f"  {name}: ERROR {e}")
            continue
        except Exception as e:  # a SQL error from the engine
            msg = f"{type(e).__name__}: {str(e).strip()}"
            problems.append(f"{engine} {name}: {msg}")
            out[name] = {"error": msg}
            log(f"  {name}: ERROR {msg}")
            continue
        entry = {
            "median_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3),
            "max_ms": round(max(times), 3),
            "count": count,
        }
        want = expected.get(name)
        entry["expected"] = want
        entry["ok"] = want is not None and count == want
        if want is None:
            problems.append(f"{engine} {name}: no expected count in expected.json (got {count})")
        elif count != want:
            problems.append(f"{engine} {name}: COUNT MISMATCH: got {count}, expected {want}")
        out[name] = entry
        log(f"  {name}: median {entry['median_ms']:.2f} ms, min {entry['min_ms']:.2f} ms, "
            f"count {count}{'' if entry['ok'] else '  <-- MISMATCH'}")
    return out


# ---------------------------------------------------------------- DuckDB


def run_duckdb(tables, queries, expected, runs, problems):
    import duckdb

    threads = cores()
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {threads}")
    log(f"duckdb {duckdb.__version__}: in memory, {threads} threads")
    load_avg = check_idle("duckdb")

    t0 = time.perf_counter()
    rows = {}
    for t, path in tables.items():
        con.execute(f"CREATE TABLE {q(t)} AS SELECT * FROM read_parquet({sql_str(path)})")
        rows[t] = con.execute(f"SELECT count(*) FROM {q(t)}").fetchone()[0]
    t1 = time.perf_counter()
    indexes = []
    for t in tables:
        cols = [r[0] for r in con.execute(f"DESCRIBE {q(t)}").fetchall()]
        for idx in index_plan(cols):
            con.execute(f"CREATE INDEX {q(index_name(t, idx))} ON {q(t)} ({', '.join(map(q, idx))})")
            indexes.append(f"{t}({', '.join(idx)})")
    t2 = time.perf_counter()
    log(f"  loaded in {t2 - t0:.2f} s (tables {t1 - t0:.2f} s, ART indexes {t2 - t1:.2f} s)")

    def run_once_for(sql):
        def run_once():
            cur = con.execute(sql)
            return one_count(cur.fetchall(), cur.description)
        return run_once

    result = {
        "version": duckdb.__version__,
        "settings": {
            "threads": con.execute("SELECT current_setting('threads')").fetchone()[0],
            "memory_limit": con.execute("SELECT current_setting('memory_limit')").fetchone()[0],
            "database": "in memory",
        },
        "load_s": round(t2 - t0, 3),
        "load": {"tables_s": round(t1 - t0, 3), "indexes_s": round(t2 - t1, 3)},
        "rows": rows,
        "indexes": indexes,
        "runs": runs,
        "loadavg_1m_at_start": load_avg,
    }
    result["queries"] = run_queries("duckdb", queries, expected, runs, run_once_for, problems)
    con.close()
    return result


# ---------------------------------------------------------------- PostgreSQL


def run_postgres(tables, queries, expected, runs, dsn, tmp_root, problems):
    import duckdb
    import psycopg

    # prepare_threshold=None: never prepare, so every run is parsed and planned like
    # DuckDB's (psycopg otherwise prepares a statement after its fifth execution).
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    cur = conn.cursor()
    version = cur.execute("SHOW server_version").fetchone()[0]
    settings = {}
    for s in PG_REPORTED_SETTINGS:
        settings[s] = cur.execute("SELECT current_setting(%s)", (s,)).fetchone()[0]
    log(f"postgres {version}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    load_avg = check_idle("postgres")
    cur.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
    cur.execute(f"CREATE SCHEMA {PG_SCHEMA}")
    cur.execute(f"SET search_path = {PG_SCHEMA}, public")

    duck = duckdb.connect(":memory:")
    duck.execute(f"SET threads = {cores()}")
    tmp = tempfile.mkdtemp(prefix="peers-csv.", dir=tmp_root)
    export_s = copy_s = 0.0
    rows = {}
    columns = {}
    try:
        for t, path in tables.items():
            desc = duck.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_str(path)})").fetchall()
            cols = []
            for col, typ, *_ in desc:
                base = typ.upper()
                if base.startswith("DECIMAL"):
                    pg_type = base.replace("DECIMAL", "numeric")
                elif base in PG_TYPES:
                    pg_type = PG_TYPES[base]
                else:
                    raise Fail(f"{t}.{col}: no PostgreSQL mapping for DuckDB type {typ}")
                cols.append((col, pg_type))
            columns[t] = [c for c, _ in cols]

            # Parquet -> CSV through DuckDB (PostgreSQL cannot read Parquet itself).
            csv = os.path.join(tmp, f"{t}.csv")
            t0 = time.perf_counter()
            duck.execute(f"COPY (SELECT * FROM read_parquet({sql_str(path)})) TO {sql_str(csv)} "
                         "(FORMAT csv, HEADER false)")
            t1 = time.perf_counter()
            # CREATE TABLE and COPY FREEZE in one transaction: with wal_level=minimal the
            # rows are not WAL-logged, and are written frozen and all-visible.
            ddl = ", ".join(f"{q(c)} {pt}" for c, pt in cols)
            with conn.transaction():
                cur.execute(f"CREATE TABLE {q(t)} ({ddl})")
                with cur.copy(f"COPY {q(t)} FROM STDIN WITH (FORMAT csv, FREEZE true)") as cp:
                    with open(csv, "rb") as f:
                        while True:
                            block = f.read(1 << 20)
                            if not block:
                                break
                            cp.write(block)
            t2 = time.perf_counter()
            os.remove(csv)
            export_s += t1 - t0
            copy_s += t2 - t1
            rows[t] = cur.execute(f"SELECT count(*) FROM {q(t)}").fetchone()[0]
    finally:
        duck.close()
        shutil.rmtree(tmp, ignore_errors=True)

    t0 = time.perf_counter()
    indexes = []
    for t in tables:
        for idx in index_plan(columns[t]):
            cur.execute(f"CREATE INDEX {q(index_name(t, idx))} ON {q(t)} ({', '.join(map(q, idx))})")
            indexes.append(f"{t}({', '.join(idx)})")
    t1 = time.perf_counter()
    for t in tables:
        cur.execute(f"VACUUM (ANALYZE) {q(t)}")
    t2 = time.perf_counter()
    index_s, analyze_s = t1 - t0, t2 - t1
    load_s = export_s + copy_s + index_s + analyze_s
    log(f"  loaded in {load_s:.2f} s (parquet->csv {export_s:.2f} s, COPY {copy_s:.2f} s, "
        f"B-tree indexes {index_s:.2f} s, VACUUM ANALYZE {analyze_s:.2f} s)")

    def run_once_for(sql):
        def run_once():
            cur.execute(sql)
            return one_count(cur.fetchall(), cur.description and [(d.name,) for d in cur.description])
        return run_once

    result = {
        "version": version,
        "settings": settings,
        "load_s": round(load_s, 3),
        "load": {
            "parquet_to_csv_s": round(export_s, 3),
            "copy_s": round(copy_s, 3),
            "indexes_s": round(index_s, 3),
            "vacuum_analyze_s": round(analyze_s, 3),
        },
        "rows": rows,
        "indexes": indexes,
        "runs": runs,
        "loadavg_1m_at_start": load_avg,
    }
    result["queries"] = run_queries("postgres", queries, expected, runs, run_once_for, problems)
    conn.close()
    return result


# ---------------------------------------------------------------- report


def print_table(report, queries):
    engines = list(report)
    w = max(32, 4 + max(map(len, queries)))
    log()
    log("load (s)".ljust(w) + "".join(e.rjust(22) for e in engines))
    log("  tables + indexes".ljust(w) + "".join(f"{report[e]['load_s']:.2f}".rjust(22) for e in engines))
    log()
    log("query: median (min) ms".ljust(w) + "".join(e.rjust(22) for e in engines) + "count".rjust(12))
    for name in queries:
        line = ("  " + name).ljust(w)
        counts = set()
        for e in engines:
            r = report[e]["queries"].get(name, {})
            if "error" in r:
                cell = "ERROR"
            else:
                cell = f"{r['median_ms']:.2f} ({r['min_ms']:.2f})" + ("" if r["ok"] else " !")
                counts.add(r["count"])
            line += cell.rjust(22)
        line += (", ".join(map(str, sorted(counts))) or "-").rjust(12)
        log(line)
    log()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--runs", type=int, default=11, help="timed runs per query after one warm-up (default 11)")
    ap.add_argument("--out", help="write the JSON report here instead of stdout")
    ap.add_argument("--engines", default="duckdb,postgres", help="comma-separated subset of duckdb,postgres")
    ap.add_argument("--pg-dsn", default=os.environ.get("PEERS_PG_DSN", ""),
                    help="libpq connection string (default: $PEERS_PG_DSN, then PG* variables)")
    ap.add_argument("--tmp-dir", default=None, help="where the PostgreSQL load's CSV files go (default: system temp)")
    args = ap.parse_args()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"duckdb", "postgres"}
    if unknown or not engines:
        ap.error(f"--engines: unknown engine(s) {', '.join(sorted(unknown)) or '(none given)'}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    try:
        tables = find_tables(args.dir)
        with open(os.path.join(args.dir, "queries.sql")) as f:
            queries = parse_queries(f.read())
        with open(os.path.join(args.dir, "expected.json")) as f:
            expected = json.load(f)
    except (Fail, OSError, ValueError) as e:
        log(f"run_peers: {e}")
        return 2

    log(f"{args.dir}: tables {', '.join(tables)}; queries {', '.join(queries)}; "
        f"{args.runs} runs after one warm-up; {cores()} cores")
    for name in expected:
        if name not in queries:
            log(f"note: expected.json names {name!r}, which queries.sql does not have")

    problems = []
    report = {}
    try:
        for e in engines:
            if e == "duckdb":
                report[e] = run_duckdb(tables, queries, expected, args.runs, problems)
            else:
                report[e] = run_postgres(tables, queries, expected, args.runs, args.pg_dsn, args.tmp_dir, problems)
            gc.collect()
    except Fail as e:
        log(f"run_peers: {e}")
        return 1

    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print_table(report, queries)
    if problems:
        log("!" * 72)
        log(f"!! {len(problems)} PROBLEM(S): counts missing, failed or not matching expected.json")
        for p in problems:
            log(f"!!   {p}")
        log("!" * 72)
        return 1
    log("all counts match expected.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
