"""The drop-in: shared tensors, copied modules, a rewritten forward that stays the user's class."""
import pickle

import torch
import torch.fx as fx

from examples.mlp import MLP
from shapeprof.dropin import install, shared_copy, uninstall


def test_shared_copy_shares_tensors_and_nothing_else():
    model = MLP(8, 16, 4).eval()
    calls = []
    model.out.register_forward_hook(lambda *a: calls.append("user"))
    copy_ = shared_copy(model)
    assert all(p is q for p, q in zip(copy_.parameters(), model.parameters()))
    assert copy_.out is not model.out
    copy_.out.register_forward_hook(lambda *a: calls.append("copy"))
    copy_.train()
    assert not model.training and len(model.out._forward_hooks) == 1
    model(torch.randn(2, 8))
    assert calls == ["user"]


RAN = []


def mark_graph_run():
    RAN.append("graph")


def test_installed_graph_runs_as_the_users_class_and_falls_back_when_the_call_differs():
    torch.manual_seed(0)
    model = MLP(8, 16, 4).eval()
    x = torch.randn(3, 8)
    copy_ = shared_copy(model)
    gm = fx.symbolic_trace(copy_)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        gm.graph.call_function(mark_graph_run)        # a marker: the graph ran
    gm.recompile()
    RAN.clear()
    installed = install(copy_, gm, ((x,), {}))
    assert isinstance(copy_, MLP) and type(copy_) is not MLP and type(copy_).__name__ == "MLP"
    assert list(copy_.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(copy_(x), model(x))
    assert RAN == ["graph"]
    copy_.train()                     # another mode than traced: the class's own forward runs
    copy_(x)
    assert RAN == ["graph"]
    clone = pickle.loads(pickle.dumps(copy_))   # pickles as the user's class, without the graph
    assert type(clone) is MLP
    uninstall(copy_, installed)
    assert type(copy_) is MLP
