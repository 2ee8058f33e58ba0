#!/usr/bin/env python3
"""Compare two Autobahn fuzzingclient reports case by case: the control (the echo server
reached directly) and the same server through framegate.

usage: autobahn_compare.py DIRECT_DIR GATEWAY_DIR

"Worse" uses summarize.py's categories: a case whose behavior is OK, NON-STRICT or
INFORMATIONAL and whose close behavior is OK or INFORMATIONAL is good; it is worse through
the gateway if it is good directly and not good (or missing) through the gateway. Cases that
are good both ways but differ (OK -> NON-STRICT, another close code) are listed as
differences, not failures. Cases that are bad both ways count as passed (no worse than the
control) and are listed.

Prints one line per worse case and a closing line `autobahn: N passed, M failed`.
Exit status: 0 if no case is worse, 1 if some are, 2 if a report is missing or empty.
"""
import json
import os
import sys

GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}
GOOD_CLOSE = {"OK", "INFORMATIONAL"}


def key(cid):
    return [int(x) for x in cid.split(".")]


def load(rdir):
    path = os.path.join(rdir, "index.json")
    try:
        idx = json.load(open(path))
    except (OSError, ValueError) as e:
        print("autobahn: no report at %s: %s" % (path, e))
        sys.exit(2)
    cases = {}
    for agent_cases in idx.values():
        cases.update(agent_cases)
    if not cases:
        print("autobahn: no case results in %s" % rdir)
        sys.exit(2)
    return cases


def good(v):
    return v is not None and v["behavior"] in GOOD and v["behaviorClose"] in GOOD_CLOSE


def show(v):
    if v is None:
        return "missing"
    return "behavior=%s close=%s code=%s" % (v["behavior"], v["behaviorClose"], v["remoteCloseCode"])


def main():
    direct, gateway = load(sys.argv[1]), load(sys.argv[2])
    worse, differ, bad_both = [], [], []
    for cid in sorted(direct, key=key):
        d, g = direct[cid], gateway.get(cid)
        if good(d) and not good(g):
            worse.append(cid)
            print("WORSE   %-8s direct: %s | gateway: %s" % (cid, show(d), show(g)))
        elif not good(d) and not good(g):
            bad_both.append(cid)
            print("bad both %-7s direct: %s | gateway: %s" % (cid, show(d), show(g)))
        elif g is not None and (d["behavior"], d["behaviorClose"]) != (g["behavior"], g["behaviorClose"]):
            differ.append(cid)
            print("differs %-8s direct: %s | gateway: %s" % (cid, show(d), show(g)))
    for cid in sorted(set(gateway) - set(direct), key=key):
        print("extra   %-8s gateway only: %s" % (cid, show(gateway[cid])))
    print("%d cases: %d differ but are not worse, %d are bad both ways"
          % (len(direct), len(differ), len(bad_both)))
    print("autobahn: %d passed, %d failed" % (len(direct) - len(worse), len(worse)))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
