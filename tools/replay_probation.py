#!/usr/bin/env python
"""Replay the probation's flag-rate watch (sp_server.server.driver.ModelHolder, --probation-alpha) on a finished
run: the flags of one server's queue and the reloads in its log.

    python tools/replay_probation.py QUEUE.db SERVE.log [--connections K] [--probation FRAMES] [--alpha P]

For each reloaded version: the settled frames before it (frames x connections, outside the probations of the
versions before), their flags, the flags within its probation, the smallest Poisson p over its probation and
where the watch would have failed it (flag count, frames on probation, expected count).  Frame numbers are per
connection (i-PI beads), so the frames of the server are frame x connections; flags are the queue's "local maximum"
rows.  The replay assumes every version held (it does not replay reverts)."""
from __future__ import annotations

import argparse

from ase.db import connect

from sp_server.server.driver import poisson_tail, version_switches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queue")
    p.add_argument("log", help="the server's log (sp-server serve --log)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--probation", type=int, default=2000, help="probation in frames of the server")
    p.add_argument("--alpha", type=float, default=1e-4)
    args = p.parse_args(argv)
    k = args.connections
    starts = {}   # each version's first frame on connection 0 (its reload; returns to an older one are left out)
    with open(args.log) as fh:
        for frame, version in version_switches(fh):
            if version > max(starts, default=-1):
                starts[version] = frame
    with connect(args.queue) as db:
        flags = sorted(int(r.frame) for r in db.select() if str(r.get("reason", "")).startswith("local maximum"))
    settled_frames = settled_flags = 0
    settled_from = 0
    versions = sorted(starts)
    for i, v in enumerate(versions):
        f0 = starts[v]
        f1 = starts[versions[i + 1]] if i + 1 < len(versions) else float("inf")
        settled_frames += k * (f0 - settled_from)
        settled_flags += sum(1 for f in flags if settled_from <= f < f0)
        end = min(f1, f0 + args.probation // k)
        on_probation = [f for f in flags if f0 <= f < end]
        worst, fail = 1.0, None
        for n, f in enumerate(on_probation, 1):
            seen = k * (f - f0 + 1)
            mu = seen * (settled_flags + 1) / settled_frames
            pv = poisson_tail(n, mu)
            worst = min(worst, pv)
            if pv < args.alpha and fail is None:
                fail = f"fails at flag {n}, {seen} frames into its probation (expected {mu:.2g}, p = {pv:.1g})"
        print(f"version {v} (loaded at frame {f0}): settled {settled_frames} frames, {settled_flags} flags; "
              f"{len(on_probation)} flags on probation, smallest p {worst:.2g}; {fail or 'holds'}")
        settled_from = end
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
