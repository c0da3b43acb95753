"""The graph walk (csrc/capture.cpp, `collect`; engine._collect), against a walk written here.

Every call walks its graph from the outputs: which nodes lead to an input (`needed`), in an
order where each node comes before the nodes it sends gradients to (`order`), the edges of each
node met (`nexts`), the AccumulateGrad node of each leaf input (`leaf_nodes`), and a hash of the
order's classes (`structure`). The walk keeps these in C++ and makes `needed` and `nexts` only
when the Python sweep asks; each graph below has a branch that leads to no input, a node shared
by two consumers, or an input that is an intermediate node, so that a node wrongly marked, left
out or ordered after a producer shows.
"""
import pytest
import torch

from fastgrad import engine


def _reference(roots, input_nodes, leaves):
    """(set of ids of needed nodes, {id: next_functions} of every node reached, {id(leaf):
    its AccumulateGrad node}), by a plain recursive walk."""
    nexts, need, found = {}, {}, {}
    leaf_ids = {id(t) for t in leaves}

    def visit(n):
        if id(n) in need:
            return need[id(n)]
        nf = n.next_functions
        nexts[id(n)] = nf
        hit = any(n is m for m in input_nodes)
        var = getattr(n, "variable", None) if type(n).__name__ == "AccumulateGrad" else None
        if not hit and var is not None and id(var) in leaf_ids:
            found[id(var)] = n
            hit = True
        children = [visit(m) for m, _ in nf if m is not None]  # (every edge is walked)
        need[id(n)] = hit or any(children)
        return need[id(n)]

    for r in roots:
        visit(r)
    return {k for k, v in need.items() if v}, nexts, found


def _leaves(g, k=3):
    return [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(k)]


# name -> build(generator) -> (outputs, leaf inputs, intermediate tensors whose nodes are inputs)
GRAPHS = {
    "chain": lambda g: (lambda x: ([torch.tanh(torch.sin(x) * 2.0).sum()], [x], []))(
        *_leaves(g, 1)),
    "unused_branch": lambda g: (lambda x, w: ([(x.exp() * w.cos()).sum()], [x], []))(
        *_leaves(g, 2)),
    "shared_node": lambda g: (lambda x: (lambda s: ([(s * s.cos() + s).sum()], [x], []))(
        torch.sin(x)))(*_leaves(g, 1)),
    "two_outputs": lambda g: (lambda x, y: ([(x * y).sum(), (x + y.exp()).mean()], [x, y], []))(
        *_leaves(g, 2)),
    "intermediate_input": lambda g: (lambda x, w: (lambda h: (
        [(h.tanh() * w).sum()], [w], [h]))(x.sin() * 3.0))(*_leaves(g, 2)),
    "leaf_not_reached": lambda g: (lambda x, y, z: ([(x * y).sum()], [x, z], []))(
        *_leaves(g, 3)),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_collect_matches_a_plain_walk(name):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    outs, leaves, mids = GRAPHS[name](g)
    roots = [o.grad_fn for o in outs]
    input_nodes = [m.grad_fn for m in mids]
    graph = engine._collect(roots, {id(n) for n in input_nodes}, {id(t) for t in leaves})
    want_needed, want_nexts, want_leaves = _reference(roots, input_nodes, leaves)

    order = list(graph.order)
    assert {id(n) for n in order} == want_needed
    assert len(order) == len(want_needed)
    place = {id(n): i for i, n in enumerate(order)}
    for n in order:  # consumers before producers
        for m, _ in n.next_functions:
            if m is not None and id(m) in place:
                assert place[id(n)] < place[id(m)], (n, m)
    needed = graph.needed
    assert set(needed) == set(want_nexts)  # every node met, needed or not
    assert {k for k, v in needed.items() if v} == want_needed
    nexts = graph.nexts
    assert set(nexts) == set(want_nexts)
    for k, nf in want_nexts.items():
        assert nexts[k] == nf
    assert graph.needed is needed and graph.nexts is nexts  # (made once)
    assert dict(graph.leaf_nodes) == want_leaves
    # the structure hashes the order's classes: another graph of the same build shares it
    outs2, leaves2, mids2 = GRAPHS[name](g)
    inputs2 = [m.grad_fn for m in mids2]  # (held: an id is only the node while it lives)
    graph2 = engine._collect([o.grad_fn for o in outs2], {id(n) for n in inputs2},
                             {id(t) for t in leaves2})
    assert graph2.structure == graph.structure


def test_collect_structure_tells_classes_apart():
    g = torch.Generator().manual_seed(5)
    (x,) = _leaves(g, 1)
    walks = [engine._collect([f(x).sum().grad_fn], set(), {id(x)})
             for f in (torch.sin, torch.cos, torch.tanh)]
    assert len({w.structure for w in walks}) == 3
