"""Compiled loops for hot regions (a small JIT).

The block interpreter (csrc/vm_cpu.cpp) runs one loop per instruction over a block. Once a plan
has run ``AFTER`` times, each of its regions that csrc/program.h ``kernel_fits`` accepts (loads
contiguous, single values, or one value per row / one row for all rows; stores contiguous, or
one sum per row, or column sums; every record in the compute dtype) is compiled instead into one
C++ loop, over elements or over rows then columns, that keeps each element's values in
registers; a row group whose members all have loops over its rows runs through them
(run_group_loops). The loop
is generated from the region's own register program, calls the interpreter's op math
(``op_math.h``, installed with the package) and is built by the compiler and machine flags the
extension was built with, plus ``-ffp-contract=off`` so that no multiply-add is fused across
instructions (the interpreter cannot fuse them either): results are the interpreter's, up to
the last bits of a transcendental where one path takes a vector variant and the other the
scalar one (and of float exp, which 512-bit loops built by GCC take from jit_exp.h), and of
a row or column sum (added in another order, in double).

Libraries are cached on disk by a hash of their source, the headers, the compile command and
the CPU (``FASTGRAD_CACHE_DIR``, default ``~/.cache/fastgrad/jit``); a process that compiles
trims the cache to ``FASTGRAD_CACHE_MB`` (default 256), least recently used entries first.
Without a working compiler the interpreter keeps running the region. ``FASTGRAD_JIT=0`` turns compiling off;
``FASTGRAD_JIT_AFTER`` sets after how many runs of a plan its regions are compiled.

Loops found in the disk cache are loaded by the call that reaches ``AFTER``; the others are
compiled in the background (``BACKGROUND``; ``FASTGRAD_JIT_BACKGROUND=0`` compiles them in that
call), while the interpreter keeps running their regions: a new graph's first compile took 0.5-1 s
on a small graph and tens of seconds on deep graphs of many distinct loops, all of it inside
one call. One worker thread takes the plans' batches in turn and ends when none is left; at
interpreter exit it finishes the compile it is in and drops the rest. ``wait()`` returns once
the compiles queued so far are done (the benchmark waits before it times;
``status()["pending"]`` counts the batches).
"""
import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
import threading
import time

import torch

from . import _C
from .jit_cache import NOSTREAM, SCALAR, _cache_dir, _cache_used, _cache_written
from .loop_source import LOOP, STREAM_LOOP, source
from .plan_steps import Region, RowGroup

AFTER = int(os.environ.get("FASTGRAD_JIT_AFTER", "3"))
BACKGROUND = os.environ.get("FASTGRAD_JIT_BACKGROUND", "1") != "0"
_STATE = {"enabled": os.environ.get("FASTGRAD_JIT", "1") != "0", "reason": None,
          "compiled": 0, "loaded": 0, "seconds": 0.0, "failed": 0, "last_failure": None,
          "jit_exp_off": None}
# Sources whose compile may fail (each tried twice) before the JIT turns itself off: one
# failing source keeps its region with the interpreter and the others compiled (a CI run once
# lost every loop to one compile that failed for an unknown reason); several point to the
# compiler or the machine.
_MAX_FAILED = 3
# The define that gives 512-bit loops csrc/jit_exp.h's float exp (_command; off for the process
# where the compiler refuses it: _without_jit_exp)
_JIT_EXP = "-DFG_JIT_EXP512"
_COUNT = threading.Lock()  # compile_all's threads update _STATE (counts, the key's facts)
_LIBS = {}  # source hash -> _load's tuple, or None: it failed to compile (_load_or_fail)
# How each compiler reports a vectorised loop (at its file:line on stderr); with another
# compiler the check is skipped and the loop used.
_VEC_REPORT = {"GNU": ["-fopt-info-vec-optimized"], "Clang": ["-Rpass=loop-vectorize"],
               "AppleClang": ["-Rpass=loop-vectorize"]}


def status():
    """Whether compiling is on, why not if it is off, how many loops were compiled (and loaded
    from the disk cache) in this process, the seconds spent compiling (summed over compiles
    that ran side by side), and how many plans' compiles are still queued or running in the
    background ("pending"); "jit_exp_off" says why loops take libmvec's float exp rather than
    csrc/jit_exp.h's, where it applies (None: it is on)."""
    return {k: v for k, v in dict(_STATE, compiler=_C.build_info()["cxx"],
                                  pending=_pending()).items()
            if k not in ("headers", "cpu")}


def enable(on=True):
    """Turn compiling on or off for this process (programs already compiled stay compiled)."""
    _STATE["enabled"] = bool(on)
    if on:
        _STATE["reason"] = None
        _STATE["failed"] = 0  # (sources that failed stay uncompiled: _LIBS keeps them)


def _command(src, out):
    info = _C.build_info()
    inc = _include_dir()
    # -fno-trapping-math lets GCC if-convert the selects of a fused loop (it would otherwise
    # sink a branch's exp/div under a jump and give up vectorising); it changes no value, only
    # whether floating-point exception flags may be raised speculatively.
    cmd = [info["cxx"], "-std=c++17", "-O3", "-fPIC", "-shared", "-fno-math-errno",
           "-D__FAST_MATH__", "-ffp-contract=off", "-fno-trapping-math", "-I", inc]
    cmd += _VEC_REPORT.get(info["cxx_id"], [])
    if info["native"]:
        cmd.append("-march=native")
        if _torch_uses_avx512() and info["cxx_id"] in _VEC_REPORT:
            # GCC and Clang keep to 256-bit vectors on AVX-512 CPUs unless told; PyTorch's own
            # kernels run 512-bit ones there, and so do the loops (on a Xeon: logsumexp's VJP
            # at 4e6 1.5x faster, softplus_sigmoid_2nd 1.2x;
            # docs/performance-history-nov27.md, "Vector width").
            # With 512-bit loops, float exp is csrc/jit_exp.h's rather than libmvec's (its
            # vector variants compute 16 lanes; op_math.h includes it under GCC only).
            cmd.append("-mprefer-vector-width=512")
            if _STATE["jit_exp_off"] is None:
                cmd.append(_JIT_EXP)
    return cmd + ["-o", out, src, "-lm"]


def _torch_uses_avx512():
    """Whether PyTorch's CPU kernels dispatch to AVX-512 on this machine."""
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        return cap is not None and cap().startswith("AVX512")
    except Exception:  # (an unexpected build: keep the compiler's default)
        return False


def _include_dir():
    """Where the op math headers are installed (fastgrad/include, beside the extension)."""
    return os.path.join(os.path.dirname(_C.__file__), "include")


def header_files(names):
    """(name, bytes) of each of the installed op math headers ``names`` (fastgrad/include)."""
    out = []
    for h in names:
        with open(os.path.join(_include_dir(), h), "rb") as f:
            out.append((h, f.read()))
    return out


def _cpu_identity():
    """What -march=native compiles for, as part of the cache key (a home directory shared by
    machines with other CPUs must not hand one a library built for another's instructions)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def kernel_address(src, vector_only=True):
    """Compile (or load from the disk cache) ``src``; (the library, the address of its
    fg_kernel, that of its fg_kernel_stream or 0 when it has none or it was not vectorised), or
    None: with ``vector_only``, when the compiler did not vectorise the loop (the interpreter,
    whose per-instruction loops it does vectorise, is then faster), and when it could not be
    compiled: a compile that failed twice (status()'s "failed", "last_failure"; after
    _MAX_FAILED such sources the JIT is off for the process) or no compiler or headers to
    compile with (the JIT is then off at once; status() says why)."""
    try:
        key = _key(src)
        if key not in _LIBS:
            _LIBS[key] = _load_or_fail(key, src)
    except Exception as e:  # noqa: BLE001 (a loop is an optimisation: never fail the call)
        _STATE["enabled"] = False
        _STATE["reason"] = _failure(e)
        return None
    if _LIBS[key] is None:  # (failed to compile: its region stays with the interpreter)
        return None
    lib, addr, vectorised, stream = _LIBS[key]
    return (lib, addr, stream or 0) if vectorised or not vector_only else None


def _failure(e):
    """Why compiling failed: the exception, with what the compiler printed."""
    return f"{type(e).__name__}: {e}" + _compiler_errors(getattr(e, "stderr", None))


def _load_or_fail(key, src):
    """_load, tried once more when the compiler ran and failed (killed for memory, say); None
    when it failed twice, counted in _STATE (the JIT off after _MAX_FAILED such sources).
    Anything else (no compiler, no headers) propagates."""
    for _ in range(2):
        try:
            return _load(key, src)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            err = e
        if _BG["stop"]:  # (interpreter exit: not a second compile)
            break
    got = _without_jit_exp(src, err)
    if got is not None:
        return got
    with _COUNT:
        _STATE["failed"] += 1
        _STATE["last_failure"] = _failure(err)
        if _STATE["failed"] >= _MAX_FAILED:
            _STATE["enabled"] = False
            _STATE["reason"] = f"{_STATE['failed']} loops failed to compile; the last: " + \
                _STATE["last_failure"]
    return None


def _without_jit_exp(src, err):
    """After ``src`` failed twice with jit_exp.h's exp (``_JIT_EXP`` in the command): one
    compile without it. Where that one works, the exp is what the compiler refused (jit_exp.h
    defines functions under the vector-ABI names of expf, which only GCC 12 was seen to
    accept): it stays off for the process (``status()["jit_exp_off"]`` says why), loops take
    libmvec's exp and the JIT stays on. _load's tuple, or None (it fails without the exp too,
    or the command had none)."""
    if _BG["stop"] or _JIT_EXP not in _command("S", "O"):
        return None
    reason = "loops failed to compile with csrc/jit_exp.h's exp" + _failure(err)
    with _COUNT:  # (set first: the compile below and those of other threads go without it)
        _STATE["jit_exp_off"] = reason
    key = _key(src)
    try:
        got = _LIBS[key] = _load(key, src)
        return got
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        with _COUNT:  # (not the exp's doing: the source fails either way)
            if _STATE["jit_exp_off"] is reason:
                _STATE["jit_exp_off"] = None
        return None


def _compiler_errors(err, limit=1000):
    """What a failed compile printed, without the vectorisation report that the command asks
    for (_VEC_REPORT: a line per loop, which would otherwise fill the reason before the
    error): its last ``limit`` characters."""
    if not err:
        return ""
    report = ("optimized:", "missed:", "remark:")
    lines = [ln for ln in err.decode(errors="replace").splitlines()
             if not any(r in ln for r in report)]
    return ": " + "\n".join(lines)[-limit:]


def _key(src):
    """The cache key of ``src``: it, the op math headers, the CPU and the compile command."""
    if "headers" not in _STATE or "cpu" not in _STATE:  # a rebuilt op math means new loops
        with _COUNT:  # (compile_all's threads: the first reads both, the others wait)
            if "headers" not in _STATE or "cpu" not in _STATE:
                headers = "".join(text.decode() for _, text in header_files(
                    ("op_math.h", "jit_exp.h", "float16.h", "hd.h", "dtype_convert.h",
                     "stream_store.h")))
                _STATE["cpu"] = _cpu_identity()
                _STATE["headers"] = headers
    return hashlib.sha256("\0".join([src, _STATE["headers"], _STATE["cpu"],
                                     " ".join(_command("S", "O"))]).encode()).hexdigest()[:32]


def compile_all(srcs, address=None):
    """kernel_address (or ``address``) for each of ``srcs``, the compiles running side by side
    (one compiler process per core: a plan's regions cost one compile's time per core, not one
    each); one after another where threads can no longer be started (interpreter exit). Sources
    whose loop is loaded or in the disk cache need no compiler and are resolved on the calling
    thread: starting a pool cost more than loading them (about 3 ms a plan on the 2-core VM,
    paid by each plan's run that compiles: docs/performance-history-nov27.md, "Loops already
    compiled")."""
    from concurrent.futures import ThreadPoolExecutor
    address = address or kernel_address
    srcs = list(srcs)
    try:
        todo = [src for src in srcs if not _cached(src)]
    except Exception:  # noqa: BLE001 (no headers, say: kernel_address says why)
        todo = srcs
    got = {}
    workers = min(len(todo), os.cpu_count() or 1)
    if workers > 1:
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # (subprocess waits without
                got = dict(zip(todo, pool.map(address, todo)))      # the GIL)
        except RuntimeError:  # (cannot schedule new futures after interpreter shutdown)
            got = {}
    return [got[src] if src in got else address(src) for src in srcs]


def _load(key, src):
    """(library, kernel address, whether the loop was vectorised, the address of its streaming
    variant or None), compiling into the disk cache first when it is not there (or went between
    finding and loading it: pruned by another process)."""
    d = _cache_dir()
    path = os.path.join(d, f"fg_{key}.so")
    scalar, nostream = path[:-3] + SCALAR, path[:-3] + NOSTREAM
    lib = None
    if os.path.exists(path):
        try:
            lib = ctypes.CDLL(path)
            vectorised, stream_ok = not os.path.exists(scalar), not os.path.exists(nostream)
        except OSError:
            pass
    if lib is not None:
        _cache_used(path)
        with _COUNT:
            _STATE["loaded"] += 1
    else:
        vectorised, stream_ok = _compile_into(d, path, scalar, nostream, src)
        lib = ctypes.CDLL(path)
    stream = getattr(lib, "fg_kernel_stream", None) if stream_ok else None
    return (lib, ctypes.cast(lib.fg_kernel, ctypes.c_void_p).value, vectorised,
            None if stream is None else ctypes.cast(stream, ctypes.c_void_p).value)


def _vectorised(lines, report, first):
    """Whether the loop whose line satisfies ``first`` (the first such line) was vectorised, by
    the compiler's ``report``; True when there is no such loop or no report to read."""
    loop = 1 + next((n for n, line in enumerate(lines) if first(line)), -1)
    return loop == 0 or _C.build_info()["cxx_id"] not in _VEC_REPORT or \
        f"k.cpp:{loop}:" in report


def _compile_into(d, path, scalar, nostream, src):
    """Compile ``src`` to the library ``path`` (atomically); whether its loop and whether its
    streaming variant's loop were vectorised (if not, the ``scalar`` / ``nostream`` marker is
    left beside it)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        cpp, so = os.path.join(tmp, "k.cpp"), os.path.join(tmp, "k.so")
        with open(cpp, "w") as f:
            f.write(src)
        done = subprocess.run(_command(cpp, so), check=True, capture_output=True, timeout=120)
        lines, report = src.splitlines(), done.stderr.decode(errors="replace")
        # (no loop line: only sums of loaded rows, nothing to vectorise)
        vectorised = _vectorised(lines, report, lambda line: line == LOOP or line.startswith(
            "    for (int64_t j = 0; j < "))
        stream_ok = _vectorised(lines, report, lambda line: line.lstrip().startswith(STREAM_LOOP))
        for ok, marker in ((vectorised, scalar), (stream_ok, nostream)):
            if not ok:
                open(marker, "w").close()
        os.replace(so, path)  # atomic: a concurrent process finds all or nothing
    with _COUNT:
        _STATE["compiled"] += 1
        _STATE["seconds"] += time.perf_counter() - t0
    _cache_written()
    return vectorised, stream_ok


def _jobs(region, prefer=None):
    """(packer, split, column sums, source) of each of ``region``'s CPU programs (one per
    input layout it ran with) not offered a loop yet that one fits, with split ``prefer`` where
    it fits (a row group's rows); marks them offered."""
    jobs = [_job(region, packer, prefer) for packer in list(region.packers.values())]
    return [job for job in jobs if job is not None]


def _job(region, packer, prefer=None):
    """_jobs' job of one packer (None: no Program, offered already, or no loop fits)."""
    prog = packer.program
    if prog is None or packer.jit_tried or prog.compiled:
        return None
    packer.jit_tried = True
    nd = len(region.shape)
    split = prefer if prefer is not None and prog.kernel_fits(prefer) else next(
        (k for k in range(max(nd, 1)) if prog.kernel_fits(k)), None)
    if split is None:
        return None
    kinds = prog.load_kinds(split)
    inner = math.prod(region.shape[split:]) if split else None
    modes = [mode for _, mode in region.stores]
    columns = bool(split) and prog.column_sums(split)
    return (packer, split, columns, source(region, kinds, packer.compute, inner, modes, columns,
                                           prog.load_dtypes()))


def compile_plan(plan):
    """Compile the plan's regions that can run as loops (each program offered once), side by
    side; a row group's members over its rows, so that the group runs through their loops
    (csrc/program.h, run_group_loops). Loops this process or the disk cache holds are set at
    once; the others are compiled in the background when ``BACKGROUND`` is on, and set as they
    are ready (a run reads a Program's loop atomically: csrc/program.h)."""
    _compile_jobs(plan, _plan_jobs(plan))


def _compile_jobs(plan, jobs):
    """compile_plan's work for ``jobs`` of ``plan``."""
    srcs = list(dict.fromkeys(src for *_, src in jobs))
    if BACKGROUND:
        try:
            ready = [src for src in srcs if _cached(src)]
        except Exception:  # noqa: BLE001 (no headers, say: kernel_address turns the JIT off)
            ready = srcs
        if len(ready) < len(srcs):
            ready_set = set(ready)
            _set_kernels([j for j in jobs if j[-1] in ready_set], ready)
            _submit(plan, [j for j in jobs if j[-1] not in ready_set],
                    [src for src in srcs if src not in ready_set])
            return
    _set_kernels(jobs, srcs)


def _plan_jobs(plan):
    """_jobs of every region of ``plan`` (a row group's members over its rows)."""
    jobs = []
    for step in plan.steps:
        if isinstance(step, Region):
            jobs += _jobs(step)
        elif isinstance(step, RowGroup):
            for r in step.regions:
                jobs += _jobs(r, prefer=len(step.dims))
    return jobs


def adopt(region, packer, prefer=None):
    """Before the first run of a new Program (``packer.program``) of a region planned for a
    graph whose shapes keep changing (``region.eager``, set by engine.run from churn.py;
    ``prefer``: its row group's rows): set the loop this process has loaded for its source, or
    compile it once a second such Program has met the source. Such a graph is a new plan for
    each shape, which never runs AFTER times, but a loop's source holds no row count, so one
    loop serves every number of rows (a row loop's column count and the constants are in the
    source: a source met once is not compiled, so a row length that changes every call
    compiles nothing). Other Programs wait for compile_plan at AFTER."""
    if not region.eager or not _STATE["enabled"] or packer.jit_tried:
        return
    try:
        job = _job(region, packer, prefer)
        if job is None:
            return
        key = _key(job[-1])
    except Exception:  # noqa: BLE001 (no headers, say: compile_plan reports it at AFTER)
        packer.jit_tried = False
        return
    if key in _LIBS:
        _set_kernels([job], [job[-1]])
        return
    with _COUNT:
        met = _EAGER_MET.pop(key, False)
        if not met:
            if len(_EAGER_MET) >= _MAX_EAGER_MET:
                _EAGER_MET.clear()
            _EAGER_MET[key] = True
    if met:
        _compile_jobs(_NO_PLAN, [job])
    else:
        packer.jit_tried = False


class _NoPlan:
    """What a background compile of adopt's is for: no plan to make due again."""
    jit_pending = False

    def __setattr__(self, name, value):
        pass


_NO_PLAN = _NoPlan()


def _set_kernels(jobs, srcs, plan=None):
    """Compile (or load) ``srcs`` and set each job's Program to its loop. In the background
    (for ``plan``), each compile first checks that compiling is still on (enable(False), too
    many failures) and that the interpreter is not exiting; no loop is set once compiling is
    off, and the jobs it skipped are offered again by the plan's next run (once it is on)."""
    skipped = set()

    def address(src):
        if plan is not None and (_BG["stop"] or not _STATE["enabled"]):
            skipped.add(src)
            return None
        return kernel_address(src)
    got = dict(zip(srcs, compile_all(srcs, address)))
    off = plan is not None and not _STATE["enabled"]
    for packer, split, columns, src in jobs:
        if got[src] is not None and not off:
            lib, addr, stream = got[src]
            packer.program.set_kernel(addr, lib, split, columns, stream)
        elif off or src in skipped:
            packer.jit_tried = False
            plan.jit_pending = True


def _cached(src):
    """Whether ``src``'s loop is loaded in this process or compiled in the disk cache."""
    key = _key(src)
    return key in _LIBS or os.path.exists(os.path.join(_cache_dir(), f"fg_{key}.so"))


# sources of eager regions' Programs met once (adopt compiles one met again)
_EAGER_MET = {}
_MAX_EAGER_MET = 1 << 14
# The background compiles: batches (a plan, its jobs and sources) queued for one worker thread,
# which runs while there are batches and then ends (a process that forks later has no thread of
# ours); "stop" is set at interpreter exit (_at_exit), after which queued batches are dropped.
# "submitted" and "finished" count batches (a dropped one is finished): wait() waits for those
# submitted before it was called, not for a queue that other threads keep filling.
_BG = {"queue": [], "worker": None, "stop": False, "hooked": False, "current": None,
       "submitted": 0, "finished": 0}
_IDLE = threading.Condition(_COUNT)  # notified when a batch is finished (wait)


def _pending():
    return _BG["submitted"] - _BG["finished"]


def _submit(plan, jobs, srcs):
    with _COUNT:
        if _BG["stop"]:
            return  # (interpreter exit: the interpreter keeps these regions)
        for packer, *_ in jobs:
            packer.compiling = True  # (explain: "loop compiling")
        _BG["queue"].append((plan, jobs, srcs))
        _BG["submitted"] += 1
        if _BG["worker"] is not None:
            return
        worker = threading.Thread(target=_work, name="fastgrad-jit")
        try:
            if not _BG["hooked"]:
                # runs before Python joins its threads at exit, so that the worker finishes
                # the compile it is in and takes no other; and before concurrent.futures'
                # own hook (registered on its import: these run last registered first), which
                # would otherwise let compile_all's pool run every source it was given
                __import__("concurrent.futures.thread")
                threading._register_atexit(_at_exit)
                _BG["hooked"] = True
            worker.start()
        except RuntimeError:  # (interpreter exit began: no new thread, no compile)
            _drop_queue()
            return
        _BG["worker"] = worker


def _work():
    me = threading.current_thread()
    try:
        while True:
            with _COUNT:
                if not _BG["queue"] or _BG["stop"]:
                    return
                batch = _BG["current"] = _BG["queue"].pop(0)
            plan, jobs, srcs = batch
            try:
                _set_kernels(jobs, srcs, plan)
            except BaseException as e:  # noqa: BLE001 (a loop is an optimisation: the
                with _COUNT:             # interpreter stays; a test's pytest.fail too)
                    _STATE["enabled"] = False
                    _STATE["reason"] = _STATE["last_failure"] = \
                        "background compile: " + _failure(e)
            finally:
                with _COUNT:
                    _BG["current"] = None
                    _done(jobs)
    finally:
        with _COUNT:
            if _BG["worker"] is me:
                _drop_queue()
                _BG["worker"] = None


def _done(jobs):
    """A batch is finished, its loops set or not (under _COUNT)."""
    for packer, *_ in jobs:
        packer.compiling = False
    _BG["finished"] += 1
    _IDLE.notify_all()


def _drop_queue():
    """Forget the queued batches (under _COUNT): their regions stay with the interpreter."""
    while _BG["queue"]:
        _done(_BG["queue"].pop()[1])


def _at_exit():
    with _COUNT:
        _BG["stop"] = True
        _drop_queue()


def wait(timeout=None):
    """Wait until the background compiles queued before this call are done (their loops set);
    whether they are, within ``timeout`` seconds (None: no limit)."""
    with _COUNT:
        target = _BG["submitted"]
        return _IDLE.wait_for(lambda: _BG["finished"] >= target, timeout=timeout)


def _after_fork():
    # A child has no worker thread: its compiles in flight never finish there (their regions
    # keep the interpreter); it starts its own worker when it next compiles.
    global _COUNT, _IDLE
    _COUNT = threading.Lock()  # (held, maybe, by a thread the child does not have)
    _IDLE = threading.Condition(_COUNT)
    for _, jobs, _ in _BG["queue"] + ([_BG["current"]] if _BG["current"] else []):
        for packer, *_ in jobs:
            packer.compiling = False
    _BG["queue"], _BG["worker"], _BG["current"] = [], None, None
    _BG["finished"] = _BG["submitted"]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
