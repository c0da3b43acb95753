"""A costly elementwise value that an expand broadcasts (plan._materialise_broadcast) is
computed once, not once per broadcast element in every region that reads it: a pair energy's
derivative with respect to the distance, over (N, N), read by the (N, N, 3) displacements in
both reductions over atoms. Results must match torch.autograd.grad (float64), natively, with
that value in a region of its own; a cheap one stays inside the regions that read it."""
import re

import pytest
import torch

import fastgrad
from conftest import TORCH_GRAD, assert_same, rand


def _lennard_jones(pos, eps, sig):
    n = pos.shape[0]
    d = pos[:, None, :] - pos[None, :, :]
    r = ((d ** 2).sum(-1) + torch.eye(n, dtype=pos.dtype)).sqrt()
    mask = ~torch.eye(n, dtype=torch.bool)
    e = torch.where(mask, 4 * eps * ((sig / r) ** 12 - (sig / r) ** 6), torch.zeros_like(r))
    return 0.5 * e.sum()


def _soft_sphere(pos, eps, sig):
    d = pos[:, None, :] - pos[None, :, :]
    r = ((d ** 2).sum(-1) + 1.0).sqrt()
    return (eps * torch.exp(-r / sig) / (1 + r * r)).sum()


def _cheap(pos, eps, sig):  # (the pair value is one op: nothing to save by materialising it)
    d = pos[:, None, :] - pos[None, :, :]
    return ((d ** 2).sum(-1) * eps + sig).sum()


ENERGIES = [("lennard_jones", _lennard_jones, True), ("soft_sphere", _soft_sphere, True),
            ("cheap", _cheap, False)]


def _regions(report):
    return [ln.strip() for ln in str(report).splitlines() if ln.strip().startswith("region")]


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("name,energy,materialised", ENERGIES, ids=[e[0] for e in ENERGIES])
def test_a_broadcast_pair_value_is_computed_once(gen, name, energy, materialised,
                                                 create_graph):
    n = 23
    pos0 = rand((n, 3), gen) * 3
    eps0, sig0 = rand((), gen) + 0.5, rand((), gen) + 0.5
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        pos, eps, sig = (t.clone().requires_grad_() for t in (pos0, eps0, sig0))
        e = energy(pos, eps, sig)
        (f,) = G(e, pos, create_graph=create_graph)
        second = G((f ** 2).sum(), (pos, eps, sig), allow_unused=True) if create_graph else ()
        res.append((f.detach(),) + tuple(second))
    assert_same(res[1], res[0], rtol=1e-10, atol=1e-12)
    pos = pos0.clone().requires_grad_()
    report = fastgrad.explain(energy(pos, eps0, sig0), pos, create_graph=create_graph)
    assert report.all_native, report
    pairs = [r for r in _regions(report) if f"elementwise over [{n}, {n}]" in r]
    wide = [r for r in _regions(report) if f"over [{n}, {n}, 3]" in r]
    assert wide, report
    if materialised:
        assert len(pairs) == 1, report
        # the (N, N, 3) regions only scale the displacements by the loaded pair value
        assert all(int(re.search(r"(\d+) instructions", r).group(1)) <= 8 for r in wide), report
    else:
        assert not pairs, report
