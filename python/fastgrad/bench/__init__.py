"""Benchmark suite: ``torch.autograd.grad`` against ``fastgrad.grad`` on the same graph.

``python -m fastgrad bench --help`` lists the flags. For every case and size the suite

1. builds the forward graph once, with ordinary PyTorch code, outside anything timed;
2. differentiates it with PyTorch's ``torch.autograd.grad`` (``api._torch_grad``, the original
   captured at import) and with ``fastgrad.grad`` and checks that the results agree
   (:func:`check_case`; a fast wrong answer is a failure: the row is marked WRONG and the exit
   status is 1; the other cases go on);
3. times only the differentiation (``retain_graph=True`` so the thunk can be re-run), engines
   interleaved round by round in an order shuffled each round (seeded), after warm-up; median
   per engine. Where they apply it also times, in rounds of their own beside torch after those,
   ``torch.func`` (vjp for first order; for second order a Hessian-vector product / nested
   ``torch.func.grad`` on a pure function of x, which includes the forward pass) and
   ``torch.compile`` (forward compiled, then differentiated; double backward is recorded as
   ``error: ...``), and for ``sin_exp_sum`` the hand-fused C++ loop
   ``_C.hand_fused_sin_exp_grad`` (the floor a fused kernel can reach);
4. reports the speedup torch/fastgrad and the fraction of the memory floor:
   floor time = (bytes of every input read once + every result written once) / copy bandwidth,
   the bandwidth of the faster of ``dst.copy_(src)`` and (CPU) a streaming-store copy
   (``_C.stream_copy``), measured in the same run; fraction = floor / fastgrad.

Output: a table (stdout), a progress bar (stderr, only on a tty), a JSON file with every number
and a PNG of speedup against size (matplotlib, skipped with a note when it is missing).

Modules, in the order a run uses them: ``cases`` (the workloads), ``check`` (agreement with
torch), ``timing`` (timers, copy bandwidth), ``runner`` (one case at one size), ``report``
(table, progress, machine facts, plot), ``cli`` (flags, the loop, JSON, exit status). The names
below are re-exported so ``from fastgrad import bench`` stays the one entry point for the
tests and ``python -m fastgrad``.
"""
from .. import api  # noqa: F401 (bench.api: the tests swap api.grad to fake a wrong answer)
from .cases import (_TORCH, CASE_NAMES, CASES, Case, FirstOrder, PinnResidual,  # noqa: F401
                    SecondOrder, SinExpSum, State, WganGp, get_case)
from .check import TOLERANCES, CheckFailed, check_case, compare  # noqa: F401
from .cli import FULL_SIZES, QUICK_SIZES, main, parse_args  # noqa: F401
from .report import (COLUMNS, Progress, machine_info, plot, table_header,  # noqa: F401
                     table_row, versions)
from .runner import HAND_TARGET, bench_one  # noqa: F401
from .timing import Timer, copy_bandwidth, time_engines  # noqa: F401
