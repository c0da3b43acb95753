"""The short path of a call on a graph seen before (api._fast, engine.hit).

Each call form in HIT_CASES is made on a fresh graph three times (so the compiled loop runs on
the last): every result must match torch, and the second and third calls must have been served
by engine.hit (which replays fallback nodes as run does). Each form in DECLINED_CASES needs more
than a cached plan (a gradient that is None, a hook, a freed graph, arguments only _grad reads,
tensors bound otherwise than the first time):
engine.hit must not serve it, and the call must still give torch's results or torch's error.
"""
import pytest
import torch

import fastgrad
from fastgrad import _C, engine

from conftest import TORCH_GRAD, Twice, assert_same, assert_same_error, rand


@pytest.fixture
def hits(monkeypatch):
    """The results of the calls the short path served: _C.repeat_call (csrc/repeat_call.h: a
    call its cached plan's Executor runs alone) or engine.hit; ``hits.repeated`` those of
    repeat_call alone."""
    served = _Served()
    real_hit, real_repeat = engine.hit, _C.repeat_call

    def spy(*args):
        r = real_hit(*args)
        if r[0] is not None:
            served.append(r[0])
        return r

    def spy_repeat(*args):
        r = real_repeat(*args)
        if r is not None and r[0] is not None:
            served.append(r[0])
            served.repeated.append(r[0])
        return r

    monkeypatch.setattr(engine, "hit", spy)
    monkeypatch.setattr(_C, "repeat_call", spy_repeat)
    return served


class _Served(list):
    def __init__(self):
        super().__init__()
        self.repeated = []


def _x(gen, shape=(4, 3)):
    return rand(shape, gen).requires_grad_(True)


# name -> gen -> (outputs, inputs, kwargs); called three times on the same graph
HIT_CASES = {
    "tensor_sum": lambda g: (lambda x: ((torch.sin(x) * torch.exp(x)).sum(), x, {}))(_x(g)),
    "grad_outputs": lambda g: (lambda x: (torch.tanh(x) ** 3, x,
                                          {"grad_outputs": rand((4, 3), g)}))(_x(g)),
    "tuple_inputs": lambda g: (lambda x, y: ((x * torch.exp(y)).sum(), (x, y), {}))(
        _x(g), _x(g)),
    "list_outputs": lambda g: (lambda x: ([torch.sin(x).sum(), torch.cos(x).sum()], [x], {}))(
        _x(g)),
    "non_leaf_input": lambda g: (lambda x: (lambda h: (torch.exp(h).sum(), h, {}))(x * 2))(
        _x(g)),
    "parameter_input": lambda g: (lambda p: ((p * p).sum(), p, {}))(
        torch.nn.Parameter(rand((4, 3), g))),
    "softmax_rows": lambda g: (lambda x: (torch.softmax(x, -1), x,
                                          {"grad_outputs": rand((4, 3), g)}))(_x(g)),
    "create_graph": lambda g: (lambda x: ((x ** 3).sum(), x, {"create_graph": True}))(_x(g)),
    # fallback nodes, replayed on the hit
    "fallback_node": lambda g: (lambda x: (torch.cumsum(torch.sin(x), 0).sum(), x, {}))(_x(g)),
    "python_function": lambda g: (lambda x: (torch.exp(Twice.apply(x)).sum(), x, {}))(_x(g)),
    "fallback_create_graph": lambda g: (lambda x: (torch.cumsum(x ** 3, 0).sum(), x,
                                                   {"create_graph": True}))(_x(g)),
}


# what only engine.hit serves: graphs with fallback nodes, replayed
NOT_REPEATED = {"fallback_node", "python_function", "fallback_create_graph"}


@pytest.mark.parametrize("name", list(HIT_CASES))
def test_a_seen_graph_takes_the_short_path(name, gen, hits):
    outs, ins, kw = HIT_CASES[name](gen)
    for call in range(3):
        got = fastgrad.grad(outs, ins, retain_graph=True, **kw)
        ref = TORCH_GRAD(outs, ins, retain_graph=True, **kw)
        assert_same(got, ref, f"call {call}")
        assert type(got) is tuple
        if kw.get("create_graph"):  # the results stay differentiable, as torch's are
            assert all(r.requires_grad for r in got)
    assert len(hits) >= 2
    # the second call on has its Executor (made by the first): run from C++ alone
    assert len(hits.repeated) == (0 if name in NOT_REPEATED else 2)


@pytest.mark.parametrize("name", sorted(NOT_REPEATED))
def test_a_call_repeat_call_walked_is_not_walked_again(name, gen, hits, monkeypatch):
    """A call _C.repeat_call walks and signs but leaves to engine.hit (a fallback node to
    replay) is taken on from its walk: neither walked nor signed again in Python."""
    outs, ins, kw = HIT_CASES[name](gen)
    fastgrad.grad(outs, ins, retain_graph=True, **kw)
    before = len(hits)  # (an earlier test's twin graph may have made the first call a hit)
    walks = []
    for mod, fn in ((engine, "_collect"), (engine.graph_cache, "signature")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, real=real, fn=fn: walks.append(fn) or real(*a))
    for call in range(2):
        assert_same(fastgrad.grad(outs, ins, retain_graph=True, **kw),
                    TORCH_GRAD(outs, ins, retain_graph=True, **kw), f"call {call}")
    assert walks == [] and len(hits) == before + 2 and hits.repeated == []


def test_an_unreached_input_is_walked_once(gen, hits, monkeypatch):
    """An input the outputs do not reach (allow_unused): _C.repeat_call makes its edge, and
    the call, which the short path cannot serve (its gradient is None), is not walked again."""
    outs, ins, kw = DECLINED_CASES["unused_input"](gen)
    fastgrad.grad(outs, ins, retain_graph=True, **kw)
    walks = []
    real = engine._collect
    monkeypatch.setattr(engine, "_collect", lambda *a: walks.append(1) or real(*a))
    for call in range(2):
        assert_same(fastgrad.grad(outs, ins, retain_graph=True, **kw),
                    TORCH_GRAD(outs, ins, retain_graph=True, **kw), f"call {call}",
                    none_is_zero=False)
    assert walks == [] and hits == []


def test_the_short_path_reads_the_cache_as_python_does(gen, hits, monkeypatch):
    """_C.repeat_call reads graph_cache._ENTRIES (and the other names it needs) when it runs,
    as Python does: a cache replaced under it is the one it looks in."""
    outs, ins, kw = HIT_CASES["tensor_sum"](gen)
    for _ in range(2):
        fastgrad.grad(outs, ins, retain_graph=True, **kw)
    served = len(hits.repeated)  # (1, or 2 where an earlier test cached its twin)
    assert served >= 1
    monkeypatch.setattr(engine.graph_cache, "_ENTRIES", {})
    assert_same(fastgrad.grad(outs, ins, retain_graph=True, **kw),
                TORCH_GRAD(outs, ins, retain_graph=True, **kw))
    assert len(hits.repeated) == served and len(engine.graph_cache._ENTRIES) == 1


def test_retain_graph_false_on_the_short_path(gen, hits):
    """A hit that frees its graph: the next call on it raises torch's error."""
    x = _x(gen)
    y0 = (torch.exp(x) ** 2).sum()
    fastgrad.grad(y0, x)  # fills the cache for this structure
    y = (torch.exp(x) ** 2).sum()
    assert_same(fastgrad.grad(y, x), TORCH_GRAD((torch.exp(x) ** 2).sum(), x))
    assert len(hits) == 1 and len(hits.repeated) == 1  # (freed by csrc/repeat_call.cpp)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = (torch.exp(x2) ** 2).sum()
    TORCH_GRAD(y2, x2)
    assert_same_error(lambda: TORCH_GRAD(y2, x2), lambda: fastgrad.grad(y, x))


def _with_hook(g):
    twin = _x(g)  # the same structure without the hook, cached first
    fastgrad.grad(torch.sin(twin).sum(), twin)
    x = _x(g)
    x.register_hook(lambda t: t * 2)
    return torch.sin(x).sum(), x, {}


def _with_inner_hook(g):
    """A hook on an intermediate tensor, its graph's twin cached first without it."""
    twin = _x(g)
    fastgrad.grad(torch.sin(twin * 2).sum(), twin)
    x = _x(g)
    h = x * 2
    h.register_hook(lambda t: t * 3)
    return torch.sin(h).sum(), x, {}


def _under_saved_tensor_hooks(g, seen=True):
    # seen: the graph goes to PyTorch (test_saved_hooks.py). Unseen (pushed before fastgrad was
    # imported), its saved tensors unpack as new tensors each time: lowering binds them anew,
    # so the first call's IR reads leaves a later call's signature does not bind (it must
    # derive anew)
    from fastgrad import hooks
    x = _x(g)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = (torch.exp(x) * x).sum()
    if not seen:
        hooks._STATE["saved"] = False
    return y, x, {}


DECLINED_CASES = {
    "saved_tensor_hooks": _under_saved_tensor_hooks,
    "saved_tensor_hooks_unseen": lambda g: _under_saved_tensor_hooks(g, seen=False),
    "unused_input": lambda g: (lambda x, y: (torch.sin(x).sum(), (x, y),
                                             {"allow_unused": True}))(_x(g), _x(g)),
    "input_hook": _with_hook,
    "inner_hook": _with_inner_hook,
    "materialize_grads": lambda g: (lambda x, y: (torch.sin(x).sum(), (x, y),
                                                  {"materialize_grads": True}))(_x(g), _x(g)),
    "dict_inputs": lambda g: (lambda x: (torch.sin(x).sum(), {"x": x}, {}))(_x(g)),
    "grad_outputs_wrong_shape": lambda g: (lambda x: (torch.sin(x), x,
                                                      {"grad_outputs": rand((3,), g)}))(_x(g)),
}


def _outcome(run):
    try:
        return run(), None
    except Exception as e:  # noqa: BLE001
        return None, e


@pytest.mark.parametrize("name", list(DECLINED_CASES))
def test_calls_the_short_path_declines(name, gen, hits):
    outs, ins, kw = DECLINED_CASES[name](gen)
    for call in range(3):
        ref, ref_err = _outcome(lambda: TORCH_GRAD(outs, ins, retain_graph=True, **kw))
        got, got_err = _outcome(lambda: fastgrad.grad(outs, ins, retain_graph=True, **kw))
        if ref_err is None:
            assert got_err is None, f"fastgrad raises {got_err!r}, torch does not"
            if isinstance(ref, dict):
                assert list(got) == list(ref)
                got, ref = tuple(got.values()), tuple(ref.values())
            assert_same(got, ref, f"call {call}", none_is_zero=False)
        else:
            assert (type(got_err), str(got_err)) == (type(ref_err), str(ref_err))
    assert hits == []


# ---- the plain call's argument check (csrc/call_args.h), against its rules in Python --------

class _Sub(torch.Tensor):
    pass


def _plain_args_reference(outputs, inputs, grad_outputs):
    """call_args.h's rules, as plain Python: (out_edges, grad_outputs, in_edges) or None."""
    plain = (torch.Tensor, torch.nn.Parameter)

    def tensors(ts):
        if type(ts) in plain:
            ts = (ts,)
        elif type(ts) in (tuple, list) and ts:
            ts = tuple(ts)
        else:
            return None
        return ts if all(type(t) in plain and t.requires_grad for t in ts) else None
    outs, ins = tensors(outputs), tensors(inputs)
    if outs is None or ins is None or any(o.grad_fn is None for o in outs) or \
            any(i._backward_hooks for i in ins):
        return None
    gos = _plain_grads_reference(outs, grad_outputs)
    if gos is None:
        return None
    return ([(o.grad_fn, o.output_nr) for o in outs], gos,
            [i if i.grad_fn is None else (i.grad_fn, i.output_nr) for i in ins])


def _plain_grads_reference(outs, grad_outputs):
    """The grad_outputs part of those rules (_C.plain_grads): a tuple, or None."""
    if grad_outputs is None:
        if any(type(o) is not torch.Tensor or o.numel() != 1 or not o.dtype.is_floating_point
               for o in outs):
            return None
        return tuple(torch.ones_like(o) for o in outs)
    gos = (grad_outputs,) if isinstance(grad_outputs, torch.Tensor) else grad_outputs
    if type(gos) not in (tuple, list) or len(gos) != len(outs) or any(
            type(o) is not torch.Tensor or type(g) is not torch.Tensor or o.is_nested or
            g.shape != o.shape or not o.dtype.is_floating_point or
            not g.dtype.is_floating_point for o, g in zip(outs, gos)):
        return None
    return tuple(gos)


def _same_grads(want, got):
    if want is None:
        assert got is None
        return
    assert type(got) is tuple and len(got) == len(want)
    for a, b in zip(want, got):
        assert type(b) is torch.Tensor and b.shape == a.shape and b.dtype == a.dtype
        assert torch.equal(a, b)


def _call_forms(g):
    """name -> (outputs, inputs, grad_outputs): plain calls and each way of not being one."""
    x, w = _x(g), _x(g, (3,))
    h = x * 2  # a non-leaf input
    y, s = torch.tanh(h) * w, (torch.sin(x) * w).sum()
    pair = torch.sin(x).unbind(1)[:2]  # two outputs of one node (output_nr 0 and 1)
    p = torch.nn.Parameter(rand((4, 3), g))
    hooked = _x(g)
    hooked.register_hook(lambda t: t)
    go, go_int = rand((4, 3), g), torch.ones(4, 3, dtype=torch.int64)
    return {
        "tensor": (y, x, go), "implicit_scalar": (s, x, None), "tuples": ((y,), (x, w), (go,)),
        "lists": ([y, s], [h, w], [go, torch.ones(())]), "two_outputs": (pair, x, None),
        "two_outputs_given": (pair, x, [rand((4,), g), rand((4,), g)]),
        "parameter_input": ((p * x).sum(), [p, x], None),
        "non_scalar_implicit": (y, x, None), "empty_inputs": (y, (), go),
        "empty_outputs": ((), x, ()), "not_requiring": (y, x.detach(), go),
        "leaf_output": (x, x, go), "hooked_input": ((hooked * 2).sum(), hooked, None),
        "subclass_output": (y.as_subclass(_Sub), x, go), "subclass_input": (s, x.as_subclass(_Sub), None),
        "subclass_grad": (y, x, go.as_subclass(_Sub)), "wrong_shape": (y, x, rand((3, 4), g)),
        "int_grad": (y, x, go_int), "too_few_grads": ([y, s], x, [go]),
        "dict_inputs": (s, {"x": x}, None), "generator_inputs": (s, (t for t in [x]), None),
        "number_grad": (s, x, 1.0),
    }


@pytest.mark.parametrize("name", list(_call_forms(torch.Generator().manual_seed(0))))
def test_plain_call_args_like_their_rules(name, gen):
    from fastgrad import _C
    outputs, inputs, gos = _call_forms(gen)[name]
    want = _plain_args_reference(outputs, inputs, gos)
    got = _C.plain_call_args(outputs, inputs, gos)
    if want is None:
        assert got is None
        return
    assert got is not None
    (wo, wg, wi), (go_, gg, gi) = want, got
    same = lambda a, b: a is b or (type(a) is tuple and len(a) == len(b) and  # noqa: E731
                                    all(u is v or u == v for u, v in zip(a, b)))
    assert len(go_) == len(wo) and all(same(a, b) for a, b in zip(wo, go_))
    assert len(gi) == len(wi) and all(same(a, b) for a, b in zip(wi, gi))
    _same_grads(wg, gg)


@pytest.mark.parametrize("name", list(_call_forms(torch.Generator().manual_seed(0))))
def test_plain_grads_like_their_rules(name, gen):
    # the grad_outputs part alone, as api._grad uses it (outputs already a tuple)
    from fastgrad import _C
    outputs, _, gos = _call_forms(gen)[name]
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    _same_grads(_plain_grads_reference(outs, gos), _C.plain_grads(outs, gos))
