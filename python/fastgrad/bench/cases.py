"""The benchmark's workloads: each case builds a forward graph once and differentiates it.

A case is written once against a ``grad`` argument so that the very same code is timed with
torch.autograd.grad and with fastgrad.grad (and checked between them); the torch.func and
torch.compile variants live next to it because they must compute the same results.

"size" is the number of elements of the input x; for the MLP cases it is batch * width, the
number of elements of each hidden activation (the elementwise work fastgrad fuses).
"""
import math

import torch

from .. import api, churn, jit

# PyTorch's own torch.autograd.grad, captured at import, so the reference stays torch's even
# where fastgrad stands in for torch.autograd.grad.
_TORCH = api._torch_grad


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
    then recorded as the result. ``tol`` scales the check's tolerances. ``rewind(st)`` makes
    the next call repeat the first one (for a case whose calls differ from each other), so
    that what is compared was computed from the same inputs. ``warmup_calls(st)``: how many
    calls of fastgrad's precede the timing (enough for its plans and compiled loops to be
    made, which the timing leaves out).
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

    def rewind(self, st):
        pass

    def warmup_calls(self, st):
        return jit.AFTER

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
        from .. import _C
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


def _pinn_func(model, points):
    """A thunk computing the PINN's u_x and u_xx with torch.func, over ``points()``."""
    pd = {k: v.detach() for k, v in model.named_parameters()}

    def u_sum(x_):
        return torch.func.functional_call(model, pd, (x_,)).sum()

    def ux0(x_):
        ux = torch.func.grad(u_sum)(x_)
        return ux[:, 0].sum(), ux

    def thunk():
        uxx, ux = torch.func.grad(ux0, has_aux=True)(points())
        return ux, uxx
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
        x = st.x.detach()
        return _pinn_func(st.model, lambda: x)

    def compiled(self, st):
        cm = _compile(st.model)
        u = cm(st.x).sum()

        def thunk():
            ux = _TORCH(u, st.x, retain_graph=True, create_graph=True)[0]
            return ux, _TORCH(ux[:, 0].sum(), st.x, retain_graph=True)[0]
        return thunk


class PinnStep(PinnResidual):
    """The PINN residual as a training step makes it: the forward u = MLP(x) is built anew in
    every timed call, then u_x and u_xx as in pinn_residual. The other cases time the
    differentiation of one graph built beforehand; here fastgrad meets new autograd nodes each
    call, as in training, and the forward (the same for both engines) is part of the time."""

    name = "pinn_step"
    note = ("PINN step on a 2-32-32-1 tanh MLP: forward, u_x (create_graph), u_xx; "
            "a new graph each call")

    def setup(self, n, dtype, device):
        st = super().setup(n, dtype, device)
        st.u = None  # (built by each run)
        return st

    def run(self, st, grad):
        u = st.model(st.x).sum()
        ux = grad(u, st.x, create_graph=True)[0]
        uxx = grad(ux[:, 0].sum(), st.x)[0]
        return ux.detach(), uxx

    def compiled(self, st):
        cm = _compile(st.model)

        def thunk():
            u = cm(st.x).sum()
            ux = _TORCH(u, st.x, create_graph=True)[0]
            return ux.detach(), _TORCH(ux[:, 0].sum(), st.x)[0]
        return thunk


class PinnResample(PinnStep):
    """The PINN step with its collocation points drawn anew each call, in a number that
    changes: every call's graph has shapes the calls before it did not have (a cycle through
    b + 1 counts, b/2 + 1 to 3b/2 + 1 rows, b = n / 32). Planned anew each call, fastgrad took
    4-14x PyTorch's time at 1e3 and 1e5; fastgrad.churn hands such calls to PyTorch
    (docs/performance-history-nov27.md, "Shapes that change every call"), and plans the counts
    that come back. At 1e3 there are only 32 counts: the warm-up (warmup_calls) runs them until
    every count's plans run through their loops, as in a long run; from 1e5 on (3126 counts
    and more) the timed calls meet new counts."""

    name = "pinn_resample"
    note = ("PINN step with a varying number of resampled points: forward, u_x (create_graph), "
            "u_xx; new shapes each call")

    def setup(self, n, dtype, device):
        st = super().setup(n, dtype, device)
        b = st.x.shape[0]
        st.pool = _rand((2 * b + 2, 2), dtype, device, n, salt=5, lo=-1.0, hi=1.0)
        # a stride prime to the cycle's length visits every count once per cycle
        st.stride = next(s for s in (7919, 7907, 7901) if math.gcd(s, b + 1) == 1)
        st.calls = 0
        return st

    def rewind(self, st):
        st.calls = 0

    def warmup_calls(self, st):
        # A cycle of counts short enough for churn.py to remember (churn.SHAPES) ends up
        # planned, each count at its second sight: the first cycle meets the counts, the next
        # two plan them (u_x's call, then u_xx's), and AFTER more runs of each plan set its
        # loops (jit.compile_plan): the timing meets the steady state, as the other cases'
        # warm-up leaves it their plans. A longer cycle is timed as it comes: new counts,
        # handed to PyTorch.
        cycle = st.x.shape[0] + 1
        return jit.AFTER + ((3 + jit.AFTER) * cycle if cycle <= churn.SHAPES else 0)

    def _points(self, st):
        b = st.x.shape[0]
        m = b // 2 + 1 + (st.calls * st.stride) % (b + 1)
        st.calls += 1
        return _leaf(st.pool[:m])

    def run(self, st, grad):
        x = self._points(st)
        u = st.model(x).sum()
        ux = grad(u, x, create_graph=True)[0]
        uxx = grad(ux[:, 0].sum(), x)[0]
        return ux.detach(), uxx

    def func(self, st):
        return _pinn_func(st.model, lambda: self._points(st).detach())

    def compiled(self, st):
        return None  # (compiled for static shapes, it would compile again every call)


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
        PinnStep(),
        PinnResample(),
    ]


CASES = _make_cases()
CASE_NAMES = [c.name for c in CASES]


def get_case(name):
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"unknown case {name!r} (cases: {', '.join(CASE_NAMES)})")
