"""Headroom of the shipped family: target-only, draft-only and oracle-arbiter accuracy, and cost ratio.

    python -m models.headroom [--family-dir models/family] [--n 500] [--draft draft] [--json out.json]

See cospec_local/lab/testworld/headroom.py for what the oracle arbiter is.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cospec_local.lab.probes import decode_cost_ms
from cospec_local.lab.testworld.headroom import measure_headroom
from cospec_local.lab.testworld.tasks import FAMILIES

DEFAULT_FAMILY_DIR = Path(__file__).resolve().parent / "family"


def main(argv: list[str] | None = None) -> None:
    """Print (and optionally save) the headroom report for every task family."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family-dir", type=Path, default=DEFAULT_FAMILY_DIR)
    parser.add_argument("--target", default="target", help="member name of the target")
    parser.add_argument("--draft", default="draft", help="member name of the draft")
    parser.add_argument("--n", type=int, default=500, help="held-out problems per family")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-threads", type=int, default=2, help="threads for the cost timing")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    os.nice(10)  # measurement of accuracy is not timing-sensitive; stay out of the way
    target_path = args.family_dir / f"{args.target}.gguf"
    draft_path = args.family_dir / f"{args.draft}.gguf"

    report = {"target": str(target_path), "draft": str(draft_path), "families": {}}
    print(f"{'family':8} {'n':>5} {'target':>7} {'draft':>7} {'oracle':>7} {'gain':>6} "
          f"{'disagree':>8} {'fixes':>6} {'breaks':>6}")
    for family in args.families.split(","):
        result = measure_headroom(target_path, draft_path, family, n=args.n, n_threads=args.threads)
        report["families"][family] = result.as_dict()
        print(f"{family:8} {result.n:5d} {result.target_accuracy:7.3f} {result.draft_accuracy:7.3f} "
              f"{result.oracle_accuracy:7.3f} {result.oracle_gain_points:6.1f} {result.disagreements:8d} "
              f"{result.swap_fixes:6d} {result.swap_breaks:6d}", flush=True)

    target_ms = decode_cost_ms(target_path, n_threads=args.cost_threads)
    draft_ms = decode_cost_ms(draft_path, n_threads=args.cost_threads)
    report["cost_ms"] = {"target": target_ms, "draft": draft_ms, "threads": args.cost_threads,
                         "draft_over_target": draft_ms / target_ms}
    print(f"decode cost ({args.cost_threads} threads): target {target_ms:.3f} ms, draft {draft_ms:.3f} ms, "
          f"ratio {draft_ms / target_ms:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
