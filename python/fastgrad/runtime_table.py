"""Opcode and dtype numbers, read from the compiled module (csrc/ops.def is the only list)."""
import torch

from . import _C

OPCODES = dict(_C.opcodes())
ARITY = dict(_C.op_arities())
_DT = dict(_C.dtypes())
DTYPE_CODES = {getattr(torch, name): code for name, code in _DT.items()}
