"""Saved tensors tied to the nodes that made them (sweep._link_saved), and computed again by
the plan instead of loaded where plan.RECOMPUTE says so for the device.

Each chain is differentiated with the policy forced on, on every device, against
torch.autograd.grad in float64; the explain report must show that the plan read only the
arrays it should (x and the scalar gradient), so a silent fall back to loading fails. The
in-place cases are where tying would be wrong: a tensor changed after it was made (its
version is no longer 0) keeps its own value, in a fresh sweep and in a cached one.
"""
import contextlib

import pytest
import torch

import fastgrad
from fastgrad import hooks, node_view
from conftest import DEVICE_PARAMS, FAST_GRAD, TORCH_GRAD, assert_same, rand, recompute

F = torch.nn.functional


def _cos_of_shifted(x, op):
    s = torch.sin(x)  # (saved by the product: the shift's input is known to be sin(x))
    return torch.cos(op(s, 2.0)) * s


# (name, forward of x, how many arrays of x's size the gradient's plan reads with the policy
# on, and with it off)
CHAINS = [
    # x alone: every saved value is computed again from it
    ("sin_exp", lambda x: torch.sin(x) * torch.exp(x), 1, 3),
    ("softplus_sigmoid", lambda x: F.softplus(x) * torch.sigmoid(x), 1, 3),
    ("exp_sin_cos", lambda x: torch.exp(x) * torch.sin(x) * torch.cos(x), 1, 5),
    # nobody saved sin(x), so exp's input is not known to be sin(x) (it may have changed in
    # place before exp read it): exp's result is read
    ("exp_of_sin", lambda x: torch.exp(torch.sin(x)) * torch.cos(x), 2, 3),
    # tanh and sigmoid save their results only: x's value comes from mul, which saved it
    ("tanh_sigmoid", lambda x: torch.tanh(x) * x + torch.sigmoid(x) / 3.0, 1, 3),
    # nobody saved x, so h = x * 1.5 + 0.25 (made twice, read by sin and by cos) is read
    ("intermediate", lambda x: torch.sin(x * 1.5 + 0.25) * torch.cos(x * 1.5 + 0.25), 2, 4),
    # ELU's lowered forward is not PyTorch's to the last digit: its saved result stays loaded
    ("elu_exp", lambda x: F.elu(x) * torch.exp(x), 2, 3),
    # 1 - x (RsubBackward1) and the Scalar overloads of add and sub lower without their
    # scalar, which PyTorch does not save: the results they make stay loaded
    ("one_minus", lambda x: torch.sin(1 - x) * x, 2, 3),
    ("add_scalar", lambda x: _cos_of_shifted(x, torch.ops.aten.add.Scalar), 2, 4),
    ("sub_scalar", lambda x: _cos_of_shifted(x, torch.ops.aten.sub.Scalar), 2, 4),
]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("name,fn,arrays,loaded", CHAINS, ids=[c[0] for c in CHAINS])
def test_a_chain_computes_its_saved_values_again(name, fn, arrays, loaded, device, gen):
    x0 = rand((257,), gen).to(device)
    for on, want_arrays in ((True, arrays), (False, loaded)):
        with recompute(on, device):
            for _ in range(2):  # (a fresh sweep, then the cached one)
                got, want = (grad(fn(x).sum(), x)
                             for grad, x in ((FAST_GRAD, x0.clone().requires_grad_()),
                                             (TORCH_GRAD, x0.clone().requires_grad_())))
                assert_same(got, want)
            x = x0.clone().requires_grad_()
            report = fastgrad.explain(fn(x).sum(), x)
        assert report.all_native, report
        # (and a few scalars: the gradient of the sum, wrapped numbers)
        read = report.bytes_read // (x0.numel() * x0.element_size())
        if on and not node_view.shows_saved_tensor_hooks():
            # (an older torch: saved outputs may have come through hooks, and stay loaded)
            assert arrays <= read <= loaded, f"policy on: {read} arrays read\n{report}"
        else:
            assert read == want_arrays, f"policy {on}: {read} arrays read\n{report}"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_second_order_through_tied_values(device, gen):
    """create_graph: the block computes sin(x) and exp(x) from x in its forward, but keeps the
    saved tensors as inputs, so a derivative with respect to one (an intermediate) flows as
    in PyTorch; neither call of the pipeline reads them."""
    x0 = rand((64,), gen).to(device)
    size = x0.numel() * x0.element_size()

    def run(grad, reports=None):
        x = x0.clone().requires_grad_()
        s, e = torch.sin(x), torch.exp(x)
        if reports is not None:
            reports.append(fastgrad.explain((s * e).sum(), x, create_graph=True))
        (g,) = grad((s * e).sum(), x, create_graph=True)
        if reports is not None:
            reports.append(fastgrad.explain((g * g).sum(), x))
        return (g,) + grad((g * g).sum(), (x, s, e), retain_graph=True) + \
            TORCH_GRAD(g.sum(), (s, e))
    with recompute(True, device):
        reports = []
        assert_same(run(FAST_GRAD, reports), run(TORCH_GRAD))
    # (the second call reads g too: (g * g) saved it)
    for r, arrays in zip(reports, (1, 2)):
        assert r.all_native, r
        if node_view.shows_saved_tensor_hooks():  # (else exp's saved result stays loaded)
            assert r.bytes_read // size == arrays, r


def _changed_after_it_was_made(x):
    """sin(x) changed in place under no_grad after sin made it: mul saves the changed tensor."""
    y = torch.sin(x)
    with torch.no_grad():
        y.add_(0.5)
    return (y * torch.exp(x)).sum()


def _input_changed_after_exp_read_it(x):
    """exp read h before h changed in place; sin saved h after: exp's result is exp of the old
    h, and its input edge's value (h now) is not what exp read."""
    h = x * 1.5
    e = torch.exp(h)
    with torch.no_grad():
        h.add_(0.5)
    return (e * torch.sin(h)).sum()


def _unsaved_input_changed_before_exp_read_it(x):
    """exp read sin(x) + 1 (changed in place under no_grad, saved by nobody)."""
    h = torch.sin(x)
    with torch.no_grad():
        h.add_(1.0)
    return (torch.exp(h) * torch.cos(x)).sum()


def _unchanged(x):
    return (torch.sin(x) * torch.exp(x)).sum()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("changed", [_changed_after_it_was_made, _input_changed_after_exp_read_it,
                                     _unsaved_input_changed_before_exp_read_it])
def test_a_tensor_changed_in_place_keeps_its_own_value(changed, device, gen):
    x0 = rand((33,), gen).to(device)
    with recompute(True, device):
        # the same graph unchanged first, so a cached sweep that tied it exists
        for fn in (_unchanged, changed, changed):
            got, want = (grad(fn(x), x) for grad, x in ((FAST_GRAD, x0.clone().requires_grad_()),
                                                        (TORCH_GRAD, x0.clone().requires_grad_())))
            assert_same(got, want, what=fn.__name__)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("create_graph", [False, True])
def test_values_through_saved_tensor_hooks_are_not_tied(create_graph, device, gen):
    """Under saved-tensor hooks PyTorch computes with what the unpack hook gives back (here a
    half-precision copy), not with what the producer made: such tensors keep their own value."""
    x0 = rand((40,), gen).to(device)

    def run(grad):
        x = x0.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.half(), lambda t: t.double()):
            y = (torch.sin(x) * torch.exp(x)).sum()
        # (as if the hooks were pushed before fastgrad was imported, which it does not see, so
        # that it runs the graph: each saved tensor's own check must keep it untied)
        hooks._STATE["saved"] = False
        (g,) = grad(y, x, create_graph=create_graph)
        return (g,) + (grad(g.sum(), x) if create_graph else ())
    with recompute(True, device):
        for _ in range(2):
            assert_same(run(FAST_GRAD), run(TORCH_GRAD))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_a_sweep_cached_before_hooks_is_not_reused_under_them(device, gen):
    """A graph built under value-changing hooks has the signature of one built without them
    (an unpacked value keeps its producer's grad_fn): the sweep cached for the latter, which
    tied w's saved value s to sin(x), must not serve the former."""
    x0, w0 = rand((30,), gen).to(device), rand((30,), gen).to(device)

    def run(grad, hooked):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        s = torch.sin(x)
        ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t + 1.0) \
            if hooked else contextlib.nullcontext()
        with ctx:
            y = (s * (w * 1.0)).sum()
        return grad(y, (x, w))
    with recompute(True, device):
        for hooked in (False, False, True, True):
            assert_same(run(FAST_GRAD, hooked), run(TORCH_GRAD, hooked), what=f"hooks {hooked}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_create_graph_keeps_a_hooks_value(device, gen):
    """create_graph: the block saves the hook's value (sin(x) + 0.25) again, without hooks; the
    second call must not tie it to sin(x)."""
    x0 = rand((12,), gen).to(device)

    def run(grad):
        x = x0.clone().requires_grad_()
        s = torch.sin(x)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t + 0.25):
            y = (s * torch.cos(x)).sum()
        (gx,) = grad(y, x, create_graph=True)
        return (gx,) + grad((gx * gx).sum(), x)
    with recompute(True, device):
        for _ in range(2):
            assert_same(run(FAST_GRAD), run(TORCH_GRAD))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("op", [torch.sinh, torch.cosh, torch.exp, torch.expm1])
def test_a_value_near_overflow_is_pytorchs(op, device, gen):
    """Near float64's overflow PyTorch's vectorised sinh and cosh already give inf where the
    function is still finite: their results are not computed again (not in FAITHFUL)."""
    x0 = (709.6 + rand((40,), gen).abs() * 0.3).to(device)
    w0 = rand((40,), gen).to(device)

    def run(grad):
        # w's gradient is op(x) itself, and x is an input so that op's node is lowered. (x's
        # own gradient is left out: there PyTorch's cosh(x) * w overflows early too, with the
        # policy off as well.)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        return grad((op(x) * w).sum(), (x, w))[1]
    with recompute(True, device):
        assert_same(run(FAST_GRAD), run(TORCH_GRAD))


@pytest.mark.parametrize("hooked", [False, True])
def test_hooks_told_apart_where_pytorch_does_not_show_them(hooked, gen):
    """Where a SavedTensor shows no unpack hook (torch 2.5), a saved input counts as unhooked
    only if it unpacks to the very same tensor twice, and a saved output (unpacked anew each
    time) always counts as hooked: a hook's value is never replaced by its producer's."""
    x = rand((5,), gen).requires_grad_()
    ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: t.half(), lambda t: t.double()) \
        if hooked else torch.enable_grad()
    with ctx:
        y = torch.sin(x) * torch.exp(x)
    mul, exp = y.grad_fn, y.grad_fn.next_functions[1][0]
    old_raw = object()  # (no unpack_hook attribute, as on an older torch)
    saved_input = mul._saved_self  # sin(x), an input of the product
    assert node_view.through_hooks(old_raw, saved_input, lambda: mul._saved_self) is hooked
    saved_output = exp._saved_result
    assert node_view.through_hooks(old_raw, saved_output, lambda: exp._saved_result) is True
    if node_view.shows_saved_tensor_hooks():  # (and the newer torch's own answer agrees)
        assert node_view.through_hooks(mul._raw_saved_self, saved_input, None) is hooked


@pytest.mark.skipif(getattr(torch._C, "_storage_Use_Count", None) is None,
                    reason="torch's storage use counts are not readable")
@pytest.mark.parametrize("on", [False, True])
def test_a_check_left_unasked_holds_nothing_after_the_sweep(on, monkeypatch, gen):
    """Where PyTorch does not show a saved tensor's hook (2.5, made so here), its check waits
    for hooked(); one nobody asked for (RECOMPUTE off) goes at the end of the sweep with what
    it holds: a freed graph lets exp's saved result go as torch does."""
    def as_on_older_torch(bind, k, raw, t, again):
        bind.__dict__.setdefault("hooks_pending", []).append((k, object(), t, again))
    monkeypatch.setattr(node_view, "note_hooks", as_on_older_torch)
    x0, users = rand((6,), gen), torch._C._storage_Use_Count
    with recompute(on, "cpu"):
        counts = []
        for grad in (TORCH_GRAD, FAST_GRAD, FAST_GRAD):
            x = x0.clone().requires_grad_()
            y = torch.exp(x)
            grad(y.sum(), x)
            counts.append(users(y.untyped_storage()._cdata))
    assert counts[1] == counts[2] == counts[0], counts
