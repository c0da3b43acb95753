"""Benchmark: torch.autograd.grad against fastgrad.grad on the same graph, in one process.

Every case is checked against torch before it is timed (a fast wrong answer is a failure).
Each case is a function ``(size, dtype, grad) -> callable`` that builds the forward graph once
and returns a thunk running the timed work with the given ``grad`` function.
"""
import argparse
import statistics
import sys
import time

import torch

from . import api

_TORCH = api._torch_grad


def _x(n, dtype, rows=None):
    g = torch.Generator().manual_seed(n)
    shape = (rows, n // rows) if rows else (n,)
    return (torch.rand(shape, generator=g, dtype=dtype) + 0.1).requires_grad_(True)


def seed_sum(n, dtype, grad):
    x = _x(n, dtype, rows=max(n // 4, 1))
    y = torch.sum(x)
    return lambda: grad(y, x, retain_graph=True)


def seed_columns(n, dtype, grad):
    x = _x(n, dtype, rows=max(n // 4, 1))
    y = x[:, 0] + x[:, 1]
    go = torch.ones_like(y)
    return lambda: grad(y, x, go, retain_graph=True)


def seed_square_2nd(n, dtype, grad):
    x = _x(n, dtype)

    def run():
        y = x ** 2
        g = grad(y, x, torch.ones_like(y), create_graph=True)[0]
        return grad(g, x, torch.ones_like(g))
    return run


def sin_exp_sum(n, dtype, grad):
    x = _x(n, dtype)
    y = (torch.sin(x) * torch.exp(x)).sum()
    return lambda: grad(y, x, retain_graph=True)


def tanh_cube_2nd(n, dtype, grad):
    x = _x(n, dtype)

    def run():
        y = torch.tanh(x) ** 3
        g = grad(y.sum(), x, create_graph=True)[0]
        return grad(g.sum(), x)
    return run


def logsumexp_rows(n, dtype, grad):
    x = _x(n, dtype, rows=max(n // 256, 1))
    y = torch.logsumexp(x, 1).sum()
    return lambda: grad(y, x, retain_graph=True)


CASES = [seed_sum, seed_columns, seed_square_2nd, sin_exp_sum, tanh_cube_2nd, logsumexp_rows]


def _median_time(fn, repeats, min_time=0.05):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _check(case, n, dtype):
    ref = case(n, dtype, _TORCH)()
    got = case(n, dtype, api.grad)()
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def main(argv):
    p = argparse.ArgumentParser(prog="python -m fastgrad bench",
                                description="fastgrad.grad vs torch.autograd.grad")
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")],
                   default=[1000, 100_000, 1_000_000], help="comma-separated element counts")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cases", default=None, help="comma-separated case names")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    cases = [c for c in CASES if a.cases is None or c.__name__ in a.cases.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}")
    print(f"{'case':18} {'size':>9} {'torch ms':>10} {'fastgrad ms':>12} {'speedup':>8}")
    failed = 0
    for case in cases:
        for n in a.sizes:
            try:
                _check(case, n, dtype)
            except AssertionError as e:
                failed += 1
                print(f"{case.__name__:18} {n:>9} WRONG RESULT: {str(e).splitlines()[0]}")
                continue
            tt = _median_time(case(n, dtype, _TORCH), a.repeats)
            tf = _median_time(case(n, dtype, api.grad), a.repeats)
            print(f"{case.__name__:18} {n:>9} {tt * 1e3:>10.3f} {tf * 1e3:>12.3f} "
                  f"{tt / tf:>7.2f}x", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
