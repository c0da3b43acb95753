"""How the benchmark measures: per-call timers, interleaved rounds with a median, and the
copy bandwidth that sets the memory floor each fastgrad time is compared with."""
import random
import statistics
import time

import torch

from .. import _C

try:
    import resource
except ImportError:  # (not on Windows)
    resource = None


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


class Timer:
    """Seconds taken by one call of a thunk: perf_counter on CPU, CUDA events on cuda. Also
    counts the call's minor page faults (``faults``, None where getrusage is missing): fresh
    pages the allocator handed out, each zeroed by the kernel on first touch. A 16 MB result
    in fresh 4 KB pages is about 3900 of them, which took 5 ms on the development VM: glibc
    returns such memory some runs and not others (docs/performance-history-nov27.md, "Page
    faults")."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.faults = None

    def __call__(self, fn):
        f0 = _minor_faults()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        self.faults = _minor_faults() - f0 if resource else None
        return dt


def time_engines(thunks, timer, repeats, warmup=2, min_time=0.1, budget=3.0, max_rounds=2000,
                 faults=None):
    """Median seconds per thunk. Warm-up first (plans, compiled kernels, allocator), then
    rounds that run every thunk (interleaved, so load from other processes hits all engines
    alike) in an order shuffled each round (seeded: the same orders every run), each one call
    untimed then one timed: a call's speed depends on the call before it (the caches, branch
    predictors and allocator free lists it leaves), so each engine is timed after a call of its
    own, as in a loop that repeats it, not after whichever engine happened to run before (a
    fixed order had moved ratios by 10-60%: docs/performance-history.md, "How the benchmark
    times").
    At least ``repeats`` rounds (fewer, but at least 3, when a round is so slow that
    ``repeats`` rounds would exceed ``budget`` seconds), more until ``min_time`` passed.
    ``faults`` (a dict), when given, receives each engine's median page faults per timed call
    (Timer.faults)."""
    per_round = 0.0
    for _ in range(warmup):
        per_round = 2 * sum(timer(fn) for fn in thunks.values())
    rounds = repeats
    if per_round * repeats > budget:
        rounds = max(3, min(repeats, int(budget / max(per_round, 1e-9))))
    times = {k: [] for k in thunks}
    flts = {k: [] for k in thunks}
    order = list(thunks)
    shuffle = random.Random(0).shuffle
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < min_time and r < max_rounds):
        shuffle(order)
        for k in order:
            thunks[k]()
            times[k].append(timer(thunks[k]))
            flts[k].append(getattr(timer, "faults", None))  # (a plain callable counts none)
        r += 1
    if faults is not None and None not in flts[order[0]]:
        faults.update({k: statistics.median(v) for k, v in flts.items()})
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()}, r)


def copy_bandwidth(dtype, device, nbytes=None, repeats=9):
    """Bytes read + written per second of a copy of a buffer larger than caches (a GPU's L2 is
    50-60 MB on an H100/H200, hence the larger default there): ``dst.copy_(src)``, and on the
    CPU also a copy with streaming stores (``_C.stream_copy``), the faster of the two (PyTorch's
    plain stores read each line before writing it, so fastgrad's streaming loops beat a floor
    measured with them alone)."""
    if nbytes is None:
        nbytes = (512 << 20) if torch.device(device).type == "cuda" else (64 << 20)
    esize = torch.empty((), dtype=dtype).element_size()
    n = max(nbytes // esize, 1)
    src = torch.rand(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    thunks = {"copy": lambda: dst.copy_(src)}
    stream = getattr(_C, "stream_copy", None)
    nb = n * esize // 64 * 64
    if torch.device(device).type == "cpu" and stream is not None and nb > 0 and \
            src.data_ptr() % 64 == 0 and dst.data_ptr() % 64 == 0:
        nthreads = torch.get_num_threads()
        thunks["stream"] = lambda: stream(src.data_ptr(), dst.data_ptr(), nb, nthreads)
    timer = Timer(device)
    t, _, _ = time_engines(thunks, timer, repeats, warmup=2, min_time=0.2, budget=5.0)
    return max(2 * n * esize / t["copy"], 2 * nb / t.get("stream", float("inf")))
