"""Tensor hooks (``Tensor.register_hook``) on intermediate tensors of a graph.

PyTorch runs such a hook on the gradient flowing into the tensor, before its grad_fn, and uses
what it returns. fastgrad only sees graph nodes, and PyTorch offers no way to list a node's
hooks, so importing fastgrad wraps ``torch.Tensor.register_hook`` to note, in the grad_fn's
``metadata``, which output carries hooks and where they live (the tensor's own hook dict, so a
removed handle removes the hook here too). The sweep then runs them at the same point
(sweep._run_tensor_hooks). Hooks registered before fastgrad was imported are not seen.

``Tensor.retain_grad`` is noted the same way (a weak reference to the tensor): PyTorch adds
the gradient flowing into such a tensor to its ``.grad`` in ``torch.autograd.grad`` too, after
the tensor's other hooks.

Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, and what is built on them:
``save_on_cpu``, non-reentrant checkpointing, or put on one saved tensor through its
``register_hooks``) are only noted: once any were pushed, each call
asks whether its graph holds a tensor they packed (csrc/saved_tensors.h), and PyTorch runs such a
call. PyTorch unpacks a saved tensor once per backward, and hooks may count on it (a one-shot
unpack, a checkpointed segment recomputed on the first unpack), where fastgrad reads saved values
several times. Asking costs a read per saved tensor, so it waits for the first push; graphs built
under hooks pushed before fastgrad was imported are not seen (their values are still never tied
to their producers: node_view.hooked).

Hooks on nodes (``grad_fn.register_prehook`` / ``register_hook``, as module full backward hooks
use) cannot be listed either, and a node called directly or lowered does not run them. Every such
registration goes through ``torch.autograd.Function._register_hook`` (PyTorch's C++ looks it up
there), which importing fastgrad wraps to count registrations and the hook dicts they make;
while one of those is alive, each call asks its graph's nodes (node_hooks_in), and PyTorch runs a
graph where one has hooks.
"""
import functools
import os
import threading
import weakref

import torch
from torch.autograd import function as _function

from . import _C

_KEY = "fastgrad_tensor_hooks"
_RETAIN_KEY = "fastgrad_retains_grad"
# node: registrations of node hooks so far; live: how many of the hook dicts they made are alive
_STATE = {"any": False, "saved": False, "node": 0, "live": 0}
_orig_register_hook = torch.Tensor.register_hook
_orig_retain_grad = torch.Tensor.retain_grad
_orig_push_saved = torch._C._autograd._push_saved_tensors_default_hooks
_orig_saved_register = torch._C._autograd.SavedTensor.register_hooks
_orig_node_hook = _function._HookMixin.__dict__["_register_hook"]  # (a staticmethod)


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


def _register_saved_hooks(self, *args, **kwargs):
    # (hooks put on one saved tensor: fastgrad's own, which free a graph, pass the original)
    _STATE["saved"] = True
    return _orig_saved_register(self, *args, **kwargs)


def saved_hooks_used():
    """Whether saved-tensor hooks were pushed, or put on a saved tensor
    (``grad_fn._raw_saved_<name>.register_hooks``), since fastgrad was imported."""
    return _STATE["saved"]


_PROBING = threading.local()  # .found: the hook dict a probed node passed (see _node_dicts)


class _Probed(Exception):
    pass


def _register_node_hook(backward_hooks, hook):
    if getattr(_PROBING, "on", False):
        _PROBING.found = backward_hooks
        raise _Probed
    _STATE["node"] += 1
    d, handle = _orig_node_hook.__func__(backward_hooks, hook)
    if backward_hooks is None:  # (a node's first hook: its dict is new, alive with the node)
        _STATE["live"] += 1
        r = weakref.ref(d, _dict_gone)
        _LIVE[id(r)] = r
    return d, handle


_LIVE = {}  # id -> weak reference to a hook dict made (kept so that its callback runs)


def _dict_gone(ref):
    _STATE["live"] -= 1
    _LIVE.pop(id(ref), None)


def _node_dicts(fn):
    """The hook dicts of node fn's Python pre-hooks and hooks that exist. PyTorch passes a
    node's dict (None before its first hook) to Function._register_hook when a hook is
    registered; the probe raises there, before PyTorch adds anything to the node."""
    found = []
    for register in (fn.register_prehook, fn.register_hook):
        _PROBING.on, _PROBING.found = True, None
        try:
            register(_register_node_hook)
        except _Probed:
            pass
        finally:
            _PROBING.on = False
        if _PROBING.found is not None:
            found.append(_PROBING.found)
    return tuple(found)


def node_hooks_used():
    """Whether a node hook registered since fastgrad was imported may still be on a node: a
    hook dict PyTorch made for one is alive (torch.compile registers some while it compiles,
    which go with the graphs it traced)."""
    return _STATE["live"] > 0


def node_hooks_in(order):
    """Whether a node of ``order`` has Python hooks fastgrad would not run. A Python Function's
    node is not asked: fastgrad runs it through PyTorch's engine, which runs its hooks. What a
    node was found to hold (_node_dicts) is kept in its ``metadata`` with the registration count,
    so it is asked again only after a later registration; a removed hook empties its dict.
    (csrc/node_hooks.cpp; _C.repeat_call asks it too.)"""
    return _C.node_hooks_in(order, _node_dicts, _STATE["node"])


def install():
    if torch.Tensor.register_hook is not _register_hook:
        _register_hook.__doc__ = _orig_register_hook.__doc__
        torch.Tensor.register_hook = _register_hook
    if torch.Tensor.retain_grad is not _retain_grad:
        _retain_grad.__doc__ = _orig_retain_grad.__doc__
        torch.Tensor.retain_grad = _retain_grad
    if torch._C._autograd._push_saved_tensors_default_hooks is not _push_saved_hooks:
        torch._C._autograd._push_saved_tensors_default_hooks = _push_saved_hooks
    if _function._HookMixin.__dict__["_register_hook"] is _orig_node_hook:
        _function._HookMixin._register_hook = staticmethod(_register_node_hook)
    if torch._C._autograd.SavedTensor.register_hooks is _orig_saved_register:
        _register_saved_hooks.__doc__ = _orig_saved_register.__doc__
        torch._C._autograd.SavedTensor.register_hooks = _register_saved_hooks


def any_registered():
    """Whether any tensor hook was registered since import (none: nodes need no look)."""
    return _STATE["any"]


def torch_tensor_hooks_in(order):
    """Whether a node of ``order`` has a tensor hook defined by PyTorch itself
    (``register_multi_grad_hook``'s, which FSDP uses): those read the state of PyTorch's engine
    (``torch._C._current_graph_task_id``, ``_will_engine_execute_node``), which exists only
    inside its backward, so PyTorch runs such a call."""
    for fn in order:
        for _, d, _ in tensor_hooks(fn):
            if d and any(_defined_in_torch(h) for h in d.values()):
                return True
    return False


_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")


def _defined_in_torch(hook):
    # (by its code's file: functools.wraps gives "any" mode's hook the user's __module__;
    # FSDP registers a functools.partial of its own)
    while isinstance(hook, functools.partial):
        hook = hook.func
    code = getattr(hook, "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(_TORCH_DIR)


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
