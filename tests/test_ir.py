"""Simplifications the IR builders make (python/fastgrad/ir.py); values are checked against
torch by the op and edge-case suites, these check the rewrites fire and keep shape and dtype."""
import pytest
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


def _topo_reference(roots, stop):
    """ir.topo as a plain recursive walk: post-order, each node once, nothing below a stop."""
    seen, order = set(), []

    def visit(n):
        if id(n) in seen:
            return
        seen.add(id(n))
        if not stop(n):
            for a in n.args:
                visit(a)
        order.append(n)

    for r in roots:
        if r is not None:
            visit(r)
    return order


def _random_dag(gen, size):
    """Nodes built from leaves (some known op nodes too) by random unary and binary ops."""
    nodes = _leaves((3,), (3,), (1,))
    unary = [lambda a, op=op: ir.ew(op, a) for op in ("exp", "sin")] + [ir.neg]
    binary = (ir.add, ir.mul, ir.sub)
    for k in range(size):
        r = torch.randint(0, 1 << 30, (4,), generator=gen).tolist()
        a, b = nodes[r[0] % len(nodes)], nodes[r[1] % len(nodes)]
        n = binary[r[2] % 3](a, b) if r[3] % 3 else unary[r[2] % 3](a)
        if r[3] % 7 == 0:
            n = ir.with_known(n, 10 + k)  # (a value bound at run time: a stop)
        nodes.append(n)
    return nodes


def test_topo_matches_a_plain_walk_with_every_kind_of_stop(gen):
    for size in (1, 5, 30, 120):
        nodes = _random_dag(gen, size)
        pick = torch.randint(0, len(nodes), (4,), generator=gen).tolist()
        roots = [nodes[pick[0]], None, nodes[pick[1]], nodes[pick[0]], nodes[-1]]
        ids = {id(nodes[pick[2]]), id(nodes[pick[3]])}
        some = {id(n) for n in nodes[::3]}
        cases = [
            (dict(), lambda n: False),
            (dict(stop=ir.is_known), ir.is_known),
            (dict(stop=lambda n: id(n) in some), lambda n: id(n) in some),
            (dict(stop_ids=ids), lambda n: id(n) in ids),
            (dict(stop_ids=dict.fromkeys(ids)), lambda n: id(n) in ids),
            (dict(stop=ir.is_known, stop_ids=ids), lambda n: ir.is_known(n) or id(n) in ids),
            (dict(stop=lambda n: id(n) in some, stop_ids=ids),
             lambda n: id(n) in some or id(n) in ids),
        ]
        for kw, ref in cases:
            got = ir.topo(roots, **kw)
            want = _topo_reference(roots, ref)
            assert [id(n) for n in got] == [id(n) for n in want], (size, kw)
    assert ir.topo([]) == [] and ir.topo((None,)) == []


def test_topo_passes_on_errors_of_its_stop():
    x, = _leaves((3,))

    def bad(n):
        raise ValueError("stop failed")

    with pytest.raises(ValueError, match="stop failed"):
        ir.topo([ir.ew("exp", x)], stop=bad)
    with pytest.raises(TypeError):
        ir.topo([ir.ew("exp", x)], stop_ids=[id(x)])
