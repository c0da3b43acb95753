"""One case at one size: check first, then time every engine on the same forward graph.

A failing check ends the row (a wrong answer is never timed); an engine other than fastgrad
that errors or disagrees is recorded in the row and the others still run. fastgrad is checked
twice: on its first call (the interpreter), and after warm-up calls and the loops they compiled
(jit.wait), on the path the timing runs.
"""
import time

from .. import api, jit
from .cases import _TORCH, SinExpSum
from .check import CheckFailed, _sync, check_case, compare
from .timing import Timer, time_engines

HAND_TARGET = 1.5  # fastgrad should be within 1.5x of the hand-fused loop
# ... at sizes like the (4e6 elements): at 1e3 the loop takes 3 us, less than any
# Python call, and the ratio measures the call (reported, not judged)
HAND_TARGET_MIN_NUMEL = 1_000_000


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
    stage("warm-up")
    try:
        for _ in range(case.warmup_calls(st)):
            case.run(st, api.grad)
        jit.wait()  # (loops compiled in the background: the timed calls run through them)
        case.rewind(st)
        got = tuple(case.run(st, api.grad))
        _sync(device)
        compare(got, ref, dtype, case.tol, what=f"{case.name} fastgrad (warm) vs torch")
    except CheckFailed as e:
        row["check"] = "WRONG"
        row["errors"]["fastgrad"] = str(e)
        return row
    except Exception as e:  # noqa: BLE001
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
            case.rewind(st)
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
    # torch against fastgrad (and the hand-fused loop) in rounds of their own; torch.func and
    # torch.compile beside torch in rounds after them. In the same rounds, their calls (other
    # code, other allocations) changed torch's and fastgrad's times unequally: 10-25% of the
    # ratio at 1e3-1e5 (docs/performance-history.md).
    others = {k: thunks.pop(k) for k in ("func", "compile") if k in thunks}
    faults = {}
    try:
        times, mins, rounds = time_engines(thunks, timer, opts.repeats,
                                           min_time=opts.min_time, budget=opts.budget,
                                           faults=faults)
        if others:
            f2 = {}
            t2, m2, _ = time_engines(dict(torch=thunks["torch"], **others), timer, opts.repeats,
                                     min_time=opts.min_time, budget=opts.budget, faults=f2)
            f2.pop("torch", None)
            faults.update(f2)
            row["torch_beside_others_s"] = t2.pop("torch")
            m2.pop("torch")
            times.update(t2)
            mins.update(m2)
    except Exception as e:  # noqa: BLE001 (e.g. out of memory at the largest size)
        row["check"] = "ERROR"
        row["errors"]["timing"] = _short_error(e, 300)
        return row
    row["rounds"] = rounds
    row["times_s"] = times
    if faults:
        row["page_faults"] = faults
    row["min_times_s"] = mins
    tt, tf = times["torch"], times["fastgrad"]
    row["speedup"] = tt / tf
    row["floor_time_s"] = row["floor_bytes"] / bandwidth
    row["floor_fraction"] = row["floor_time_s"] / tf
    if "hand" in times:
        row["fastgrad_over_hand"] = tf / times["hand"]
        row["hand_target_met"] = (row["fastgrad_over_hand"] <= HAND_TARGET
                                  if row["numel"] >= HAND_TARGET_MIN_NUMEL else None)
    return row
