"""Compiled CUDA kernels for regions (NVRTC).

The CUDA evaluator (csrc/vm_cuda.cu) interprets a region's register program per element: every
instruction is decoded, every load walks the region's dims, and the registers live in local
memory. On an H200 that ran at 2-9% of the memory-bandwidth floor, up to 15x slower than
PyTorch. So, as fastgrad.jit does for the CPU, a region whose packer has run ``jit.AFTER`` times
is compiled, when a kernel fits it (fastgrad.cuda_codegen: elementwise regions, and reductions
over trailing dims with enough rows), into one CUDA kernel generated from its own register
program, built at run time by NVRTC, the CUDA runtime compiler that CUDA builds of PyTorch ship.
It is built with ``--fmad=false``, so that no multiply-add is fused across instructions (the
interpreter cannot fuse them either): results are the interpreter's, up to the order of a
reduction's additions.

Kernels are cached on disk as CUBIN, keyed by their source, the headers, the NVRTC version and
the GPU architecture (``FASTGRAD_CACHE_DIR``, default ``~/.cache/fastgrad/jit``, trimmed as
jit_cache.prune_cache says), loaded through the CUDA driver API (ctypes: no link to libcuda or
libnvrtc) and launched from C++ (csrc/kernel_launch.h) through the driver calls ctypes found.
A source NVRTC rejects leaves its region with the interpreter and is counted (``status()``'s
"failed", "last_failure"); after jit._MAX_FAILED such sources, or at once without NVRTC or when
the driver fails, compiling is off for the process, the interpreter runs every region and
``status()`` says why. ``FASTGRAD_JIT=0`` turns this off with the CPU loops.
"""
import ctypes
import glob
import hashlib
import os
import sys
import threading
import time

import torch

from . import _C, cuda_codegen as codegen, jit, jit_cache
from .runtime_table import OPCODES

_STATE = {"enabled": os.environ.get("FASTGRAD_JIT", "1") != "0", "reason": None,
          "compiled": 0, "loaded": 0, "seconds": 0.0, "failed": 0, "last_failure": None,
          "nvrtc": None}
_LOCK = threading.Lock()
_HEADERS = ("op_math.h", "float16.h", "hd.h", "dtype_convert.h")
_LIBS = {}  # "nvrtc" / "cuda" -> ctypes library
_CUBINS = {}  # cache key -> CUBIN bytes
_FUNCS = {}  # (cache key, device index) -> CUfunction handle (an int)
_REJECTED = {}  # cache key -> the CompileError NVRTC gave it (not compiled again)


class CompileError(OSError):
    """NVRTC rejected one kernel's source (its log is in the message)."""


def status():
    """Whether compiling CUDA kernels is on, why not if it is off, how many were compiled (and
    loaded from the disk cache) in this process, the seconds spent compiling, and which NVRTC."""
    return {k: v for k, v in _STATE.items() if k not in ("headers", "contexts")}


def enable(on=True):
    """Turn compiling CUDA kernels on or off for this process (kernels already in use stay)."""
    _STATE["enabled"] = bool(on)
    if on:
        _STATE["reason"] = None
        _STATE["failed"] = 0  # (rejected sources stay uncompiled: _REJECTED keeps them)


def _off(why):
    _STATE["enabled"] = False
    _STATE["reason"] = why


# ---- NVRTC and the driver, through ctypes ---------------------------------------------------

def _candidates():
    """Where libnvrtc may be: FASTGRAD_NVRTC, the NVIDIA wheels beside torch (the version
    torch was built with first), then a CUDA toolkit."""
    if os.environ.get("FASTGRAD_NVRTC"):
        yield os.environ["FASTGRAD_NVRTC"]
    major = (torch.version.cuda or "").split(".")[0]
    found = []
    for p in sys.path:
        found += glob.glob(os.path.join(p, "nvidia", "*", "lib", "libnvrtc.so*"))
        found += glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    found += glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))
    found = [f for f in found if "builtins" not in f and ".alt." not in f]
    found.sort(key=lambda f: (f".so.{major}" not in f, f))
    yield from dict.fromkeys(found)
    yield f"libnvrtc.so.{major}" if major else "libnvrtc.so"
    yield "libnvrtc.so"


def _nvrtc():
    lib = _LIBS.get("nvrtc")
    if lib is None:
        errors = []
        for path in _candidates():
            try:
                # NVRTC opens its builtins library by name: load the one beside it first.
                for b in sorted(glob.glob(os.path.join(os.path.dirname(path),
                                                       "libnvrtc-builtins.so*"))):
                    if ".alt." not in b:
                        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                lib = ctypes.CDLL(path)
                lib.nvrtcVersion  # noqa: B018 (a library that is not NVRTC raises here)
                break
            except (OSError, AttributeError) as e:
                errors.append(str(e))
                lib = None
        if lib is None:
            raise OSError("NVRTC (libnvrtc) not found; tried: " + "; ".join(errors[-3:]))
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _STATE["nvrtc"] = f"{major.value}.{minor.value} ({getattr(lib, '_name', '?')})"
        _LIBS["nvrtc"] = lib
    return lib


def _cuda():
    lib = _LIBS.get("cuda")
    if lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        _check_cu(lib.cuInit(0), "cuInit", lib)
        # launches are made from C++ (csrc/kernel_launch.h), through these driver calls
        _C.cuda_bind_driver(*[ctypes.cast(f, ctypes.c_void_p).value for f in (
            lib.cuLaunchKernel, lib.cuCtxGetCurrent, lib.cuCtxPushCurrent_v2,
            lib.cuCtxPopCurrent_v2)])
        _LIBS["cuda"] = lib
    return lib


def _check_cu(r, what, lib=None):
    if r != 0:
        msg = ctypes.c_char_p()
        (lib or _cuda()).cuGetErrorString(r, ctypes.byref(msg))
        raise OSError(f"{what}: CUDA error {r} ({(msg.value or b'?').decode()})")


def _headers():
    if "headers" not in _STATE:
        _STATE["headers"] = jit.header_files(_HEADERS)
    return _STATE["headers"]


def _options(arch):
    return [f"--gpu-architecture=sm_{arch}", "--std=c++17", "--fmad=false"]


def compile_cubin(src, arch):
    """(cache key, CUBIN) of ``src`` for ``sm_<arch>`` (from the disk cache when there); raises
    CompileError with NVRTC's log when it does not compile (once: the same source then raises
    that error again without compiling)."""
    lib = _nvrtc()
    headers = _headers()
    key = hashlib.sha256("\0".join(
        [src, _STATE["nvrtc"], " ".join(_options(arch))] +
        [h.decode(errors="replace") for _, h in headers]).encode()).hexdigest()[:32]
    cubin = _CUBINS.get(key)
    if cubin is not None:
        return key, cubin
    if key in _REJECTED:
        raise _REJECTED[key]
    path = os.path.join(jit_cache._cache_dir(), f"fg_cuda_{key}.cubin")
    try:
        with open(path, "rb") as f:
            cubin = f.read()
    except OSError:  # not cached (or pruned by another process meanwhile)
        cubin = None
    if cubin:
        jit_cache._cache_used(path)
        with _LOCK:
            _STATE["loaded"] += 1
    else:
        t0 = time.perf_counter()
        prog = ctypes.c_void_p()
        names = (ctypes.c_char_p * len(headers))(*[n.encode() for n, _ in headers])
        texts = (ctypes.c_char_p * len(headers))(*[h for _, h in headers])
        r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"fg_kernel.cu",
                                   len(headers), texts, names)
        if r != 0:
            raise OSError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(r).decode()}")
        try:
            opts = [o.encode() for o in _options(arch)]
            r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            if r != 0:
                size = ctypes.c_size_t()
                lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, log)
                e = _REJECTED[key] = CompileError(
                    f"NVRTC: {lib.nvrtcGetErrorString(r).decode()}: "
                    f"{log.value.decode(errors='replace')[:2000]}")
                raise e
            size = ctypes.c_size_t()
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, buf)
            cubin = buf.raw
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)  # atomic: a concurrent process finds all or nothing
        with _LOCK:
            _STATE["compiled"] += 1
            _STATE["seconds"] += time.perf_counter() - t0
        jit_cache._cache_written()
    _CUBINS[key] = cubin
    return key, cubin


def _function(key, cubin, device):
    """The kernel of ``cubin`` in ``device``'s primary context (the one PyTorch uses)."""
    f = _FUNCS.get((key, device))
    if f is None:
        cu = _cuda()
        ctx = _primary(device)
        _check_cu(cu.cuCtxPushCurrent_v2(ctypes.c_void_p(ctx)), "cuCtxPushCurrent")
        try:
            mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
            _check_cu(cu.cuModuleLoadData(ctypes.byref(mod), cubin), "cuModuleLoadData")
            _check_cu(cu.cuModuleGetFunction(ctypes.byref(fn), mod, b"fg_kernel"),
                      "cuModuleGetFunction")
        finally:
            cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        f = _FUNCS[(key, device)] = fn.value
    return f


def _primary(device):
    ctx = _STATE.setdefault("contexts", {}).get(device)
    if ctx is None:
        cu = _cuda()
        dev, c = ctypes.c_int(), ctypes.c_void_p()
        _check_cu(cu.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        _check_cu(cu.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev), "cuDevicePrimaryCtxRetain")
        ctx = _STATE["contexts"][device] = c.value
    return ctx


class Kernel:
    """A compiled kernel for one layout of its inputs: a region's (one runtime._Packer), or a
    row group's (one per region). ``parts``: per region, the input each load reads and the
    number of stores; the kernel's parameters are each part's loads, then its stores."""

    def __init__(self, func, device, parts, grid):
        self.func, self.device, self.grid, self.parts = func, device, grid, parts
        self.ctx = None  # (the device's primary context, looked up at the first launch)

    def context(self):
        """The device's primary context, which the kernel is launched in."""
        if self.ctx is None:
            self.ctx = _primary(self.device)
        return self.ctx

    def launch(self, ins, outs, stream):
        """Run on a region's ``ins`` and ``outs`` (launch_parts for a row group's)."""
        self.launch_parts(((ins, outs),), stream)

    def launch_parts(self, parts, stream):
        """Run on each region's (ins, outs), in the order of ``self.parts``."""
        params = []
        for (ins, outs), (loads, _) in zip(parts, self.parts):
            params += [ins[ix].data_ptr() for ix in loads]
            params += [o.data_ptr() for o in outs]
        r = _C.cuda_launch(self.func, self.context(), self.grid, codegen.BLOCK, stream, params)
        if r:
            _check_cu(r, "cuLaunchKernel")


def kernel_for(region, packer, device):
    """A Kernel for ``region`` with the input layout of ``packer``, or False when no kernel
    fits the region or compiling is off or failed (the interpreter then runs it)."""
    if not _compiles([region]):
        return False
    lay = codegen.layout(packer.desc)
    if lay is None:
        return False
    return _build(lambda: codegen.source(region, lay, packer.compute), device,
                  [([ix for ix, _ in region.loads], len(lay.stores))], lay.grid())


def group_kernel_for(group, packers, device):
    """One Kernel running every region of row group ``group`` (plan_steps.RowGroup) with the input
    layouts of ``packers`` (one per region), or False where none fits (the regions then run
    one by one)."""
    if not _compiles(group.regions):
        return False
    lays = codegen.group_layouts([codegen.layout(p.desc) for p in packers], group.dims)
    if lays is None:
        return False
    return _build(lambda: codegen.group_source(group.regions, lays, [p.compute for p in packers]),
                  device, [([ix for ix, _ in r.loads], len(lay.stores))
                           for r, lay in zip(group.regions, lays)], lays[0].grid())


def _compiles(regions):
    """Whether compiling is on and no region holds an op the kernels do not compile (iota)."""
    return _STATE["enabled"] and not any(i[0] == OPCODES["iota"]
                                         for r in regions for i in r.instrs)


def _arch(device):
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def _build(make_source, device, parts, grid):
    """A Kernel, or False: the region stays with the interpreter. A source NVRTC rejects is
    counted, and compiling goes on for the other regions until jit._MAX_FAILED sources failed
    (one rejected source, say a codegen bug for a rare op, would otherwise leave every region
    of the process interpreted, 2-9% of the memory-bandwidth floor on an H200); any other
    failure (no NVRTC, the driver) turns compiling off at once."""
    try:
        src = make_source()
        key, cubin = compile_cubin(src, _arch(device))
        func = _function(key, cubin, device)
    except CompileError as e:
        with _LOCK:
            if getattr(e, "counted", False):  # (the same source again: _REJECTED)
                return False
            e.counted = True
            _STATE["failed"] += 1
            _STATE["last_failure"] = f"{type(e).__name__}: {e}"
            if _STATE["failed"] >= jit._MAX_FAILED:
                _off(f"{_STATE['failed']} kernels failed to compile; the last: "
                     f"{_STATE['last_failure']}")
        return False
    except Exception as e:  # noqa: BLE001 (a kernel is an optimisation: never fail the call)
        _off(f"{type(e).__name__}: {e}")
        return False
    return Kernel(func, device, parts, grid)
