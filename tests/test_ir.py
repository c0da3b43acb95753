"""Simplifications the IR builders make (python/fastgrad/ir.py); values are checked against
torch by the op and edge-case suites, these check the rewrites fire and keep shape and dtype."""
import torch

from fastgrad import ir


def _leaves(*shapes, dtype=torch.float64):
    return [ir.leaf(k, s, dtype) for k, s in enumerate(shapes)]


def test_add_of_complementary_wheres_is_one_where():
    c, x, y = _leaves((3, 4), (3, 4), (4,))
    for a, b in [(ir.where(c, x, 0.0), ir.where(c, 0.0, y)),
                 (ir.where(c, 0.0, y), ir.where(c, x, 0.0))]:
        r = ir.add(a, b)
        assert r.op == "where" and r.args[0] is c
        assert {id(r.args[1]), id(r.args[2])} == {id(x), id(y)}
        assert r.shape == (3, 4) and r.dtype == torch.float64


def test_add_of_wheres_that_do_not_complement_stays_an_add():
    c, d, x, y = _leaves((3, 4), (3, 4), (3, 4), (3, 4))
    assert ir.add(ir.where(c, x, 0.0), ir.where(d, 0.0, y)).op == "add"  # other condition
    assert ir.add(ir.where(c, x, 0.0), ir.where(c, y, 0.0)).op == "add"  # same branch
    # a where that would broadcast differently from the add is not formed
    c1, x1 = _leaves((4,), (4,))
    y2 = ir.leaf(2, (3, 4), torch.float64)
    r = ir.add(ir.where(c1, x1, 0.0), ir.where(c1, 0.0, y2))
    assert r.shape == (3, 4)


def test_add_keeps_the_promoted_dtype():
    c = ir.leaf(0, (3,), torch.float32)
    x = ir.leaf(1, (3,), torch.float32)
    y = ir.leaf(2, (3,), torch.float64)
    r = ir.add(ir.where(c, x, 0.0), ir.where(c, 0.0, y))
    assert r.dtype == torch.float64
