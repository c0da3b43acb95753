"""What the benchmark shows and keeps: the progress line, the table, the machine and version
facts that make a JSON file comparable later, and the speedup plot."""
import json
import os
import platform
import sys
import time

import torch


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
    from .. import _C
    return {"torch": torch.__version__, "fastgrad": getattr(fastgrad, "__version__", "?"),
            "hand_fused_sin_exp_grad": hasattr(_C, "hand_fused_sin_exp_grad")}


# What each field of the JSON file means, written into the file itself so that a result
# read months later explains itself.
FAULTS_NOTE = 256  # page faults per call (1 MB of 4 KB pages) from which a row says so

JSON_DEFINITIONS = {
    "size": "elements of the input x (MLP cases: batch * hidden width)",
    "times_s": "median seconds of the differentiation only (forward built outside); torch, "
               "fastgrad and hand timed in rounds of their own, in an order shuffled each round; "
               "func and compile in later rounds beside torch",
    "torch_beside_others_s": "torch's median in the rounds of func and compile",
    "min_times_s": "fastest run of each engine (less sensitive to load)",
    "speedup": "times_s.torch / times_s.fastgrad",
    "floor_bytes": "every input (x, grad_outputs, weights) read once + every result "
                   "written once",
    "copy_bandwidth_Bps": "bytes read + written per second by the faster of dst.copy_(src) and "
                          "(CPU) a streaming-store copy (_C.stream_copy) of a 64 MB buffer "
                          "(512 MB on a GPU)",
    "floor_fraction": "floor_bytes / copy_bandwidth_Bps / times_s.fastgrad (above 1 "
                      "when less must move than assumed, e.g. a result returned as an "
                      "expanded view, or a write-only result)",
    "func": "torch.func: vjp (first order, forward outside) or HVP / nested grad "
            "(second order and MLP cases: includes the forward)",
    "compile": "torch.compile(forward, dynamic=False), then torch.autograd.grad",
    "hand": "_C.hand_fused_sin_exp_grad, output allocated per call",
    "fastgrad_over_hand": "times_s.fastgrad / times_s.hand (sin_exp_sum only)",
    "hand_target_met": "fastgrad_over_hand <= 1.5 (issue 3's target), judged from 1e6 "
                       "elements on (null below: the hand loop takes less than a Python call)",
    "setup_s": "untimed setup + first call of func/compile/hand (compile time is here)",
    "page_faults": "median minor page faults per timed call, per engine (getrusage): fresh "
                   "pages the allocator handed out, zeroed by the kernel on first touch; "
                   f"{FAULTS_NOTE} or more a call are reported after the table, as the time "
                   "then includes them",
}


def write_json(result, path):
    """Every number of the run, to ``path`` (its folder created when missing)."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


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
