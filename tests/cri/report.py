#!/usr/bin/env python3
"""Compares critest's ginkgo JSON reports of two runtime handlers.

    report.py BASE_NAME BASE.json HUSK_NAME HUSK.json EXCEPTIONS [OUT.txt]

Prints one table: for each group (the outermost ginkgo container, e.g.
"[k8s.io] Container", "Security Context", "Networking") the passed/total of
each handler (skipped specs are not counted), then the specs the second
handler failed that the first passed, each with its first error line, and
which of those the exceptions file (one spec text per line, `# reason`
after it) expects. Exit 1 when the second handler fails a spec the first
passes that is not an expected exception; exceptions that pass now are
reported (not a failure).
"""
import json, re, sys
from collections import OrderedDict

base_name, base_file, husk_name, husk_file, exc_file = sys.argv[1:6]
out = open(sys.argv[6], "w") if len(sys.argv) > 6 else None


def say(s=""):
    print(s)
    if out:
        out.write(s + "\n")


def specs(path):
    """{full text: (group, state, first error line)} of one report."""
    res = OrderedDict()
    try:
        with open(path) as fh:
            reports = json.load(fh)
    except (OSError, ValueError) as e:
        say("(no report %s: %s)" % (path, e))
        return res
    for suite in reports:
        for s in suite.get("SpecReports") or []:
            if s.get("LeafNodeType") != "It":
                continue
            hier = [t for t in (s.get("ContainerHierarchyTexts") or [])]
            text = " ".join(hier + [s.get("LeafNodeText", "")])
            group = re.sub(r"^\[k8s\.io\] ", "", hier[0]) if hier else "(top)"
            group = re.sub(r" \[Conformance\]$", "", group)
            state = s.get("State", "?")
            msg = ((s.get("Failure") or {}).get("Message") or "").strip()
            first = next((l.strip() for l in msg.splitlines() if l.strip()), "")
            loc = (s.get("Failure") or {}).get("Location") or {}
            if first and loc.get("FileName"):
                first += "  (%s:%s)" % (loc["FileName"].split("/")[-1], loc.get("LineNumber", "?"))
            res[text] = (group, state, first)
    return res


def exceptions(path):
    exc = OrderedDict()
    try:
        lines = open(path).read().splitlines()
    except OSError:
        lines = []
    for l in lines:
        if not l.strip() or l.lstrip().startswith("#"):
            continue
        text, _, reason = l.partition(" # ")
        exc[text.strip()] = reason.strip()
    return exc


base, husk, exc = specs(base_file), specs(husk_file), exceptions(exc_file)
cols = [(base_name, base)] + ([(husk_name, husk)] if husk_file != base_file else [])
groups = OrderedDict()
for _, rep in cols:
    for text, (g, st, _) in rep.items():
        c = groups.setdefault(g, [[0, 0] for _ in cols])
for i, (_, rep) in enumerate(cols):
    for text, (g, st, _) in rep.items():
        if st in ("skipped", "pending"):
            continue
        groups[g][i][1] += 1
        if st == "passed":
            groups[g][i][0] += 1

w = max([len(g) for g in groups] + [5])
say(("%-*s" % (w, "group")) + "".join("  %9s" % n for n, _ in cols))
tot = [[0, 0] for _ in cols]
for g, c in groups.items():
    if not any(t for _, t in c):
        continue
    for i, (p, t) in enumerate(c):
        tot[i][0] += p
        tot[i][1] += t
    say(("%-*s" % (w, g)) + "".join("  %9s" % ("%d/%d" % (p, t) if t else "-") for p, t in c))
say(("%-*s" % (w, "total")) + "".join("  %9s" % ("%d/%d" % tuple(t)) for t in tot))

regress, expected = [], []
if len(cols) == 1:
    base = {}  # one handler: only the table and its failures
for text, (g, st, _) in base.items():
    if st != "passed":
        continue
    h = husk.get(text)
    if h is None or h[1] in ("skipped", "pending"):
        continue
    if h[1] != "passed":
        (expected if text in exc else regress).append((text, h))
if len(cols) == 2:
    say()
    say("%s failures that %s passed: %d (%d expected, README)" % (husk_name, base_name, len(regress) + len(expected), len(expected)))
for text, (g, st, first) in expected + regress:
    tag = "expected" if text in exc else "NEW"
    say("  [%s] %s (%s)" % (tag, text, st))
    if text in exc:
        say("      why: %s" % exc[text])
    say("      error: %s" % (first or "(no message)"))
for name, rep in cols[:1]:
    bad = [(t, v) for t, v in rep.items() if v[1] not in ("passed", "skipped", "pending")]
    if bad:
        say()
        say("%s failures (the harness or the peer runtime):" % name)
        for t, (g, st, first) in bad:
            say("  %s (%s)\n      error: %s" % (t, st, first or "(no message)"))
now_pass = [t for t in exc if t in husk and husk[t][1] == "passed"]
if now_pass:
    say()
    say("expected exceptions that %s passes now (remove them from %s):" % (husk_name, exc_file))
    for t in now_pass:
        say("  " + t)
if len(cols) == 1:
    sys.exit(1 if any(v[1] not in ("passed", "skipped", "pending") for v in specs(base_file).values()) else 0)
if regress:
    say()
    say("FAIL: %d spec(s) %s passes and %s fails, not in %s" % (len(regress), base_name, husk_name, exc_file))
    sys.exit(1)
say()
say("OK: %s passes every spec %s passes, but the %d expected exceptions" % (husk_name, base_name, len(expected)))
