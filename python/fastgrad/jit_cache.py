"""The disk cache of compiled loops and CUDA kernels (jit.py, cuda_jit.py): where it is
(``FASTGRAD_CACHE_DIR``, default ``~/.cache/fastgrad/jit``), marking entries used, and trimming
it to ``FASTGRAD_CACHE_MB`` (default 256), least recently used entries first."""
import os


def _cache_dir():
    d = os.environ.get("FASTGRAD_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastgrad", "jit")
    os.makedirs(d, exist_ok=True)
    return d


# Beside a CPU loop's library (.so): markers of a loop the compiler left scalar, and of a
# streaming variant it left scalar (jit._load)
SCALAR, NOSTREAM = ".scalar", ".nostream"
# a CPU loop, its markers, a CUDA kernel
_CACHE_SUFFIXES = (".so", SCALAR, NOSTREAM, ".cubin")
_PRUNED = []  # (one prune per process)


def _cache_used(path):
    """Mark a cache entry used (its mtime: what prune_cache keeps the most recent of)."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_cache(d=None, limit=None):
    """Drop the least recently used entries of the disk cache (CPU loops and CUDA kernels)
    while it holds more than ``limit`` bytes (``FASTGRAD_CACHE_MB``, default 256 MB), down to
    three quarters of it. An entry's files (fg_<key>.*) go together. Returns how many entries
    went. Run once per process, after its first compile."""
    d = d or _cache_dir()
    if limit is None:
        limit = float(os.environ.get("FASTGRAD_CACHE_MB", "256")) * (1 << 20)
    groups = {}  # entry -> [latest mtime, bytes, paths]
    with os.scandir(d) as it:
        for e in it:
            # (only finished entries: not another process's file being written)
            if not (e.name.startswith("fg_") and e.name.endswith(_CACHE_SUFFIXES)) or \
                    e.name.count(".") != 1 or not e.is_file():
                continue
            st = e.stat()
            g = groups.setdefault(e.name.split(".")[0], [0.0, 0, []])
            g[0], g[1] = max(g[0], st.st_mtime), g[1] + st.st_size
            g[2].append(e.path)
    total = sum(g[1] for g in groups.values())
    if total <= limit:
        return 0
    dropped = 0
    for _, size, paths in sorted(groups.values(), key=lambda g: g[0]):
        if total <= 0.75 * limit:
            break
        for p in paths:
            try:
                os.remove(p)
            except OSError:
                pass
        total -= size
        dropped += 1
    return dropped


def _cache_written():
    """After a compile wrote an entry: prune the cache, the first time in this process."""
    if not _PRUNED:
        _PRUNED.append(True)
        try:
            prune_cache()
        except OSError:
            pass
