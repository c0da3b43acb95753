"""Tensor hooks (``Tensor.register_hook``) on intermediate tensors of a graph.

PyTorch runs such a hook on the gradient flowing into the tensor, before its grad_fn, and uses
what it returns. fastgrad only sees graph nodes, and PyTorch offers no way to list a node's
hooks, so importing fastgrad wraps ``torch.Tensor.register_hook`` to note, in the grad_fn's
``metadata``, which output carries hooks and where they live (the tensor's own hook dict, so a
removed handle removes the hook here too). The sweep then runs them at the same point
(engine._run_tensor_hooks). Hooks registered before fastgrad was imported are not seen.

``Tensor.retain_grad`` is noted the same way (a weak reference to the tensor): PyTorch adds
the gradient flowing into such a tensor to its ``.grad`` in ``torch.autograd.grad`` too, after
the tensor's other hooks.

Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, and what is built on them:
``save_on_cpu``, non-reentrant checkpointing) are only noted: once any were pushed, each call
asks whether its graph holds a tensor they packed (csrc/saved_tensors.h), and PyTorch runs such a
call. PyTorch unpacks a saved tensor once per backward, and hooks may count on it (a one-shot
unpack, a checkpointed segment recomputed on the first unpack), where fastgrad reads saved values
several times. Asking costs a read per saved tensor, so it waits for the first push; graphs built
under hooks pushed before fastgrad was imported are not seen (their values are still never tied
to their producers: lowering.hooked).
"""
import weakref

import torch

_KEY = "fastgrad_tensor_hooks"
_RETAIN_KEY = "fastgrad_retains_grad"
_STATE = {"any": False, "saved": False}
_orig_register_hook = torch.Tensor.register_hook
_orig_retain_grad = torch.Tensor.retain_grad
_orig_push_saved = torch._C._autograd._push_saved_tensors_default_hooks


def _register_hook(self, hook):
    handle = _orig_register_hook(self, hook)
    fn = self.grad_fn
    if fn is not None and self._backward_hooks is not None:
        try:
            entries = fn.metadata.setdefault(_KEY, [])
        except Exception:  # pragma: no cover - every node has metadata in torch >= 2.0
            return handle
        if not any(d is self._backward_hooks for _, d in entries):
            entries.append((self.output_nr, self._backward_hooks))
        _STATE["any"] = True
    return handle


def _retain_grad(self):
    _orig_retain_grad(self)
    fn = self.grad_fn
    if fn is not None and self.retains_grad:
        try:
            entries = fn.metadata.setdefault(_RETAIN_KEY, [])
        except Exception:  # pragma: no cover - every node has metadata in torch >= 2.0
            return
        if not any(r() is self for _, r in entries):
            entries.append((self.output_nr, weakref.ref(self)))
        _STATE["any"] = True


def _push_saved_hooks(*args, **kwargs):
    _STATE["saved"] = True
    return _orig_push_saved(*args, **kwargs)


def saved_hooks_used():
    """Whether saved-tensor hooks were pushed since fastgrad was imported."""
    return _STATE["saved"]


def install():
    if torch.Tensor.register_hook is not _register_hook:
        _register_hook.__doc__ = _orig_register_hook.__doc__
        torch.Tensor.register_hook = _register_hook
    if torch.Tensor.retain_grad is not _retain_grad:
        _retain_grad.__doc__ = _orig_retain_grad.__doc__
        torch.Tensor.retain_grad = _retain_grad
    if torch._C._autograd._push_saved_tensors_default_hooks is not _push_saved_hooks:
        torch._C._autograd._push_saved_tensors_default_hooks = _push_saved_hooks


def any_registered():
    """Whether any tensor hook was registered since import (none: nodes need no look)."""
    return _STATE["any"]


def tensor_hooks(fn):
    """[(output number, hook dict, None)] then [(output number, None, tensor)] for the tensors
    that retain their gradient, for node ``fn`` (PyTorch's order: retains_grad last); empty
    when nothing was registered."""
    if not _STATE["any"]:
        return ()
    try:
        md = fn.metadata
        out = [(k, d, None) for k, d in md.get(_KEY, ()) if d]
        for k, r in md.get(_RETAIN_KEY, ()):
            t = r()
            if t is not None and t.retains_grad:
                out.append((k, None, t))
        return out
    except Exception:  # pragma: no cover
        return ()
