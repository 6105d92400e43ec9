#!/usr/bin/env python3
"""The stall soak's table (tests/soak/stall.sh): one row per L1 test machine
and the totals, from the results folder the soak wrote.

    summary.py RESULTS_DIR

A machine that froze has no summary.json; its boots are read from
boots.jsonl (what it finished before it froze).
"""
import glob
import json
import os
import re
import sys


def main():
    res = sys.argv[1]
    logs = sorted(glob.glob(os.path.join(res, "l1-*.log")),
                  key=lambda p: int(re.search(r"l1-(\d+)\.log$", p).group(1)))
    print("| L1 | CPUs | boots | stalled | other failures | L1 froze | broken (3 stalls in a row) | median boot-to-marker ms |")
    print("|---|---|---|---|---|---|---|---|")
    tot = {"boots": 0, "stalls": 0, "failed": 0, "froze": 0, "broken": 0}
    for log in logs:
        i = re.search(r"l1-(\d+)\.log$", log).group(1)
        d = os.path.join(res, f"l1-{i}")
        text = open(log, errors="replace").read()
        froze = "the L1 machine froze" in text
        boots = []
        bj = os.path.join(d, "soak", "boots.jsonl")
        if os.path.exists(bj):
            boots = [json.loads(l) for l in open(bj) if l.strip()]
        info = {}
        ij = os.path.join(d, "soak", "l1-info.json")
        if os.path.exists(ij):
            info = json.load(open(ij))
        stalls = sum(1 for b in boots if b["stalled"])
        failed = sum(1 for b in boots if not b["stalled"] and b["marker_ms"] is None)
        marks = sorted(b["marker_ms"] for b in boots if b["marker_ms"] is not None)
        broken = False
        sj = os.path.join(d, "soak", "summary.json")
        if os.path.exists(sj):
            broken = json.load(open(sj))["broken"]
        tot["boots"] += len(boots)
        tot["stalls"] += stalls
        tot["failed"] += failed
        tot["froze"] += froze
        tot["broken"] += broken
        med = marks[len(marks) // 2] if marks else "-"
        print(f"| {i} | {info.get('cpus', '-')} | {len(boots)} | {stalls} | {failed} | "
              f"{'yes' if froze else 'no'} | {'yes' if broken else 'no'} | {med} |")
    print(f"\nSOAK_TOTAL l1s={len(logs)} boots={tot['boots']} stalls={tot['stalls']} "
          f"other_failures={tot['failed']} froze_l1s={tot['froze']} broken_l1s={tot['broken']}")


if __name__ == "__main__":
    main()
