#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-only
"""Write a small synthetic data set in the peers file contract, for smoke-testing run_peers.

    python sample_data.py DIR [--persons 10000] [--seed 42]

DIR gets person/condition/measurement/drug/procedure/consent.parquet, a queries.sql of
four cohort counts and an expected.json with their counts as computed by DuckDB here.
Everything is derived from hash(person_id, ..., seed), so the same arguments (and the
same pinned DuckDB) give the same files. Sizes per 10,000 persons: about 45,000
conditions, 100,000 measurements, 30,000 drugs, 20,000 procedures, 48,000 consents.
"""

import argparse
import json
import os
import sys

import duckdb

CONDITIONS = [
    "snomed:38341003",   # hypertension
    "snomed:44054006",   # type 2 diabetes
    "snomed:55822004",   # hyperlipidaemia
    "snomed:195967001",  # asthma
    "snomed:35489007",   # depression
    "snomed:13645005",   # COPD
    "snomed:49436004",   # atrial fibrillation
    "snomed:84114007",   # heart failure
    "snomed:709044004",  # chronic kidney disease
    "snomed:363346000",  # malignant neoplasm
    "snomed:24700007",   # multiple sclerosis
    "snomed:49049000",   # Parkinson's disease
]

# (code, unit, low, high)
MEASUREMENTS = [
    ("loinc:8480-6", "mm[Hg]", 90.0, 190.0),   # systolic blood pressure
    ("loinc:2345-7", "mg/dL", 60.0, 260.0),    # glucose
    ("loinc:39156-5", "kg/m2", 16.0, 46.0),    # BMI
    ("loinc:2093-3", "mg/dL", 110.0, 320.0),   # total cholesterol
    ("loinc:4548-4", "%", 4.2, 11.0),          # HbA1c
    ("loinc:2160-0", "mg/dL", 0.5, 3.5),       # creatinine
]

DRUGS = [
    "rxnorm:29046",   # lisinopril
    "rxnorm:6809",    # metformin
    "rxnorm:83367",   # atorvastatin
    "rxnorm:1191",    # aspirin
    "rxnorm:5640",    # ibuprofen
    "rxnorm:17767",   # amlodipine
    "rxnorm:11289",   # warfarin
    "rxnorm:7646",    # omeprazole
]

PROCEDURES = [
    "snomed:73761001",   # colonoscopy
    "snomed:29303009",   # electrocardiogram
    "snomed:80146002",   # appendectomy
    "snomed:232717009",  # coronary artery bypass graft
    "snomed:71651007",   # mammography
    "snomed:387713003",  # surgical procedure
]

# The engine's consent fields: one per demographic column and one per event table.
CONSENT_FIELDS = ["birth_year", "sex", "condition", "measurement", "drug", "procedure"]

QUERIES = {
    "diabetes_consented": """
SELECT count(DISTINCT c.person_id) AS count
FROM condition c
JOIN consent k ON k.person_id = c.person_id AND k.field = 'condition'
WHERE c.code = 'snomed:44054006'
""",
    "high_hba1c_born_1950s_60s": """
SELECT count(DISTINCT m.person_id) AS count
FROM measurement m
JOIN person p ON p.person_id = m.person_id
JOIN consent k ON k.person_id = m.person_id AND k.field = 'measurement'
JOIN consent kb ON kb.person_id = m.person_id AND kb.field = 'birth_year'
WHERE m.code = 'loinc:4548-4' AND m.value > 6.5
  AND p.birth_year BETWEEN 1950 AND 1969
""",
    "metformin_after_diabetes": """
SELECT count(DISTINCT c.person_id) AS count
FROM condition c
JOIN drug d ON d.person_id = c.person_id AND d.code = 'rxnorm:6809' AND d.date >= c.date
WHERE c.code = 'snomed:44054006'
  AND EXISTS (SELECT 1 FROM consent k WHERE k.person_id = c.person_id AND k.field = 'condition')
  AND EXISTS (SELECT 1 FROM consent k WHERE k.person_id = c.person_id AND k.field = 'drug')
""",
    # The shape of the engine's own SQL rendering (masked demographics, event sets).
    "female_diabetes_metformin_since_2015": """
WITH p AS (
  SELECT person.person_id,
    CASE WHEN kb.person_id IS NOT NULL THEN person.birth_year END AS birth_year,
    CASE WHEN ks.person_id IS NOT NULL THEN person.sex END AS sex
  FROM person
  JOIN (SELECT DISTINCT person_id FROM consent) ka ON ka.person_id = person.person_id
  LEFT JOIN consent kb ON kb.person_id = person.person_id AND kb.field = 'birth_year'
  LEFT JOIN consent ks ON ks.person_id = person.person_id AND ks.field = 'sex'
)
SELECT COUNT(*) AS count
FROM p
LEFT JOIN (
  SELECT DISTINCT e.person_id FROM condition e
  JOIN consent k ON k.person_id = e.person_id AND k.field = 'condition'
  WHERE e.code IN ('snomed:44054006')
) s1 ON s1.person_id = p.person_id
LEFT JOIN (
  SELECT DISTINCT e.person_id FROM drug e
  JOIN consent k ON k.person_id = e.person_id AND k.field = 'drug'
  WHERE e.code IN ('rxnorm:6809') AND e.date >= DATE '2015-01-01'
) s2 ON s2.person_id = p.person_id
WHERE (s1.person_id IS NOT NULL)
  AND (s2.person_id IS NOT NULL)
  AND p.sex IN ('female')
""",
}


def sql_list(values):
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def event_table(salt, n_max, codes, with_uv=False):
    """SQL for per-person events: 0..n_max events each, codes skewed to the list's head.

    salt keeps the draws of different tables independent."""
    return f"""
WITH per AS (
    SELECT person_id, unnest(range(0, CAST(u(person_id, {salt}) * ({n_max} + 1) AS INTEGER))) AS k
    FROM person
), ev AS (
    SELECT person_id, k,
           {sql_list(codes)} AS codes,
           u(person_id, {salt} + 10 + k) AS uc,
           u(person_id, {salt} + 1000 + k) AS ud,
           u(person_id, {salt} + 2000 + k) AS uv
    FROM per
)
SELECT CAST(person_id AS BIGINT) AS person_id,
       CAST(codes[1 + CAST(floor(uc * uc * len(codes)) AS INTEGER)] AS VARCHAR) AS code,
       CAST(DATE '2000-01-01' + CAST(floor(ud * 9000) AS INTEGER) AS DATE) AS date
       {", uv" if with_uv else ""}
FROM ev
ORDER BY person_id, date
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--persons", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    con = duckdb.connect()
    # u(a, b): a uniform number in [0, 1) from (a, b, seed), independent of thread scheduling.
    con.execute(f"CREATE MACRO u(a, b) AS CAST(hash(a, b, {int(args.seed)}) % 1000000007 AS DOUBLE) / 1000000007")
    con.execute(f"""
        CREATE TABLE person AS
        SELECT CAST(i AS BIGINT) AS person_id,
               CAST(1930 + floor(u(i, -1) * 80) AS INTEGER) AS birth_year,
               CAST(CASE WHEN u(i, -2) < 0.5 THEN 'female' ELSE 'male' END AS VARCHAR) AS sex
        FROM range(1, {args.persons} + 1) t(i)
    """)

    m_codes = [m[0] for m in MEASUREMENTS]
    m_unit = "map_from_entries([" + ", ".join(f"('{c}', '{u}')" for c, u, _, _ in MEASUREMENTS) + "])"
    m_low = "map_from_entries([" + ", ".join(f"('{c}', {lo})" for c, _, lo, _ in MEASUREMENTS) + "])"
    m_high = "map_from_entries([" + ", ".join(f"('{c}', {hi})" for c, _, _, hi in MEASUREMENTS) + "])"
    tables = {
        "condition": event_table(100_000, 8, CONDITIONS),
        "measurement": f"""
            SELECT person_id, code, date,
                   CAST(round(lo + uv * (hi - lo), 2) AS DOUBLE) AS value,
                   CAST(unit AS VARCHAR) AS unit
            FROM (
                SELECT e.*, {m_unit}[code] AS unit, {m_low}[code] AS lo, {m_high}[code] AS hi
                FROM ({event_table(200_000, 19, m_codes, with_uv=True)}) e
            )
            ORDER BY person_id, date
        """,
        "drug": event_table(300_000, 5, DRUGS),
        "procedure": event_table(400_000, 3, PROCEDURES),
        "consent": f"""
            SELECT CAST(p.person_id AS BIGINT) AS person_id, CAST(f.field AS VARCHAR) AS field
            FROM person p, (SELECT unnest({sql_list(CONSENT_FIELDS)}) AS field, generate_subscripts({sql_list(CONSENT_FIELDS)}, 1) AS fi) f
            WHERE u(p.person_id, -100 - f.fi) < 0.8
            ORDER BY 1, 2
        """,
    }
    for name, query in tables.items():
        con.execute(f"CREATE TABLE {name} AS {query}")

    for name in ["person", *tables]:
        path = os.path.join(args.dir, f"{name}.parquet")
        con.execute(f"COPY {name} TO '{path}' (FORMAT parquet)")

    expected = {}
    with open(os.path.join(args.dir, "queries.sql"), "w") as f:
        for name, query in QUERIES.items():
            f.write(f"-- name: {name}\n{query.strip()};\n\n")
            expected[name] = con.execute(query).fetchone()[0]
    with open(os.path.join(args.dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")

    sizes = {name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in ["person", *tables]}
    print(f"wrote {args.dir}: " + ", ".join(f"{n} {c}" for n, c in sizes.items()), file=sys.stderr)
    print(f"expected: {json.dumps(expected)}", file=sys.stderr)


if __name__ == "__main__":
    main()
