#!/usr/bin/env python3
"""Turn the tracker plugin's results (JSON lines from `framehost replay --results`) into a
MOTChallenge tracker file: `frame,id,left,top,width,height,conf,-1,-1,-1` in pixels, frames
from 1 (the plugin's frame index is 0-based).

Usage: scripts/results_to_mot.py RESULTS.jsonl --width 640 --height 480 > tracks.txt
"""
import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--width", type=float, required=True)
    parser.add_argument("--height", type=float, required=True)
    args = parser.parse_args()

    rows = 0
    with open(args.results) as lines:
        for line in lines:
            result = json.loads(line)
            data = result.get("data")
            if not isinstance(data, dict) or "tracks" not in data:
                continue  # the summary or another kind of result
            frame = int(data["frame"]) + 1
            for track in data["tracks"]:
                left, top, width, height = track["bbox"]
                print(
                    f"{frame},{track['id']},{left * args.width:.2f},{top * args.height:.2f},"
                    f"{width * args.width:.2f},{height * args.height:.2f},"
                    f"{track.get('confidence', 1.0)},-1,-1,-1"
                )
                rows += 1
    if rows == 0:
        print("no tracks in the results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
