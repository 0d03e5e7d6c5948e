"""``tokenflow-summarize``: a sweep's table, plots and contact sheets, written under one folder."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tokenflow.errors import TokenFlowError
from tokenflow.evaluation.contact_sheets import write_contact_sheets
from tokenflow.evaluation.plots import write_plots
from tokenflow.evaluation.sweep import Sweep, load_sweep
from tokenflow.evaluation.tables import write_table


def write_summary(sweep: Sweep, out_dir: str | Path, cell: int = 128, n_frames: int = 4,
                  video: bool = True) -> dict[str, list[Path]]:
    """Table, plots and contact sheets of ``sweep`` under ``out_dir``."""
    csv_path, md_path = write_table(sweep, out_dir)
    return {"table": [csv_path, md_path], "plots": write_plots(sweep, out_dir),
            "contact_sheets": write_contact_sheets(sweep, out_dir, cell, n_frames, video)}


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenflow-summarize MULTIRUN_DIR [--out DIR] [--cell PX] [--frames N] [--no-video]``."""
    parser = argparse.ArgumentParser(prog="tokenflow-summarize", description="Summarise a Hydra sweep: table of "
                                     "swept parameters against every metric (CSV, Markdown), plots, contact sheets.")
    parser.add_argument("multirun", type=Path, help="a multirun directory, e.g. multirun/edit/<date>/<time>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <multirun>/summary)")
    parser.add_argument("--cell", type=int, default=128, help="contact-sheet cell width in pixels")
    parser.add_argument("--frames", type=int, default=4, help="frames per contact sheet")
    parser.add_argument("--no-video", action="store_true", help="skip the contact-sheet mp4s")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sweep = load_sweep(args.multirun)
        out = args.out or args.multirun / "summary"
        written = write_summary(sweep, out, args.cell, args.frames, not args.no_video)
    except TokenFlowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = sum(not j.ok for j in sweep.jobs)
    print(f"{len(sweep.jobs)} jobs ({failed} failed), swept: {', '.join(sweep.swept) or 'nothing'}; "
          f"{len(written['plots'])} plots, {len(written['contact_sheets'])} contact sheet files → {out}")
    return 0
