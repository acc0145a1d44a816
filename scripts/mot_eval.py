#!/usr/bin/env python3
"""Score a tracker's MOTChallenge-format output against ground truth with motmetrics.

Both files are `frame,id,left,top,width,height,conf,...` in pixels. Prints MOTA, IDF1, MOTP
(mean IoU distance of matches, lower is better, as motmetrics defines it) and the number
of identity switches. With `--require`, exits 1 when MOTA or IDF1 falls below the bar.

Usage: scripts/mot_eval.py GT TRACKER [--require] [--min-mota 0.90] [--min-idf1 0.80]

Setup, once:  python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-eval.txt
"""

import argparse
import sys

import motmetrics as mm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gt", help="ground-truth file (MOTChallenge format)")
    parser.add_argument("tracker", help="tracker output (MOTChallenge format)")
    parser.add_argument("--require", action="store_true", help="exit 1 below the bar")
    parser.add_argument("--min-mota", type=float, default=0.90)
    parser.add_argument("--min-idf1", type=float, default=0.80)
    parser.add_argument(
        "--iou", type=float, default=0.5, help="IoU a match needs (default 0.5)"
    )
    args = parser.parse_args()

    gt = mm.io.loadtxt(args.gt, fmt="mot15-2D", min_confidence=1)
    ts = mm.io.loadtxt(args.tracker, fmt="mot15-2D")
    acc = mm.utils.compare_to_groundtruth(gt, ts, "iou", distth=1.0 - args.iou)

    mh = mm.metrics.create()
    summary = mh.compute(
        acc,
        metrics=["num_frames", "mota", "idf1", "motp", "num_switches",
                 "num_false_positives", "num_misses", "mostly_tracked"],
        name="seq",
    )
    row = summary.loc["seq"]
    mota, idf1 = float(row["mota"]), float(row["idf1"])
    print(f"frames {int(row['num_frames'])}")
    print(f"MOTA   {mota:.4f}")
    print(f"IDF1   {idf1:.4f}")
    print(f"MOTP   {float(row['motp']):.4f}  (mean 1-IoU of matches)")
    print(f"IDsw   {int(row['num_switches'])}")
    print(f"FP     {int(row['num_false_positives'])}")
    print(f"FN     {int(row['num_misses'])}")
    print(f"MT     {int(row['mostly_tracked'])}")

    if args.require and (mota < args.min_mota or idf1 < args.min_idf1):
        print(
            f"below the bar: need MOTA >= {args.min_mota} and IDF1 >= {args.min_idf1}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
