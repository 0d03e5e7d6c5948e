"""``tokenflow-metrics``: score finished runs again (no editing) and update each run's metrics.json."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tokenflow.errors import TokenFlowError
from tokenflow.evaluation.recompute import recompute
from tokenflow.runs.layout import is_run_dir, job_dirs


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenflow-metrics RUN_DIR... [--metrics NAME|FILE] [--masks PATH] [--prompt TEXT] [KEY=VALUE ...]``."""
    parser = argparse.ArgumentParser(prog="tokenflow-metrics", description="Score finished runs again (no editing) "
                                     "and update each run's metrics.json; a multirun directory scores all its jobs.")
    parser.add_argument("items", nargs="+", metavar="RUN_DIR|KEY=VALUE",
                        help="run or multirun directories, and suite settings such as clip.model=/path/to/clip")
    parser.add_argument("--metrics", default=None, help="conf/metrics option (default, full, tiny, none) or a YAML "
                        "file; default: the run's own metrics config, else 'default'")
    parser.add_argument("--masks", default=None, help="object masks: a folder of images or a video (white = object)")
    parser.add_argument("--prompt", default=None, help="target prompt (default: the run's)")
    parser.add_argument("--device", default=None, help="device of model-based metrics (default: the run's)")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    overrides = [i for i in args.items if "=" in i and not Path(i).exists()]
    runs = [Path(i) for i in args.items if i not in overrides]
    failures = 0
    for run in runs:
        try:
            jobs = [run] if is_run_dir(run) else job_dirs(run)
        except TokenFlowError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        for job in jobs:
            try:
                record = recompute(job, args.metrics, args.masks, args.prompt, overrides, args.device)
            except TokenFlowError as e:
                print(f"{job}: error: {e}", file=sys.stderr)
                failures += 1
                continue
            print(f"{job}: " + ", ".join(f"{k}={record['metrics'][k]:.4g}" for k in record["info"]["recomputed_metrics"]))
    return 2 if failures else 0
