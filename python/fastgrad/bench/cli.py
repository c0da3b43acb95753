"""``python -m fastgrad bench``: flags, the loop over cases and sizes, the summary and the
exit status (1 when any fastgrad result differs from torch)."""
import argparse
import datetime
import os
import sys
import time

import torch

from .cases import CASE_NAMES, CASES, get_case
from .report import (FAULTS_NOTE, JSON_DEFINITIONS, Progress, machine_info, plot, table_header,
                     table_row, versions, write_json)
from .runner import HAND_TARGET, HAND_TARGET_MIN_NUMEL, bench_one
from .timing import copy_bandwidth

QUICK_SIZES = [1_000, 100_000, 4_000_000]
FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000, 4_000_000, 10_000_000]


def _checked(parse, ok, what):
    """An argparse type: the text ``parse``d, then ``ok`` of the value, else argparse's usage
    error saying it must be ``what``."""
    def check(s):
        try:
            v = parse(s)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, not {s!r}")
        return v
    return check


_sizes = _checked(lambda s: [int(float(v)) for v in s.split(",") if v.strip()],
                  lambda v: v and min(v) >= 1, "a comma-separated list of positive numbers")
_count = _checked(int, lambda v: v >= 1, "an integer of at least 1")  # --repeats, --threads
_seconds = _checked(float, lambda v: 0 <= v < float("inf"),  # --min-time
                    "a finite number of seconds, 0 or more")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastgrad bench",
        description="fastgrad.grad vs torch.autograd.grad (and torch.func, torch.compile) on "
                    "the same graphs; every case is checked against torch before it is timed.",
        epilog="cases: " + ", ".join(CASE_NAMES))
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="comma-separated element counts, e.g. 1e3,1e5,4e6 (default "
                        f"{','.join(f'{s:g}' for s in QUICK_SIZES)}; with --full "
                        f"{','.join(f'{s:g}' for s in FULL_SIZES)})")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--full", action="store_true",
                   help="more sizes, more repeats, torch.compile on")
    p.add_argument("--repeats", type=_count, default=None,
                   help="timed rounds per case and size (default 7, --full 15)")
    p.add_argument("--min-time", type=_seconds, default=None,
                   help="keep timing until this many seconds passed (default 0.1, --full 0.5)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile (default: on with --full; compiling is slow)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-func", dest="func", action="store_false",
                   help="do not time torch.func")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="skip fastgrad.explain (kernel launch counts)")
    p.add_argument("--threads", type=_count, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=os.path.join("bench-results", "bench-results.json"),
                   help="where to write every number (default %(default)s)")
    p.add_argument("--png", default=os.path.join("bench-results", "bench-speedup.png"),
                   help="speedup plot (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    a.sizes = a.sizes or (FULL_SIZES if a.full else QUICK_SIZES)
    a.repeats = a.repeats if a.repeats is not None else (15 if a.full else 7)
    a.min_time = a.min_time if a.min_time is not None else (0.5 if a.full else 0.1)
    a.budget = 6.0 if a.full else 3.0
    if a.compile is None:
        a.compile = a.full
    if a.cases:
        names = [c.strip() for c in a.cases.split(",") if c.strip()]
        bad = [c for c in names if c not in CASE_NAMES]
        if bad:
            p.error(f"unknown case(s) {', '.join(bad)}; cases: {', '.join(CASE_NAMES)}")
        a.case_list = [get_case(c) for c in names]
    else:
        a.case_list = list(CASES)
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.list:
        for c in CASES:
            print(f"{c.name:22} {c.group:12} order {c.order}  {c.describe()}")
        return 0
    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        print(f"bench: bad --device {a.device!r}: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None \
            else "no CUDA device is visible"
        print(f"bench: --device {a.device}: CUDA is not available ({why}; torch "
              f"{torch.__version__}).", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"bench: --device must be cpu or cuda, not {a.device!r}", file=sys.stderr)
        return 2
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    machine = machine_info(device)
    vers = versions()
    bw = copy_bandwidth(dtype, device)
    print(f"fastgrad {vers['fastgrad']}, torch {vers['torch']}, {a.dtype} on {device}, "
          f"{machine['torch_threads']} threads, {machine.get('cpu_model') or machine.get('gpu', '')}"
          .rstrip(", "))
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write); torch.compile "
          f"{'on' if a.compile else 'off (--compile)'}; hand-fused loop "
          f"{'present' if vers['hand_fused_sin_exp_grad'] else 'n/a'}")
    load = machine.get("loadavg_start")
    if load and load[0] > (os.cpu_count() or 1):
        print(f"warning: load average {load[0]:.1f} on {os.cpu_count()} cores: timings will be "
              "noisy (other processes; --threads 1 is less sensitive to it)")
    print("floor = bytes that must move / copy bandwidth, as a fraction of fastgrad's time; "
          "'!' = result differs from torch")
    print(table_header())
    progress = Progress(len(a.case_list) * len(a.sizes),
                        enabled=not a.quiet and sys.stderr.isatty())
    rows = []
    for case in a.case_list:
        for n in a.sizes:
            progress.start(f"{case.name} {n:g}")
            row = bench_one(case, n, dtype, device, a, bw, progress)
            rows.append(row)
            progress.print(table_row(row))
            progress.step()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    progress.clear()

    failed = [r for r in rows if r["check"] != "ok"]
    notes = []
    for r in rows:
        for k, v in r.get("checks", {}).items():
            if v != "ok":
                notes.append(f"{r['case']} {r['size']}: {k}: {v}")
        for k, v in r.get("errors", {}).items():
            if k not in ("fastgrad", "timing") and v != "n/a":
                notes.append(f"{r['case']} {r['size']}: {k}: {v}")
        pf = r.get("page_faults", {})
        if any(v >= FAULTS_NOTE for v in pf.values()):
            notes.append(f"{r['case']} {r['size']}: page faults per call (fresh memory from "
                         "the allocator; the times include them): " +
                         ", ".join(f"{k} {v:.0f}" for k, v in pf.items()))
    # group repeated notes (compile's double-backward error appears once per size)
    seen = {}
    for nline in notes:
        key = nline.split(": ", 1)[1]
        seen.setdefault(key, []).append(nline.split(":", 1)[0])
    for key, where in seen.items():
        print(f"note: {key}  [{', '.join(where)}]")
    hand_rows = [r for r in rows if "fastgrad_over_hand" in r]
    for r in hand_rows:
        met = r["hand_target_met"]
        verdict = (f"target <= {HAND_TARGET}x: {'met' if met else 'NOT met'}" if met is not None
                   else f"not judged below {HAND_TARGET_MIN_NUMEL:.0e} elements: the call's "
                        "own cost")
        print(f"hand-fused floor, size {r['size']}: fastgrad takes {r['fastgrad_over_hand']:.2f}x "
              f"the hand-fused loop ({verdict})")

    wall = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = os.getloadavg()
    args = {k: v for k, v in vars(a).items() if k != "case_list"}
    args["cases"] = [c.name for c in a.case_list]
    result = {
        "started": started, "wall_s": wall, "ok": not failed,
        "machine": machine, "versions": vers, "args": args,
        "copy_bandwidth_Bps": bw,
        "definitions": JSON_DEFINITIONS,
        "cases": {c.name: {"group": c.group, "order": c.order, "note": c.describe()}
                  for c in a.case_list},
        "rows": rows,
    }
    if a.json:
        write_json(result, a.json)
        print(f"wrote {a.json}")
    if not a.no_plot and a.png:
        why = plot(rows, a.png)
        print(why if why else f"wrote {a.png}")
    print(f"{len(rows)} rows in {wall:.0f}s; "
          + (f"{len(failed)} FAILED: " + ", ".join(f"{r['case']}@{r['size']}" for r in failed)
             if failed else "all checks passed"))
    return 1 if failed else 0
