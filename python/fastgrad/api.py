"""fastgrad.grad: a drop-in for torch.autograd.grad, and fastgrad.explain.

Argument handling mirrors torch.autograd.grad. Whenever a call would be an error, or is outside
what the compiled path handles (other devices, tensor subclasses, complex dtypes), the call is
handed to PyTorch's own ``torch.autograd.grad`` unchanged, so errors and results are PyTorch's
by construction. The reference to it is taken at import, so patching ``torch.autograd.grad`` to
``fastgrad.grad`` (as some libraries expect) cannot recurse.
"""
import warnings

import torch
from torch.autograd import forward_ad as _fwad
from torch.autograd import graph as _graph

from . import _C, churn, engine, graph_cache, hooks, node_view, plan, runtime
from .plan import Unplannable

_torch_grad = torch.autograd.grad
_make_grads = getattr(torch.autograd, "_make_grads", None)
_to_tuple = getattr(torch.autograd, "_tensor_or_tensors_to_tuple", None)
_GradientEdge = getattr(_graph, "GradientEdge", None)
_get_edge = getattr(_graph, "get_gradient_edge", None)


def _graph_readable():
    """Whether this PyTorch shows what fastgrad reads of a graph: each node's
    ``_input_metadata`` (the shape, dtype and device of each gradient the node takes), which
    sets the shape each derived gradient is summed to. Releases before 2.5 do not show it, and
    nothing else tells an intermediate node's shapes (AddBackward0 saves none), so there every
    call goes to PyTorch."""
    with node_view.recording():
        x = torch.zeros(1, requires_grad=True)
        return hasattr((x * 2.0).grad_fn, "_input_metadata")


NATIVE = _graph_readable()
NOT_NATIVE_REASON = ("torch %s does not show autograd nodes' _input_metadata (fastgrad runs "
                     "natively from torch 2.5)" % torch.__version__)

_is_anomaly_enabled = torch.is_anomaly_enabled
ANOMALY_REASON = ("anomaly detection is on (torch.autograd.set_detect_anomaly): PyTorch checks "
                  "each node's results for NaN and names the node that made one")

_is_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or \
    (lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
AUTOCAST_REASON = ("autocast is on: PyTorch runs the backward's products in the autocast dtype "
                   "and casts each node's gradients back to its input's dtype")
FORWARD_AD_REASON = ("a forward-mode AD level is open (torch.autograd.forward_ad.dual_level): "
                     "PyTorch's results carry tangents")
_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None) \
    or (lambda: None)
FUNCTORCH_REASON = ("inside a torch.func transform (vmap, grad, jacrev, ...): its wrapped "
                    "tensors are PyTorch's to differentiate")


def _mode_reason():
    """Why a mode in force makes PyTorch run the call (None: none does): modes only its own
    engine follows, checked on every call (0.16 us together, measured:
    docs/performance-history-nov27.md)."""
    if _is_anomaly_enabled():
        return ANOMALY_REASON
    if _is_autocast_enabled():
        return AUTOCAST_REASON
    if _fwad._current_level >= 0:
        return FORWARD_AD_REASON
    if _functorch_stack() is not None:
        return FUNCTORCH_REASON
    return None

# A batched call (is_grads_batched) runs the plan once per row, about 30 us of host time a row
# on the development VM whatever its size, where PyTorch runs one backward under vmap: on rows
# of fewer elements than this (the largest input or grad_output row) PyTorch runs it whole.
# CPU: measured (float64, one thread, a softmax/sin/exp/tanh graph, 64 rows: 4.0x PyTorch's
# time at 1000 elements a row, 1.5x at 4000, 0.6x at 16000). CUDA: an estimate, not measured.
BATCHED_ROW_NUMEL = {"cpu": 8192, "cuda": 1 << 20}
BATCHED_SMALL_REASON = ("a batched call (is_grads_batched) over rows this small: fastgrad runs "
                        "its plan once per row, PyTorch one backward under vmap")


def _rows_small(inputs, grad_outputs):
    """Whether a batched call's rows are too small for a run per row (BATCHED_ROW_NUMEL)."""
    most, dev = 0, None
    for t in inputs:
        if isinstance(t, torch.Tensor):  # (not a GradientEdge, whose size is its node's)
            most, dev = max(most, t.numel()), dev or t.device.type
    for g in grad_outputs:
        if g is not None and g.dim():
            most, dev = max(most, g[0].numel()), dev or g.device.type
    return most < BATCHED_ROW_NUMEL.get(dev or "cpu", 0)


_DICT_INPUTS = []  # [whether the installed torch.autograd.grad takes a dict of inputs], once asked


def _torch_takes_dicts():
    """Newer PyTorch releases take a dict of inputs (and return a dict); older ones raise their
    own error for it, and then so must fastgrad. Asked once, on a throwaway graph."""
    if not _DICT_INPUTS:
        with node_view.recording():
            x = torch.zeros((), requires_grad=True)
            try:
                _torch_grad(x * 2.0, {"x": x})
                _DICT_INPUTS.append(True)
            except (TypeError, RuntimeError):
                _DICT_INPUTS.append(False)
    return _DICT_INPUTS[0]


def _is_edge(x):
    return _GradientEdge is not None and isinstance(x, _GradientEdge)


def _edge(t):
    if _is_edge(t):
        return t.node, t.output_nr
    if t.grad_fn is not None:
        return t.grad_fn, t.output_nr
    return _get_edge(t).node, 0


def _unhandled(outputs, inputs):
    """Why PyTorch must run the call (None if fastgrad may): a tensor subclass, an argument
    that does not require grad (PyTorch raises before running the graph), or an input with
    tensor hooks (PyTorch applies them to the result)."""
    for group in (outputs, inputs):
        for t in group:
            if type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter):
                if not t.requires_grad:
                    return "arguments handled by PyTorch"
                if group is inputs and t._backward_hooks:
                    return "an input has tensor hooks"
            elif isinstance(t, torch.Tensor) or not _is_edge(t):
                return "arguments handled by PyTorch"
    return None


class Report:
    """What fastgrad did for one call (returned by ``explain``)."""

    def __init__(self, trace, reason=None):
        self.native = list(trace.native)
        self.fallback = list(trace.fallback)
        if reason is not None:
            self.fallback.append(("<whole call>", reason))
        st = trace.stats
        self.regions = list(st.regions)
        self.kernel_launches = st.launches
        self.bytes_read, self.bytes_written = st.bytes_read, st.bytes_written

    @property
    def all_native(self):
        return not self.fallback

    def __str__(self):
        lines = [f"fastgrad report: {len(self.native)} nodes native, "
                 f"{len(self.fallback)} fell back; {self.kernel_launches} kernel launches, "
                 f"{self.bytes_read} bytes read, {self.bytes_written} bytes written"]
        if self.native:
            lines.append("native: " + ", ".join(self.native))
        for name, why in self.fallback:
            lines.append(f"fallback: {name} ({why})")
        lines += ["  " + r for r in self.regions]
        return "\n".join(lines)

    __repr__ = __str__


def _run(outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused,
         is_grads_batched, trace, cap=None):
    out_edges = [_edge(o) for o in outputs]
    # Leaf inputs go as tensors: the engine finds their nodes while it walks the graph.
    in_edges = [i if type(i) is not _GradientEdge and i.grad_fn is None else _edge(i)
                for i in inputs]
    if is_grads_batched:
        if _rows_small(inputs, grad_outputs):
            raise Unplannable(BATCHED_SMALL_REASON)
        if not engine.rows_alike(out_edges, in_edges):
            raise Unplannable("a batched call whose graph runs user code (tensor hooks, a "
                              "Python Function's backward) or a node whose derivative vmap "
                              "changes (max(), median()): PyTorch runs it once, under vmap")
        nb = next(g.shape[0] for g in grad_outputs if g is not None)
        # PyTorch's engine runs with grad mode on exactly under create_graph: the rows' slices
        # and the stack of their results are recorded then, under no_grad too
        with torch.set_grad_enabled(create_graph):
            rows = [_row(out_edges, in_edges, grad_outputs, b, nb, retain_graph, create_graph,
                         allow_unused, trace) for b in range(nb)]
            results = [None if r[0] is None else torch.stack(r) for r in zip(*rows)]
    else:
        results = engine.run(out_edges, grad_outputs, in_edges, create_graph, retain_graph,
                             allow_unused, trace, cap)
    return results


def _row(out_edges, in_edges, grad_outputs, b, nb, retain_graph, create_graph, allow_unused,
         trace):
    """Row ``b`` of a batched call: its results for row b of each grad_output."""
    gb = [None if g is None else g[b] for g in grad_outputs]
    keep = retain_graph or b < nb - 1
    try:
        return engine.run(out_edges, gb, in_edges, create_graph, keep, allow_unused, trace)
    except RuntimeError:
        if keep and not retain_graph:
            # PyTorch raises such an error (an input no path reaches, say) after its engine
            # ran the graph and freed it: the row again, freeing it, raises it
            engine.run(out_edges, gb, in_edges, create_graph, False, allow_unused, trace)
        raise


_READ_AGAIN = frozenset([torch.Tensor, tuple, list, type(None)])


def _final_torch_grad(*args):
    """PyTorch's results for a call handed to it, or its error, raised as it is (grad hands
    the call to PyTorch again for no error PyTorch raised itself)."""
    try:
        return _torch_grad(*args)
    except RuntimeError as e:
        e._fastgrad_final = True
        raise


def _cast_unrecorded(outputs, grad_outputs):
    """Whether a grad_output that requires grad has another dtype than its output: PyTorch
    casts it before its engine records anything, so under no_grad the result of a create_graph
    call does not depend on it, where fastgrad's plan would differentiate through the cast."""
    outs = (outputs,) if not isinstance(outputs, (list, tuple)) else outputs
    gos = (grad_outputs,) if isinstance(grad_outputs, torch.Tensor) else grad_outputs
    if not isinstance(gos, (list, tuple)):
        return False
    return any(isinstance(g, torch.Tensor) and g.requires_grad and
               (not isinstance(o, torch.Tensor) or o.dtype != g.dtype)
               for o, g in zip(outs, gos))


def _settled(arg):
    """``arg`` as a tuple where it is an iterable to be read once (``model.parameters()``):
    a call handed to PyTorch after fastgrad read it must pass PyTorch the same tensors."""
    if type(arg) in _READ_AGAIN or isinstance(arg, (torch.Tensor, list, tuple)) or \
            _is_edge(arg) or hasattr(arg, "keys") or not hasattr(arg, "__iter__"):
        return arg
    return tuple(arg)


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         only_inputs=True, allow_unused=None, is_grads_batched=False, materialize_grads=False):
    """Drop-in for :func:`torch.autograd.grad`; see its documentation for the arguments."""
    if not NATIVE or type(create_graph) is not bool or \
            not (retain_graph is None or type(retain_graph) is bool) or \
            not (allow_unused is None or type(allow_unused) is bool) or \
            type(materialize_grads) is not bool or _mode_reason() is not None:
        # a torch whose graphs fastgrad cannot read runs every call; PyTorch reads these flags
        # as C integers (0 and 1 pass, a string, a float or None where no default is None
        # raise its TypeError, -1 its OverflowError): anything but a bool goes to it, for its
        # results or its error; and so does a call made in a mode only PyTorch's engine
        # follows (_mode_reason)
        return _torch_grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
                           only_inputs, allow_unused, is_grads_batched, materialize_grads)
    if create_graph and torch.is_inference_mode_enabled():
        if materialize_grads:  # (PyTorch's zeros for unused inputs require grad even there)
            return _torch_grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
                               only_inputs, allow_unused, is_grads_batched, materialize_grads)
        # nothing is recorded in inference mode: PyTorch's results are plain inference tensors
        # (create_graph still keeps the graph by default)
        retain_graph, create_graph = True if retain_graph is None else retain_graph, False
    elif create_graph and not torch.is_grad_enabled() and _cast_unrecorded(outputs, grad_outputs):
        return _torch_grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
                           only_inputs, allow_unused, is_grads_batched, materialize_grads)
    try:
        cap = None
        plain = only_inputs and not is_grads_batched and not materialize_grads
        if plain:
            # a graph seen before, whose cached plan runs in C++ alone; else what it walked
            ran = _C.repeat_call(outputs, inputs, grad_outputs, retain_graph, create_graph)
            if ran is not None:
                if ran[0] is not None:
                    return ran[0]
                if ran[1] is None:
                    # routed (its churn record, hooks only PyTorch's engine runs): straight to
                    # PyTorch; its arguments were plain, so nothing was read that PyTorch must
                    # see again
                    return _final_torch_grad(outputs, inputs, grad_outputs, retain_graph,
                                             create_graph, only_inputs, allow_unused,
                                             is_grads_batched, materialize_grads)
        outputs, inputs = _settled(outputs), _settled(inputs)
        grad_outputs = _settled(grad_outputs)
        if plain:
            try:
                res, cap = _fast(outputs, inputs, grad_outputs, retain_graph, create_graph, ran)
            except churn.Routed:  # (straight to PyTorch: _grad's checks would only cost time)
                return _final_torch_grad(outputs, inputs, grad_outputs, retain_graph,
                                         create_graph, only_inputs, allow_unused,
                                         is_grads_batched, materialize_grads)
            if res is not None:
                return res
        return _grad(outputs, inputs, grad_outputs, retain_graph, create_graph, only_inputs,
                     allow_unused, is_grads_batched, materialize_grads, None, cap)
    except RuntimeError as e:
        # PyTorch's error for a graph it cannot run (freed, or modified in place), met while
        # the C++ path read it: PyTorch raises it, after what its engine runs on the way
        if not engine.graph_error(e):
            raise
        return _torch_grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
                           only_inputs, allow_unused, is_grads_batched, materialize_grads)


def _fast(outputs, inputs, grad_outputs, retain_graph, create_graph, ran=None):
    """(results, capture) of a plain call on a graph seen before (engine.hit); results None:
    _grad handles the call, with every check and fallback, and the capture (None for a call
    that is not plain) spares it walking and signing the graph again. Plain: tensors (no
    edges, subclasses or dicts), outputs that have a grad_fn, inputs without tensor hooks,
    grad_outputs that need no checks (all checked in C++: csrc/call_args.h); any other call is
    left to _grad whole. ``ran``: what _C.repeat_call said of the call, when it neither ran it
    nor routed it (csrc/repeat_call.h; grad sends a routed call to PyTorch itself): its walk
    and signature."""
    walk = None
    if ran is None:
        args = _C.plain_call_args(outputs, inputs, grad_outputs)
    else:
        walk = ran[1]
        args = walk[:3]
    if args is None:
        return None, None
    out_edges, gos, in_edges = args
    try:
        res, cap = engine.hit(out_edges, gos, in_edges, create_graph,
                              create_graph if retain_graph is None else retain_graph, walk)
    except churn.Routed:
        raise
    except Unplannable:  # (_grad hands such a call to PyTorch)
        return None, None
    return (None, cap) if res is None else (tuple(res), None)


_C.call_args_setup(torch.Tensor, torch.nn.Parameter, torch.ones_like)
_C.repeat_setup(engine, graph_cache, runtime, hooks, churn, node_view, plan)


def _grad(outputs, inputs, grad_outputs, retain_graph, create_graph, only_inputs,
          allow_unused, is_grads_batched, materialize_grads, trace, cap=None):
    args = (outputs, inputs, grad_outputs, retain_graph, create_graph, only_inputs,
            allow_unused, is_grads_batched, materialize_grads)

    def torch_grad(reason):
        if trace is not None:
            trace.fallback.append(("<whole call>", reason))
        return _final_torch_grad(*args)

    if not NATIVE:
        return torch_grad(NOT_NATIVE_REASON)
    mode = _mode_reason()
    if mode is not None:
        return torch_grad(mode)
    if materialize_grads and allow_unused is False:
        return torch_grad("invalid arguments")
    if allow_unused is None:
        allow_unused = materialize_grads
    outs = (outputs,) if isinstance(outputs, torch.Tensor) or _is_edge(outputs) \
        else tuple(outputs)
    keys = None
    if isinstance(inputs, torch.Tensor) or _is_edge(inputs):
        ins = (inputs,)
    elif type(inputs) is dict and _torch_takes_dicts():
        keys, ins = list(inputs.keys()), tuple(inputs.values())
    else:
        ins = tuple(inputs) if not hasattr(inputs, "keys") else None
    if ins is None or len(ins) == 0 or _make_grads is None or _to_tuple is None:
        return torch_grad("arguments handled by PyTorch")
    why = _unhandled(outs, ins)
    if why is not None:
        return torch_grad(why)
    if materialize_grads and any(_is_edge(i) for i in ins):
        return torch_grad("invalid arguments")  # (PyTorch refuses edges with materialize_grads)
    if not only_inputs:
        warnings.warn(
            "only_inputs argument is deprecated and is ignored now (defaults to True). To "
            "accumulate gradient for other parts of the graph, please use "
            "torch.autograd.backward.", FutureWarning, stacklevel=3)
        args = args[:5] + (True,) + args[6:]
    # (a capture bound the grad_outputs plain_grads gave: the same ones again)
    gos = cap.grad_tensors if cap is not None else \
        None if is_grads_batched else _C.plain_grads(outs, grad_outputs)
    if gos is None:
        gos = _make_grads(outs, _to_tuple(grad_outputs, len(outs)),
                          is_grads_batched=is_grads_batched)
        if len(gos) != len(outs):  # (fewer grad_outputs than outputs: PyTorch's engine raises)
            return torch_grad("fewer grad_outputs than outputs")
    if is_grads_batched:
        sizes = {g.shape[0] if g is not None and g.dim() else None for g in gos}
        if len(sizes) != 1 or not next(iter(sizes)):
            # batches of different sizes or without a batch dim (PyTorch's vmap raises), or
            # empty ones
            return torch_grad("batched grad_outputs of no common batch size")
    if retain_graph is None:
        retain_graph = create_graph
    try:
        results = _run(outs, ins, gos, retain_graph, create_graph, allow_unused,
                       is_grads_batched, trace or engine.Trace(), cap)
    except Unplannable as e:
        return torch_grad(str(e))
    except engine.Unused:
        return torch_grad("unused input")  # PyTorch raises its own error for this
    if materialize_grads:
        results = [r if r is not None else torch.zeros_like(i, requires_grad=create_graph)
                   for r, i in zip(results, ins)]
    results = tuple(results)
    return dict(zip(keys, results)) if keys is not None else results


def explain(outputs, inputs, grad_outputs=None, create_graph=False, allow_unused=None):
    """Run ``grad`` (keeping the graph) and report what ran natively and what fell back."""
    trace = engine.Trace(runtime.Stats())
    _grad(_settled(outputs), _settled(inputs), _settled(grad_outputs), True, create_graph, True,
          allow_unused, False, False, trace)
    return Report(trace)
