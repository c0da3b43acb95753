"""fastgrad: torch.autograd.grad with fused C++ kernels for the VJPs and higher derivatives."""
from . import _C, api, hooks
from .api import Report, explain, grad

if api.NATIVE:  # (on an older torch every call goes to PyTorch, which runs the hooks itself)
    hooks.install()

__version__ = "0.1.0"


def cuda_available():
    """(available, reason): whether fastgrad's CUDA kernels can run here, and why not."""
    return _C.cuda_device_count() > 0, _C.cuda_status()


__all__ = ["grad", "explain", "Report", "cuda_available"]
