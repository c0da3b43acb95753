"""Graphs whose signature changes from call to call: when planning anew costs more than it saves.

Everything fastgrad derives is cached by the graph's exact signature (graph_cache): its nodes,
and the shapes, strides and saved values they hold. A loop that builds the same nodes over new
shapes each call (collocation points resampled in a varying number, a neighbour list, molecules
of different sizes) misses every time, and each miss walks, lowers, derives and plans the graph
anew and runs the plan in the interpreter: on this project's development VM 1.8 ms for the
second-order pipeline of ``tanh(x)**3`` and 4.9 ms for a PINN step on a 2-32-32-1 MLP, where
PyTorch's engine took 0.1 and 0.25-0.5 ms (docs/performance-history-nov27.md, "Shapes that
change every call").

So the engine keeps, per *structure* (the classes of the walk's nodes in order, the numbers of
outputs and inputs, create_graph), whether its recent calls found their signature cached. When
``MISSES`` of the last ``WINDOW`` calls of a structure did not, the structure churns, and a call
with a signature never seen is handed to PyTorch's ``torch.autograd.grad`` whole, as fastgrad
hands it any call it does not plan (results and errors are then PyTorch's; ``explain`` names
the reason), if it is small: a call that binds a tensor of ``ROUTE_NUMEL[device type]``
elements or more is planned, its fused passes repaying the planning. A signature that comes
back is planned on its second sight, so shapes that cycle through a few values, or settle, end
up cached; hits then clear the record. Between probes a churning structure's calls go to
PyTorch unsigned, so a signature's second sight would wait for a probe to land on it: the record
also keeps the shapes of what each call was given (its leaf inputs and grad_outputs, known
before signing), and a call given shapes seen before is signed, and planned if its signature
was seen or it is the shapes' second sight (``Record.shapes``). docs/architecture.md ("Graphs
whose signature changes every call") has the rest: calls routed without being signed, and the
loops of plans made while a structure churns.
"""
import os
import threading

from .plan import Unplannable

# misses among a structure's last WINDOW signed calls from which it churns; 0 turns routing off
MISSES = int(os.environ.get("FASTGRAD_CHURN_MISSES", "4"))
WINDOW = 8
# A churning structure whose signed calls keep bringing new signatures signs one call in up to
# PROBE (k after k such calls in a row; every call after a hit or a signature seen before); the
# others go to PyTorch unsigned: signing a graph cost 20-60 us, a third of PyTorch's call on
# small graphs.
PROBE = 8
# Calls whose largest bound tensor has fewer elements are routed (per device type). CPU: the
# break-even measured on the development VM lay between 5e5 elements (an elementwise chain's
# second order) and 3e6 (a PINN step's [N, 32] activations); see
# docs/performance-history-nov27.md. CUDA: an estimate (not measured): below it PyTorch's
# kernels take less time than planning.
ROUTE_NUMEL = {"cpu": 1 << 21, "cuda": 1 << 26}
REASON = ("its graph's shapes or saved values change from call to call, and planning a graph "
          "this small anew costs more than PyTorch's engine (fastgrad.churn)")
# signatures (their hashes) a churning structure remembers having routed, for their second
# sight: more than the shapes of a cycle, or a long cycle would never be seen twice
_SEEN = 4096
# given shapes a churning structure remembers (Record.shapes); past them it finds recurring
# signatures through its probes only. Each remembered shape may cost a plan, and the plan cache
# holds 512 entries for every graph (graph_cache._MAX_ENTRIES).
SHAPES = 64
_UNSIGNED = "unsigned"  # Record.shapes: a call given these shapes went to PyTorch unsigned
_VARIES = "varies"  # calls given these shapes brought different signatures: they tell nothing
_MAX_RECORDS = 1024
_MASK = (1 << WINDOW) - 1
_RECORDS = {}
_LOCK = threading.Lock()
# Records whose next calls go unsigned (wait > 0): while there are none, a call need not look
# its structure up before it is signed (engine._capture), which a hit would pay on every call.
_WAITING = [0]
# calls in a row that found no waiting record (find), and how many end every wait
_IDLE = [0]
IDLE = 64


class Record:
    """One structure's recent signed calls: ``recent``, a bit per call (1: its signature was
    not cached), newest lowest; ``seen``, the signatures routed once (insertion ordered);
    ``fresh``, the signed calls in a row routed with a signature never seen; ``wait``, the
    calls left to route unsigned before the next signed one; ``scale``, the largest ratio seen
    of a signed call's largest bound tensor to its largest input or grad_output (a PINN binds
    [N, 32] activations for [N, 2] points); ``shapes``, for the shapes and dtypes of what calls
    routed while the structure churns were given (_shape_key), what followed: _UNSIGNED, the
    hash of the signature they brought when signed, or _VARIES.

    Why ``shapes``: between probes, calls go unsigned, so a signature that recurs (points
    resampled in one of a few dozen counts) was found only when two probes met it, after many
    cycles of the counts. Given the same shapes, a graph of one structure usually has the same
    signature, so such a call is signed: it plans at its second sight. Where it does not
    (a neighbour list that changes under fixed positions) the shapes get _VARIES at the first
    signature that differs, and their calls follow the probes again."""
    __slots__ = ("recent", "seen", "fresh", "wait", "scale", "shapes")

    def __init__(self):
        self.recent, self.seen, self.fresh, self.wait, self.scale = 0, {}, 0, 0, 1.0
        self.shapes = {}

    def hit(self):
        self.recent = (self.recent << 1) & _MASK
        self.fresh = 0
        if self.wait:
            self._stop_waiting()

    def churns(self):
        return MISSES > 0 and bin(self.recent).count("1") >= MISSES

    def skip(self, given):
        """Whether this call goes to PyTorch unsigned (a churning structure between probes),
        ``given`` its inputs and grad_outputs (known before it is signed): one that, times
        ``scale`` (how much larger than these the structure's signed calls bound), reaches
        ROUTE_NUMEL makes it signed (and planned, if large, by ``route``)."""
        if self.wait > 0 and self.churns() and not _large(given, self.scale):
            shape = _shape_key(given)
            if shape:
                s = self.shapes.get(shape)
                if s is None:
                    if len(self.shapes) < SHAPES:
                        self.shapes[shape] = _UNSIGNED
                elif s != _VARIES:
                    return False  # seen given these shapes: signed (and planned by route)
            self._wait(self.wait - 1)  # (the last one tells _WAITING it stopped)
            return True
        return False

    def _wait(self, n):
        with _LOCK:
            if n and not self.wait:
                _WAITING[0] += 1
            elif self.wait and not n:
                _WAITING[0] -= 1
            self.wait = n

    def _stop_waiting(self):
        self._wait(0)


def _large(tensors, scale=1.0):
    """Whether one of ``tensors``, its size times ``scale``, reaches ROUTE_NUMEL."""
    for t in tensors:
        if t is not None and t.numel() * scale >= ROUTE_NUMEL.get(t.device.type, 0):
            return True
    return False


def _shape_key(given):
    """The shapes and dtypes of ``given`` (a call's leaf inputs and grad_outputs), or None
    when it holds no tensor."""
    key = tuple((t.shape, t.dtype) if t is not None else None for t in given)
    return key if any(key) else None


def _most(tensors):
    return max((t.numel() for t in tensors if t is not None), default=0)


def find(structure, nout, nin, create_graph):
    """The Record of a structure (``structure``: _C.Graph.structure, the classes of the walk's
    nodes), or None; asked while some record waits (_WAITING).

    A record waits until its own calls have counted its wait down, so one whose structure is
    no longer called (the graph PyTorch built while a first-order call was routed, once that
    call is planned) would make every call look its structure up here for the rest of the
    process: after IDLE calls in a row that find no waiting record, every wait ends (the
    next call of a structure still churning is signed, as a probe)."""
    r = _RECORDS.get((structure, nout, nin, create_graph))
    if r is not None and r.wait:
        _IDLE[0] = 0
    else:
        _IDLE[0] += 1
        if _IDLE[0] > IDLE:
            _stop_all_waits()
    return r


def record(structure, nout, nin, create_graph):
    """The Record of a structure, made if there is none."""
    k = (structure, nout, nin, create_graph)
    r = _RECORDS.get(k)
    if r is None:
        if len(_RECORDS) >= _MAX_RECORDS:
            clear()
        r = _RECORDS[k] = Record()
    return r


def route(rec, key, tensors, given=()):
    """Whether a signed call whose signature ``key`` is not cached goes to PyTorch (False:
    plan it); counts the miss in ``rec``. ``tensors``: what the call bound; ``given``: its
    inputs and grad_outputs (Record.scale)."""
    most = _most(given)
    if most:
        rec.scale = max(rec.scale, _most(tensors) / most)
    churning = rec.churns()
    rec.recent = ((rec.recent << 1) | 1) & _MASK
    if not churning:
        return False
    h = hash(key)  # (a collision only plans a call)
    shape = _shape_key(given)
    with _LOCK:  # (threads share records)
        before = rec.shapes.get(shape) if shape else _VARIES
        if before is None:
            if len(rec.shapes) < SHAPES:
                rec.shapes[shape] = h
        elif before != _VARIES:
            rec.shapes[shape] = h if before in (_UNSIGNED, h) else _VARIES
        # second sight: of the signature, or of these shapes whose calls brought it (or went
        # unsigned; h again after that: its entry was evicted): it recurs, plan it (and sign
        # the next call)
        if rec.seen.pop(h, False) or before == _UNSIGNED or before == h:
            rec.fresh = 0
            return False
        if _large(tensors):
            return False
        if len(rec.seen) >= _SEEN:
            del rec.seen[next(iter(rec.seen))]
        rec.seen[h] = True
    rec.fresh += 1
    rec._wait(min(rec.fresh, PROBE) - 1)
    return True


class Routed(Unplannable):
    """A call handed to PyTorch because of ``route`` (engine._route raises it)."""


def _stop_all_waits():
    with _LOCK:
        for r in _RECORDS.values():
            r.wait = 0
        _WAITING[0] = 0
        _IDLE[0] = 0


def clear():
    """Forget every structure's record (a record a cache entry still holds stops waiting, so
    that its next hit does not count it out of _WAITING again)."""
    _stop_all_waits()
    with _LOCK:
        _RECORDS.clear()
