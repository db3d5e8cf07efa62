"""Running normaliser, identity-at-init residual blocks, per-shape grouping and
state round trips of the hypernetwork."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from rledit_plugin.core.hypernet import HyperBlock, HyperNetwork, RunningNorm, ShapeGroupNet

F64 = torch.float64
SHAPES = {  # two shapes; the first shared by three modules, given out of order on purpose
    "layers.3.mlp.up": (6, 10),
    "layers.1.mlp.up": (6, 10),
    "layers.1.mlp.down": (10, 6),
    "layers.2.mlp.up": (6, 10),
}


def _rows(n, d_in, d_out, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g) * 3 + offset,
            torch.randn(n, d_out, generator=g) * 0.01 - offset)


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"rank": 4, "n_blocks": 2, "init_lr": 1e-2, "init_lam": 0.5, **kw}
    return HyperNetwork(SHAPES, **kw)


# ---------------------------------------------------------------- normaliser

def test_running_norm_merge_equals_statistics_of_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, generator=g, dtype=F64) * 5 + 1e3 for n in (5, 1, 17, 0, 3, 2)]
    norm = RunningNorm(7, eps=1e-5)
    for batch in batches:
        norm.update(batch)
    everything = torch.cat(batches)
    assert norm.count.item() == everything.shape[0]
    torch.testing.assert_close(norm.mean, everything.mean(0), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(norm.var, everything.var(0), rtol=1e-10, atol=0.0)  # unbiased
    x = torch.randn(4, 7, generator=g, dtype=F64)
    expected = (x - everything.mean(0)) / (everything.std(0) + 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-10, atol=1e-12)


def test_running_norm_is_safe_with_zero_or_one_row():
    norm = RunningNorm(3, eps=1e-5)
    x = torch.tensor([[1.0, -2.0, 3.0]])
    torch.testing.assert_close(norm(x), x / (1 + 1e-5))  # count 0: mean 0, std 1
    norm.update(x)  # one-row batch on an empty normaliser
    assert norm.count.item() == 1
    out = norm(torch.tensor([[2.0, -2.0, 0.0]]))
    assert torch.isfinite(out).all()
    # count 1: neither centred nor scaled, so a lone first row is not mapped to zero
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 0.0]]) / (1 + 1e-5))
    assert norm(x).abs().sum() > 0
    norm.update(torch.tensor([[3.0, -2.0, 5.0]]))  # one-row batch again: count 2, real variance
    torch.testing.assert_close(norm.var.float(), torch.tensor([2.0, 0.0, 2.0]))
    assert torch.isfinite(norm(x)).all()  # zero-variance feature guarded by eps


def test_running_norm_rejects_wrong_width():
    with pytest.raises(ValueError, match="width 3"):
        RunningNorm(3).update(torch.zeros(2, 4))


# ---------------------------------------------------------------- blocks and values

def test_blocks_are_identity_at_init():
    net = _net(n_blocks=4)
    keys, grads = _rows(5, 6, 10, seed=1, offset=2.0)
    net.update_norm("layers.2.mlp.up", keys, grads)
    group, m = net.groups["6x10"], net.locate("layers.2.mlp.up")[1]
    normalised = group.norms[m](torch.cat([keys, grads], 1))
    pseudo_keys, pseudo_grads = group.transform(keys, grads, m)
    assert torch.equal(torch.cat([pseudo_keys, pseudo_grads], 1), normalised)
    block = HyperBlock(16, 3, n_modules=2)
    z = torch.randn(4, 16)
    assert torch.equal(block(z, 1), z)


def test_values_at_init_match_hand_computation():
    net = _net()
    name = "layers.1.mlp.down"
    keys, grads = _rows(7, 10, 6, seed=2, offset=1.0)
    net.update_norm(name, keys, grads)
    net.update_norm(name, *_rows(3, 10, 6, seed=3))
    everything = torch.cat([torch.cat([keys, grads], 1), torch.cat(_rows(3, 10, 6, seed=3), 1)]).double()
    mean, std = everything.mean(0), everything.std(0)
    k_norm = ((keys.double() - mean[:10]) / (std[:10] + 1e-5))
    g_norm = ((grads.double() - mean[10:]) / (std[10:] + 1e-5))
    expected = -1e-2 * (keys.double() * k_norm).sum(1, keepdim=True) * g_norm
    D = net.values(name, keys, grads)
    assert D.shape == (7, 6) and D.dtype == torch.float32
    torch.testing.assert_close(D.double(), expected, rtol=1e-5, atol=1e-7)


def test_values_do_not_update_the_normaliser():
    net = _net()
    keys, grads = _rows(4, 6, 10, seed=4)
    net.values("layers.1.mlp.up", keys, grads)
    assert net.groups["6x10"].norms[0].count.item() == 0


# ---------------------------------------------------------------- grouping

def test_modules_are_grouped_by_shape_in_sorted_order():
    net = _net()
    assert net.module_names == sorted(SHAPES)
    assert net.shapes == {name: SHAPES[name] for name in sorted(SHAPES)}
    assert sorted(net.groups.keys()) == ["10x6", "6x10"]
    assert net.locate("layers.1.mlp.up") == ("6x10", 0)
    assert net.locate("layers.2.mlp.up") == ("6x10", 1)
    assert net.locate("layers.3.mlp.up") == ("6x10", 2)
    assert net.locate("layers.1.mlp.down") == ("10x6", 0)
    group = net.groups["6x10"]
    assert len(group.norms) == 3 and group.lr.shape == (3,) and group.lam.shape == (3,)
    assert group.blocks[0].scale.weight.shape == (3, 16)
    with pytest.raises(KeyError, match="layers.9.mlp.up"):
        net.values("layers.9.mlp.up", *_rows(2, 6, 10, seed=0))


def test_same_shape_shares_blocks_but_not_per_module_state():
    net = _net()
    group = net.groups["6x10"]
    with torch.no_grad():
        group.blocks[0].B.normal_()
        group.blocks[0].scale.weight[1].mul_(3.0)  # module index 1 only
        group.lr[2] = 5e-2
        group.lam[0] = -1.0
    keys, grads = _rows(5, 6, 10, seed=5)
    net.update_norm("layers.1.mlp.up", keys, grads)
    assert group.norms[0].count.item() == 5
    assert group.norms[1].count.item() == 0 and group.norms[2].count.item() == 0
    assert net.lam("layers.1.mlp.up").item() == -1.0 and net.lam("layers.2.mlp.up").item() == 0.5
    assert net.lr("layers.3.mlp.up").item() == pytest.approx(5e-2)
    # identical normalisers: outputs differ only through the per-module embeddings and lr
    for m in (1, 2):
        group.norms[m].load_state_dict(group.norms[0].state_dict())
    d1, d2, d3 = (net.values(n, keys, grads) for n in ("layers.1.mlp.up", "layers.2.mlp.up", "layers.3.mlp.up"))
    assert not torch.allclose(d1, d2)  # scale embedding of module 1 differs
    torch.testing.assert_close(d3, d1 * 5.0)  # same blocks and embeddings, lr 5x


def test_forward_rejects_wrong_shapes():
    net = _net()
    keys, grads = _rows(3, 6, 10, seed=0)
    with pytest.raises(ValueError, match=r"keys \(N, 6\) and grads \(N, 10\)"):
        net.values("layers.1.mlp.up", grads, keys)
    with pytest.raises(ValueError, match="keys have 3 rows but grads have 2"):
        net.values("layers.1.mlp.up", keys, grads[:2])


# ---------------------------------------------------------------- gradients

def _grads_of_loss(net, name):
    keys, grads = _rows(6, 6, 10, seed=6)
    net.update_norm(name, keys, grads)
    net.zero_grad(set_to_none=True)
    D = net.values(name, keys, grads)
    (D * torch.randn_like(D)).sum().backward()
    return net.groups[net.locate(name)[0]]


def test_gradients_reach_blocks_at_init():
    """At init the relu input is exactly 0; its derivative there must not be 0."""
    group = _grads_of_loss(_net(), "layers.2.mlp.up")
    block = group.blocks[0]
    for p in (block.B, block.b, block.shift.weight, group.lr):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # A's gradient is proportional to B (= 0) and scale multiplies relu(0) = 0
    assert block.A.grad.abs().sum() == 0 and block.scale.weight.grad.abs().sum() == 0
    assert group.lam.grad is None  # lam only receives the explicit dlam of the solve


def test_gradients_reach_every_parameter_after_leaving_init():
    net = _net()
    with torch.no_grad():
        for group in net.groups.values():
            for block in group.blocks:
                block.B.normal_(0, 0.5)
                block.b.normal_(0, 0.5)
    name = "layers.2.mlp.up"
    group = _grads_of_loss(net, name)
    m = net.locate(name)[1]
    for block in group.blocks:
        for p in (block.A, block.B, block.b):
            assert p.grad.abs().sum() > 0
        for emb in (block.scale, block.shift):
            assert emb.weight.grad[m].abs().sum() > 0
            assert emb.weight.grad[[i for i in range(3) if i != m]].abs().sum() == 0
    assert group.lr.grad[m] != 0 and group.lr.grad.abs().sum() == group.lr.grad[m].abs()
    # lam is a leaf parameter; the solve's dlam enters through a surrogate term
    assert group.lam.is_leaf and group.lam.requires_grad
    (torch.tensor(0.25) * net.lam(name)).backward()
    assert group.lam.grad.tolist() == [0.0, 0.25, 0.0]


# ---------------------------------------------------------------- state

def test_state_dict_round_trip_through_safetensors(tmp_path):
    net = _net(seed=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for i, name in enumerate(net.module_names):
        d_in, d_out = net.shapes[name]
        net.update_norm(name, *_rows(5 + i, d_in, d_out, seed=10 + i, offset=i))
    path = tmp_path / "hyper.safetensors"
    save_file(net.state_dict(), str(path))
    assert any(key.endswith("norms.0.m2") for key in load_file(str(path)))

    other = _net(seed=2)
    other.load_state_dict(load_file(str(path)))
    for name in net.module_names:
        d_in, d_out = net.shapes[name]
        keys, grads = _rows(4, d_in, d_out, seed=99)
        assert torch.equal(other.values(name, keys, grads), net.values(name, keys, grads))
        assert torch.equal(other.lam(name), net.lam(name))


def test_seeded_construction_is_deterministic():
    a, b, c = _net(seed=3), _net(seed=3), _net(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["groups.6x10.blocks.0.A"], sc["groups.6x10.blocks.0.A"])


def test_a_init_scale_keeps_bottleneck_activations_order_one():
    torch.manual_seed(0)
    block = HyperBlock(4096, 64, n_modules=1)
    z = torch.randn(32, 4096)  # normalised rows
    assert 0.8 < (z @ block.A).std().item() < 1.2


def test_shape_group_validates_sizes():
    with pytest.raises(ValueError, match="rank=0"):
        ShapeGroupNet(4, 4, 1, rank=0)
