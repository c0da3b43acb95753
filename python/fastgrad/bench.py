"""Benchmark suite: ``torch.autograd.grad`` against ``fastgrad.grad`` on the same graph.

``python -m fastgrad bench --help`` lists the flags. For every case and size the suite

1. builds the forward graph once, with ordinary PyTorch code, outside anything timed;
2. differentiates it with PyTorch's ``torch.autograd.grad`` (``api._torch_grad``, the original
   captured at import) and with ``fastgrad.grad`` and checks that the results agree
   (:func:`check_case`; a fast wrong answer is a failure: the row is marked WRONG and the exit
   status is 1; the other cases go on);
3. times only the differentiation (``retain_graph=True`` so the thunk can be re-run), engines
   interleaved round by round, after warm-up; median per engine. Where they apply it also times
   ``torch.func`` (vjp for first order; for second order a Hessian-vector product / nested
   ``torch.func.grad`` on a pure function of x, which includes the forward pass) and
   ``torch.compile`` (forward compiled, then differentiated; double backward is recorded as
   ``error: ...``), and for ``sin_exp_sum`` the hand-fused C++ loop
   ``_C.hand_fused_sin_exp_grad`` (the floor a fused kernel can reach);
4. reports the speedup torch/fastgrad and the fraction of the memory floor:
   floor time = (bytes of every input read once + every result written once) / copy bandwidth,
   the bandwidth of ``dst.copy_(src)`` measured in the same run; fraction = floor / fastgrad.

Output: a table (stdout), a progress bar (stderr, only on a tty), a JSON file with every number
and a PNG of speedup against size (matplotlib, skipped with a note when it is missing).

"size" is the number of elements of the input x; for the MLP cases it is batch * width, the
number of elements of each hidden activation (the elementwise work fastgrad fuses).
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from . import api

_TORCH = api._torch_grad

QUICK_SIZES = [1_000, 100_000, 4_000_000]
FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000, 4_000_000, 10_000_000]
HAND_TARGET = 1.5  # fastgrad should be within 1.5x of the hand-fused loop

# Base tolerances of the correctness check (rtol, atol), scaled by each case's ``tol``.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-7)}


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

class State:
    """What a case's setup built: leaves, the forward graph, grad_outputs, extras."""

    def __init__(self, **kw):
        self.reads = []  # tensors a differentiation must read (inputs of the floor)
        self.__dict__.update(kw)


def _gen(n, salt=0):
    return torch.Generator().manual_seed(1000003 * salt + n)


def _rand(shape, dtype, device, n, salt=0, lo=0.1, hi=1.1):
    t = torch.rand(shape, generator=_gen(n, salt), dtype=torch.float64) * (hi - lo) + lo
    return t.to(dtype=dtype, device=device)


def _randn(shape, dtype, device, n, salt=0):
    return torch.randn(shape, generator=_gen(n, salt), dtype=torch.float64).to(dtype=dtype,
                                                                              device=device)


def _leaf(t):
    return t.detach().requires_grad_(True)


def _compile(fn):
    # A fresh compile per case and size: forget earlier graphs so no recompile limit is hit.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


class Case:
    """A benchmark workload.

    ``setup(n, dtype, device)`` builds the forward graph (never timed) and returns a State;
    ``run(st, grad)`` is the timed differentiation with ``grad`` standing for
    torch.autograd.grad or fastgrad.grad; it returns a tuple of tensors (what is checked).
    ``func(st)`` / ``compiled(st)`` return a thunk computing the same results with torch.func /
    a torch.compile'd forward (or None where that does not apply); they may raise, the error is
    then recorded as the result. ``tol`` scales the check's tolerances.
    """

    name = ""
    group = ""
    order = 1
    tol = 1.0
    note = ""

    def setup(self, n, dtype, device):
        raise NotImplementedError

    def run(self, st, grad):
        raise NotImplementedError

    def func(self, st):
        return None

    def compiled(self, st):
        return None

    def describe(self):
        return self.note


class FirstOrder(Case):
    """grad(fn(x), x, go) for a pure function fn; go None (scalar), "ones" or "random"."""

    def __init__(self, name, group, fn, shape, go=None, note=""):
        self.name, self.group, self.fn, self.shape, self.go, self.note = \
            name, group, fn, shape, go, note

    def setup(self, n, dtype, device):
        x = _leaf(_rand(self.shape(n), dtype, device, n))
        y = self.fn(x)
        go = None
        if self.go == "ones":
            go = torch.ones_like(y)
        elif self.go == "random":
            go = _randn(y.shape, dtype, device, n, salt=1)
        st = State(x=x, y=y, go=go)
        st.reads = [x] + ([go] if go is not None else [])
        return st

    def run(self, st, grad):
        return grad(st.y, st.x, st.go, retain_graph=True)

    def func(self, st):
        y, vjp_fn = torch.func.vjp(self.fn, st.x.detach())
        go = st.go if st.go is not None else torch.ones_like(y)
        return lambda: vjp_fn(go)

    def compiled(self, st):
        cfn = _compile(self.fn)
        y = cfn(st.x)
        return lambda: _TORCH(y, st.x, st.go, retain_graph=True)


class SecondOrder(Case):
    """g = grad(y, x, go1, create_graph=True); g2 = grad of g (seed style: grad(g, x, ones),
    else grad(g.sum(), x)). Returns (g, g2)."""

    order = 2
    tol = 10.0

    def __init__(self, name, group, fn, shape, seed_style=False, note=""):
        self.name, self.group, self.fn, self.shape, self.seed_style, self.note = \
            name, group, fn, shape, seed_style, note

    def setup(self, n, dtype, device):
        x = _leaf(_rand(self.shape(n), dtype, device, n))
        if self.seed_style:  # example 3 of the seed: y = f(x), grad_outputs=ones twice
            y = self.fn(x)
            go1, go2 = torch.ones_like(y), torch.ones_like(x)
            st = State(x=x, y=y, go1=go1, go2=go2)
            st.reads = [x, go1, go2]
        else:
            st = State(x=x, y=self.fn(x).sum(), go1=None, go2=None)
            st.reads = [x]
        return st

    def run(self, st, grad):
        g = grad(st.y, st.x, st.go1, retain_graph=True, create_graph=True)[0]
        # retain_graph: g's graph reaches into the forward graph (tanh's saved result, ...),
        # which the next run needs again
        if self.seed_style:
            g2 = grad(g, st.x, st.go2, retain_graph=True)[0]
        else:
            g2 = grad(g.sum(), st.x, retain_graph=True)[0]
        return g, g2

    def _scalar(self, x):
        return self.fn(x).sum()

    def func(self, st):
        x = st.x.detach()
        v = torch.ones_like(x)
        gfn = torch.func.grad(self._scalar)
        # Hessian-vector product, forward-over-reverse; H is symmetric so H v = (d/dx g).T v
        return lambda: torch.func.jvp(gfn, (x,), (v,))

    def compiled(self, st):
        cfn = _compile(self._scalar)
        y = cfn(st.x)

        def thunk():
            g = _TORCH(y, st.x, retain_graph=True, create_graph=True)[0]
            return g, _TORCH(g.sum(), st.x, retain_graph=True)[0]
        return thunk


def _rows(n, cols=256):
    cols = min(cols, max(n, 1))
    return (max(n // cols, 1), cols)


def _seed_shape(n):
    return (max(n // 4, 1), 4)


def _flat(n):
    return (max(n, 1),)


def _softplus_sigmoid(x):
    return torch.nn.functional.softplus(x) * torch.sigmoid(x)


class SinExpSum(FirstOrder):
    """(sin(x) * exp(x)).sum(): also times the hand-fused C++ loop (the floor case)."""

    def __init__(self):
        super().__init__("sin_exp_sum", "elementwise",
                         lambda x: (torch.sin(x) * torch.exp(x)).sum(), _flat,
                         note="(sin(x)*exp(x)).sum(); also the hand-fused C++ loop")

    def hand(self, st):
        """Thunk running _C.hand_fused_sin_exp_grad, or None when it is not available."""
        from . import _C
        fn = getattr(_C, "hand_fused_sin_exp_grad", None)
        x = st.x.detach()
        code = {torch.float32: 0, torch.float64: 1}.get(x.dtype)
        if fn is None or code is None or x.device.type != "cpu" or not x.is_contiguous():
            return None
        nthreads = torch.get_num_threads()

        def thunk():
            out = torch.empty_like(x)  # allocated per call, as fastgrad and torch do
            fn(x.data_ptr(), out.data_ptr(), x.numel(), code, nthreads)
            return (out,)
        return thunk


def _mlp(width, n_in, n_out, dtype, device, n, salt):
    """Linear-tanh-Linear-tanh-Linear with deterministic weights."""
    g = _gen(n, salt)
    model = torch.nn.Sequential(
        torch.nn.Linear(n_in, width), torch.nn.Tanh(),
        torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, n_out))
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else width
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))
    return model.to(dtype=dtype, device=device)


class WganGp(Case):
    """WGAN-GP gradient penalty: g = grad(D(x), x, ones, create_graph=True);
    penalty = ((||g||_2 - 1)^2).mean(); penalty.backward() to the critic's weights.
    The timed work is the grad and the backward; results are g, the penalty, the weight grads."""

    name = "wgan_gp"
    group = "mlp"
    order = 2
    tol = 30.0
    width = 32
    note = "WGAN-GP penalty on a 32-32-32-1 tanh MLP critic: grad(create_graph) + .backward()"

    def setup(self, n, dtype, device):
        b = max(n // self.width, 1)
        model = _mlp(self.width, self.width, 1, dtype, device, n, salt=2)
        x = _leaf(_randn((b, self.width), dtype, device, n))
        out = model(x)
        params = list(model.parameters())
        st = State(x=x, out=out, go=torch.ones_like(out), model=model, params=params)
        st.reads = [x] + params
        return st

    def run(self, st, grad):
        for p in st.params:
            p.grad = None
        g = grad(st.out, st.x, st.go, retain_graph=True, create_graph=True)[0]
        penalty = ((g.norm(2, dim=1) - 1) ** 2).mean()
        penalty.backward(retain_graph=True)  # the critic's forward graph is re-run next time
        return (g.detach(), penalty.detach()) + tuple(p.grad for p in st.params)

    def func(self, st):
        model = st.model
        names = [k for k, _ in model.named_parameters()]
        pd = {k: v.detach() for k, v in model.named_parameters()}
        x = st.x.detach()

        def critic_sum(pd_, x_):
            return torch.func.functional_call(model, pd_, (x_,)).sum()

        def penalty(pd_, x_):
            g = torch.func.grad(critic_sum, argnums=1)(pd_, x_)
            pen = ((g.norm(2, dim=1) - 1) ** 2).mean()
            return pen, (g, pen)

        def thunk():
            grads, (g, pen) = torch.func.grad(penalty, has_aux=True)(pd, x)
            return (g, pen) + tuple(grads[k] for k in names)
        return thunk

    def compiled(self, st):
        cm = _compile(st.model)
        out = cm(st.x)

        def thunk():
            for p in st.params:
                p.grad = None
            g = _TORCH(out, st.x, st.go, retain_graph=True, create_graph=True)[0]
            penalty = ((g.norm(2, dim=1) - 1) ** 2).mean()
            penalty.backward(retain_graph=True)
            return (g.detach(), penalty.detach()) + tuple(p.grad for p in st.params)
        return thunk


class PinnResidual(Case):
    """Physics-informed residual terms of u = MLP(x), x of shape (N, 2) (say (x, t)):
    u_x = grad(u.sum(), x, create_graph=True), u_xx = grad(u_x[:, 0].sum(), x)."""

    name = "pinn_residual"
    group = "mlp"
    order = 2
    tol = 30.0
    width = 32
    note = "PINN on a 2-32-32-1 tanh MLP: u_x (create_graph) then grad of u_x[:,0].sum()"

    def setup(self, n, dtype, device):
        b = max(n // self.width, 1)
        model = _mlp(self.width, 2, 1, dtype, device, n, salt=3)
        x = _leaf(_rand((b, 2), dtype, device, n, lo=-1.0, hi=1.0))
        u = model(x).sum()  # weights require grad, as in training
        params = list(model.parameters())
        st = State(x=x, u=u, model=model)
        st.reads = [x] + params
        return st

    def run(self, st, grad):
        ux = grad(st.u, st.x, retain_graph=True, create_graph=True)[0]
        uxx = grad(ux[:, 0].sum(), st.x, retain_graph=True)[0]
        return ux, uxx

    def func(self, st):
        model = st.model
        pd = {k: v.detach() for k, v in model.named_parameters()}
        x = st.x.detach()

        def u_sum(x_):
            return torch.func.functional_call(model, pd, (x_,)).sum()

        def ux0(x_):
            ux = torch.func.grad(u_sum)(x_)
            return ux[:, 0].sum(), ux

        def thunk():
            uxx, ux = torch.func.grad(ux0, has_aux=True)(x)
            return ux, uxx
        return thunk

    def compiled(self, st):
        cm = _compile(st.model)
        u = cm(st.x).sum()

        def thunk():
            ux = _TORCH(u, st.x, retain_graph=True, create_graph=True)[0]
            return ux, _TORCH(ux[:, 0].sum(), st.x, retain_graph=True)[0]
        return thunk


def _make_cases():
    sq = SecondOrder("seed_square_2nd", "seed", lambda x: x ** 2, _seed_shape, seed_style=True,
                     note="seed example 3: y = x**2, grad(create_graph) then grad with ones")
    return [
        FirstOrder("seed_sum", "seed", torch.sum, _seed_shape,
                   note="seed example 1: grad(sum(x), x)"),
        FirstOrder("seed_columns", "seed", lambda x: x[:, 0] + x[:, 1], _seed_shape, go="ones",
                   note="seed example 2: y = x[:,0] + x[:,1], grad_outputs=ones"),
        sq,
        SinExpSum(),
        FirstOrder("tanh_cube", "elementwise", lambda x: (torch.tanh(x) ** 3).sum(), _flat,
                   note="(tanh(x)**3).sum()"),
        SecondOrder("tanh_cube_2nd", "elementwise", lambda x: torch.tanh(x) ** 3, _flat,
                    note="tanh(x)**3: grad(create_graph) then grad of g.sum()"),
        FirstOrder("softplus_sigmoid", "elementwise", lambda x: _softplus_sigmoid(x).sum(),
                   _flat, note="(softplus(x)*sigmoid(x)).sum()"),
        SecondOrder("softplus_sigmoid_2nd", "elementwise", _softplus_sigmoid, _flat,
                    note="softplus(x)*sigmoid(x): grad(create_graph) then grad of g.sum()"),
        FirstOrder("logsumexp_rows", "reduction", lambda x: torch.logsumexp(x, 1), _rows,
                   go="random", note="logsumexp along dim 1 of (n/256, 256), random go"),
        FirstOrder("softmax_rows", "reduction", lambda x: torch.softmax(x, 1), _rows,
                   go="random", note="softmax along dim 1, random go"),
        FirstOrder("log_softmax_rows", "reduction", lambda x: torch.log_softmax(x, 1), _rows,
                   go="random", note="log_softmax along dim 1, random go"),
        FirstOrder("mean_rows", "reduction", lambda x: x.mean(1), _rows, go="random",
                   note="mean along dim 1, random go"),
        FirstOrder("amax_rows", "reduction", lambda x: x.amax(1), _rows, go="random",
                   note="amax along dim 1, random go"),
        WganGp(),
        PinnResidual(),
    ]


CASES = _make_cases()
CASE_NAMES = [c.name for c in CASES]


def get_case(name):
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"unknown case {name!r} (cases: {', '.join(CASE_NAMES)})")


# ---------------------------------------------------------------------------------------------
# correctness check
# ---------------------------------------------------------------------------------------------

class CheckFailed(AssertionError):
    pass


def _tolerances(dtype, scale):
    rtol, atol = TOLERANCES.get(dtype, (1e-4, 1e-5))
    return rtol * scale, atol * scale


def compare(got, ref, dtype, scale=1.0, what="result", none_is_zero=False):
    """assert_close of two tuples of tensors; atol is also scaled by max |ref| of each tensor
    (sums over a large batch carry a summation-order error proportional to their magnitude).
    ``none_is_zero``: a None result equals an all-zero tensor (torch.func gives zeros where
    autograd leaves a weight's .grad None)."""
    got, ref = tuple(got), tuple(ref)
    if len(got) != len(ref):
        raise CheckFailed(f"{what}: {len(got)} results, torch gives {len(ref)}")
    rtol, atol = _tolerances(dtype, scale)
    for i, (g, r) in enumerate(zip(got, ref)):
        if none_is_zero and (g is None) != (r is None):
            t = r if g is None else g
            if not bool((t == 0).all()):
                raise CheckFailed(f"{what}[{i}]: one side is None, the other is not zero")
            continue
        if (g is None) != (r is None):
            raise CheckFailed(f"{what}[{i}]: got {g!r}, torch gives {r!r}")
        if r is None:
            continue
        g, r = g.detach(), r.detach()
        mag = float(r.abs().max()) if r.numel() and r.is_floating_point() else 0.0
        if not math.isfinite(mag):
            mag = 0.0
        try:
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol * max(1.0, mag),
                                       equal_nan=True)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            short = "; ".join(lines[:4])
            raise CheckFailed(f"{what}[{i}]: {short}") from None
    return True


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_case(case, n, dtype=torch.float32, device="cpu", grad=None):
    """The benchmark's correctness check: build ``case`` at size ``n`` once and differentiate
    the same graph with torch.autograd.grad and with ``grad`` (default fastgrad.grad).
    Raises CheckFailed (an AssertionError) when they disagree; returns (state, torch results)
    so the caller can reuse both."""
    if isinstance(case, str):
        case = get_case(case)
    grad = api.grad if grad is None else grad
    st = case.setup(n, dtype, device)
    ref = tuple(case.run(st, _TORCH))
    got = tuple(case.run(st, grad))
    _sync(device)
    compare(got, ref, dtype, case.tol, what=f"{case.name} fastgrad vs torch")
    return st, ref


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

class Timer:
    """Seconds taken by one call of a thunk: perf_counter on CPU, CUDA events on cuda."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def time_engines(thunks, timer, repeats, warmup=2, min_time=0.1, budget=3.0, max_rounds=2000):
    """Median seconds per thunk. Warm-up first (plans, compiled kernels, allocator), then
    rounds that run every thunk once each (interleaved, so load from other processes hits all
    engines alike): at least ``repeats`` rounds (fewer, but at least 3, when a round is so slow
    that ``repeats`` rounds would exceed ``budget`` seconds), more until ``min_time`` passed."""
    per_round = 0.0
    for _ in range(warmup):
        per_round = sum(timer(fn) for fn in thunks.values())
    rounds = repeats
    if per_round * repeats > budget:
        rounds = max(3, min(repeats, int(budget / max(per_round, 1e-9))))
    times = {k: [] for k in thunks}
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < min_time and r < max_rounds):
        for k, fn in thunks.items():
            times[k].append(timer(fn))
        r += 1
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()}, r)


def copy_bandwidth(dtype, device, nbytes=64 << 20, repeats=9):
    """Bytes read + written per second of ``dst.copy_(src)`` on a buffer larger than caches."""
    esize = torch.empty((), dtype=dtype).element_size()
    n = max(nbytes // esize, 1)
    src = torch.rand(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    t, _, _ = time_engines({"copy": lambda: dst.copy_(src)}, timer, repeats, warmup=2,
                           min_time=0.2, budget=5.0)
    return 2 * n * esize / t["copy"]


# ---------------------------------------------------------------------------------------------
# one case at one size
# ---------------------------------------------------------------------------------------------

def _short_error(e, limit=100):
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _explain_facts(case, st):
    """Kernel launches etc. of every fastgrad.grad call in the case's run, via fastgrad.explain
    (explain runs the call keeping the graph; then grad runs it for the next stage).
    .backward() calls (wgan_gp) are not fastgrad.grad calls and are not counted."""
    import fastgrad
    reports = []

    def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, **kw):
        reports.append(fastgrad.explain(outputs, inputs, grad_outputs=grad_outputs,
                                        create_graph=create_graph))
        return fastgrad.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                             create_graph=create_graph, **kw)
    case.run(st, grad)
    fallback = []
    for r in reports:
        fallback += [f"{name} ({why})" for name, why in r.fallback]
    return {
        "calls": len(reports),
        "launches": sum(r.kernel_launches for r in reports),
        "bytes_read": sum(r.bytes_read for r in reports),
        "bytes_written": sum(r.bytes_written for r in reports),
        "all_native": all(r.all_native for r in reports),
        "fallback": sorted(set(fallback)),
    }


def bench_one(case, n, dtype, device, opts, bandwidth, progress=None):
    """Check, then time one case at one size; returns the JSON row."""
    row = {"case": case.name, "group": case.group, "order": case.order, "size": n,
           "dtype": str(dtype).replace("torch.", ""), "device": str(device),
           "times_s": {}, "errors": {}, "checks": {}}

    def stage(text):
        if progress is not None:
            progress.stage(text)

    stage("check")
    try:
        st, ref = check_case(case, n, dtype, device)
        row["check"] = "ok"
    except CheckFailed as e:
        row["check"] = "WRONG"
        row["errors"]["fastgrad"] = str(e)
        return row
    except Exception as e:  # noqa: BLE001 (fastgrad raising is a failure of this row only)
        row["check"] = "ERROR"
        row["errors"]["fastgrad"] = _short_error(e, 300)
        return row
    row["numel"] = st.x.numel()
    row["shape"] = list(st.x.shape)
    row["bytes_read"] = _nbytes(st.reads)
    row["bytes_written"] = _nbytes(ref)
    row["floor_bytes"] = row["bytes_read"] + row["bytes_written"]

    if opts.explain:
        stage("explain")
        try:
            row["explain"] = _explain_facts(case, st)
        except Exception as e:  # noqa: BLE001
            row["errors"]["explain"] = _short_error(e)

    thunks = {"torch": lambda: case.run(st, _TORCH), "fastgrad": lambda: case.run(st, api.grad)}
    extra = []
    if isinstance(case, SinExpSum):
        extra.append(("hand", case.hand))
    if opts.func:
        extra.append(("func", case.func))
    if opts.compile:
        extra.append(("compile", case.compiled))
    for name, make in extra:
        stage(f"{name} setup")
        t0 = time.perf_counter()
        try:
            thunk = make(st)
            if thunk is None:
                row["errors"][name] = "n/a"
                continue
            got = thunk()  # also the compile warm-up: compile time is never timed
            _sync(device)
        except Exception as e:  # noqa: BLE001
            row["errors"][name] = "error: " + _short_error(e)
            continue
        finally:
            row.setdefault("setup_s", {})[name] = time.perf_counter() - t0
        try:
            compare(got, ref, dtype, case.tol, what=f"{case.name} {name} vs torch",
                    none_is_zero=True)
            row["checks"][name] = "ok"
        except CheckFailed as e:
            row["checks"][name] = f"mismatch: {e}"
        thunks[name] = thunk

    stage("timing")
    timer = Timer(device)
    try:
        times, mins, rounds = time_engines(thunks, timer, opts.repeats,
                                           min_time=opts.min_time, budget=opts.budget)
    except Exception as e:  # noqa: BLE001 (e.g. out of memory at the largest size)
        row["check"] = "ERROR"
        row["errors"]["timing"] = _short_error(e, 300)
        return row
    row["rounds"] = rounds
    row["times_s"] = times
    row["min_times_s"] = mins
    tt, tf = times["torch"], times["fastgrad"]
    row["speedup"] = tt / tf
    row["floor_time_s"] = row["floor_bytes"] / bandwidth
    row["floor_fraction"] = row["floor_time_s"] / tf
    if "hand" in times:
        row["fastgrad_over_hand"] = tf / times["hand"]
        row["hand_target_met"] = row["fastgrad_over_hand"] <= HAND_TARGET
    return row


# ---------------------------------------------------------------------------------------------
# output: progress bar, table, machine info, JSON, plot
# ---------------------------------------------------------------------------------------------

class Progress:
    """A plain-text progress line on stderr (a tty only); rows print above it."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.label, self.width, self.t0 = "", 0, time.perf_counter()

    def _draw(self, text):
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = (f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s "
                f"{self.label} {text}")[:110]
        pad = max(self.width - len(line), 0)
        sys.stderr.write("\r" + line + " " * pad)
        sys.stderr.flush()
        self.width = len(line)

    def start(self, label):
        self.label = label
        self._draw("")

    def stage(self, text):
        self._draw(text)

    def step(self):
        self.done += 1
        self._draw("")

    def clear(self):
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0

    def print(self, text):
        self.clear()
        print(text, flush=True)


def _ms(t):
    if t is None:
        return "n/a"
    v = t * 1e3
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


COLUMNS = [("case", 20, "<"), ("size", 9, ">"), ("torch ms", 9, ">"), ("fastgrad ms", 11, ">"),
           ("speedup", 7, ">"), ("floor", 6, ">"), ("func ms", 9, ">"), ("compile ms", 10, ">"),
           ("hand ms", 8, ">"), ("fg/hand", 7, ">"), ("launch", 6, ">"), ("check", 5, "<")]


def _fmt(values):
    return " ".join(f"{str(v):{a}{w}}" for v, (_, w, a) in zip(values, COLUMNS))


def table_header():
    return _fmt([c[0] for c in COLUMNS])


def table_row(row):
    t = row.get("times_s", {})
    err = row.get("errors", {})

    def eng(name):
        if name in t:
            return _ms(t[name]) + ("!" if row.get("checks", {}).get(name, "ok") != "ok" else "")
        e = err.get(name)
        if e is None:
            return "-"
        return "n/a" if e == "n/a" else "error"

    if row["check"] != "ok":
        return _fmt([row["case"], row["size"], "", "", "", "", "", "", "", "", "",
                     row["check"]]) + "  " + (err.get("fastgrad") or err.get("timing", ""))[:200]
    hand = row.get("fastgrad_over_hand")
    ex = row.get("explain")
    return _fmt([row["case"], row["size"], _ms(t["torch"]), _ms(t["fastgrad"]),
                 f"{row['speedup']:.2f}x", f"{100 * row['floor_fraction']:.0f}%",
                 eng("func"), eng("compile"), eng("hand"),
                 "n/a" if hand is None else f"{hand:.2f}x",
                 "-" if ex is None else ex["launches"], row["check"]])


def machine_info(device):
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def versions():
    import fastgrad
    from . import _C
    return {"torch": torch.__version__, "fastgrad": getattr(fastgrad, "__version__", "?"),
            "hand_fused_sin_exp_grad": hasattr(_C, "hand_fused_sin_exp_grad")}


def plot(rows, path):
    """Speedup against size, one line per case, log x; returns None or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not importable ({e}); no PNG written"
    by_case = {}
    for r in rows:
        if r.get("check") == "ok" and "speedup" in r:
            by_case.setdefault(r["case"], []).append((r["size"], r["speedup"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab20").colors
    styles = ["-", "--", "-.", ":"]
    markers = "os^vD<>pxh*"
    for i, (name, pts) in enumerate(by_case.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[i % len(styles)],
                marker=markers[i % len(markers)], color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                label=name)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("size (elements)")
    ax.set_ylabel("speedup torch / fastgrad (log)")
    ax.set_title("fastgrad.grad vs torch.autograd.grad")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _sizes(s):
    try:
        out = [int(float(v)) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {s!r}")
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return out


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
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per case and size (default 7, --full 15)")
    p.add_argument("--min-time", type=float, default=None,
                   help="keep timing until this many seconds passed (default 0.1, --full 0.5)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile (default: on with --full; compiling is slow)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-func", dest="func", action="store_false",
                   help="do not time torch.func")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="skip fastgrad.explain (kernel launch counts)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=os.path.join("bench-results", "bench-results.json"),
                   help="where to write every number (default %(default)s)")
    p.add_argument("--png", default=os.path.join("bench-results", "bench-speedup.png"),
                   help="speedup plot (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    a.sizes = a.sizes or (FULL_SIZES if a.full else QUICK_SIZES)
    a.repeats = a.repeats or (15 if a.full else 7)
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
    if a.threads:
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
    # group repeated notes (compile's double-backward error appears once per size)
    seen = {}
    for nline in notes:
        key = nline.split(": ", 1)[1]
        seen.setdefault(key, []).append(nline.split(":", 1)[0])
    for key, where in seen.items():
        print(f"note: {key}  [{', '.join(where)}]")
    hand_rows = [r for r in rows if "fastgrad_over_hand" in r]
    for r in hand_rows:
        ok = "met" if r["hand_target_met"] else "NOT met"
        print(f"hand-fused floor, size {r['size']}: fastgrad takes {r['fastgrad_over_hand']:.2f}x "
              f"the hand-fused loop (target <= {HAND_TARGET}x: {ok})")

    wall = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = os.getloadavg()
    args = {k: v for k, v in vars(a).items() if k != "case_list"}
    args["cases"] = [c.name for c in a.case_list]
    result = {
        "started": started, "wall_s": wall, "ok": not failed,
        "machine": machine, "versions": vers, "args": args,
        "copy_bandwidth_Bps": bw,
        "definitions": {
            "size": "elements of the input x (MLP cases: batch * hidden width)",
            "times_s": "median seconds of the differentiation only (forward built outside)",
            "min_times_s": "fastest run of each engine (less sensitive to load)",
            "speedup": "times_s.torch / times_s.fastgrad",
            "floor_bytes": "every input (x, grad_outputs, weights) read once + every result "
                           "written once",
            "floor_fraction": "floor_bytes / copy_bandwidth_Bps / times_s.fastgrad (above 1 "
                              "when less must move than assumed, e.g. a result returned as an "
                              "expanded view, or a write-only result)",
            "func": "torch.func: vjp (first order, forward outside) or HVP / nested grad "
                    "(second order and MLP cases: includes the forward)",
            "compile": "torch.compile(forward, dynamic=False), then torch.autograd.grad",
            "hand": "_C.hand_fused_sin_exp_grad, output allocated per call",
            "setup_s": "untimed setup + first call of func/compile/hand (compile time is here)",
        },
        "cases": {c.name: {"group": c.group, "order": c.order, "note": c.describe()}
                  for c in a.case_list},
        "rows": rows,
    }
    if a.json:
        d = os.path.dirname(a.json)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {a.json}")
    if not a.no_plot and a.png:
        why = plot(rows, a.png)
        print(why if why else f"wrote {a.png}")
    print(f"{len(rows)} rows in {wall:.0f}s; "
          + (f"{len(failed)} FAILED: " + ", ".join(f"{r['case']}@{r['size']}" for r in failed)
             if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
