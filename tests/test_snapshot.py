"""Tests for shapeprof/snapshot.py: what a watched run writes is saved before it is written and put back."""
import torch
import torch.nn as nn

from shapeprof.snapshot import WriteSnapshot, copy_inputs, rng_kept


def test_writes_through_any_view_are_put_back_and_only_they_are_saved():
    w = nn.Parameter(torch.arange(4.0))
    cache = torch.zeros(2, 8)
    big = torch.randn(1000)                     # read, never written: not saved
    original = (w.detach().clone(), cache.clone(), big.clone())
    snap = WriteSnapshot()
    with torch.no_grad(), snap.watch():
        w.data.mul_(2)                          # through .data: w._version does not move
        cache[:, 2:4].add_(1)                   # a view
        cache.add_(5)                           # then the whole tensor: restored newest first
        torch.add(w, 1, out=torch.empty(4))     # out= into a tensor made in the run: nothing to save
        (big * 2).add_(1)                       # an intermediate written: nothing to save
    assert not torch.equal(w.detach(), original[0]) and not torch.equal(cache, original[1])
    # the views written: w via .data (4 floats), cache[:, 2:4] (4 floats), cache (16 floats)
    assert snap.saved_bytes == (4 + 4 + 16) * 4
    assert snap.wrote(w) and snap.wrote(cache) and not snap.wrote(big)
    snap.restore()
    assert torch.equal(w.detach(), original[0]) and torch.equal(cache, original[1]) and torch.equal(big, original[2])


def test_batch_norm_running_statistics_are_saved_though_the_schema_does_not_mark_them():
    bn = nn.BatchNorm1d(3).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    snap = WriteSnapshot()
    with torch.no_grad(), snap.watch():
        bn(torch.randn(16, 3))
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, before["running_mean"])
    snap.restore()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_set_or_resize_is_undone():
    b = torch.arange(6.0)
    storage, original = b.untyped_storage(), b.clone()
    snap = WriteSnapshot()
    with torch.no_grad(), snap.watch():
        b.resize_(2, 2)
        b.set_(torch.zeros(3))
    snap.restore()
    assert b.untyped_storage().data_ptr() == storage.data_ptr() and b.shape == (6,) and torch.equal(b, original)


def test_tensors_given_as_ours_are_noted_but_not_saved():
    x = torch.ones(3)
    snap = WriteSnapshot()
    with snap.watch(ours=[x]):
        x.add_(1)
    assert snap.wrote(x) and snap.saved_bytes == 0
    snap.restore()
    assert torch.equal(x, torch.full((3,), 2.0))


def test_copy_inputs_keeps_strides_aliasing_and_leaves_the_originals_alone():
    t = torch.randn(4, 3).t()                   # transposed: strides (1, 3)
    e = torch.randn(4).expand(3, 4)             # expanded: stride 0
    g = torch.randn(2, requires_grad=True)
    versions = [t._version, e._version, g._version]
    (ct, ce, cg, again), kw = copy_inputs(((t, e, g, t), {"n": 3}))
    assert ct.stride() == t.stride() and ce.stride() == e.stride()
    assert torch.equal(ct, t) and torch.equal(ce, e) and torch.equal(cg, g)
    assert ct.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert again is ct and kw == {"n": 3}       # one tensor given twice: one copy
    assert cg.requires_grad and cg.is_leaf
    assert [t._version, e._version, g._version] == versions


def test_rng_kept_puts_the_generator_back():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with rng_kept([torch.device("cpu")]):
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), state)
