"Property and parity tests for small_doge.norm (RMSNorm) and small_doge.rope (rotary embeddings)."
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers import DogeConfig
from transformers.models.doge import modeling_doge as hf

from small_doge.core import ConfigError
from small_doge.norm import RMSNorm
from small_doge.rope import DogeRotaryEmbedding, RopeConfig, apply_rotary_pos_emb, default_rope_parameters, rotate_half

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=2), d=st.integers(1, 48),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_rmsnorm_matches_torch(shape, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, d, generator=g) * scale).requires_grad_()
    norm = RMSNorm(d)
    with torch.no_grad(): norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    x2, w2 = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    y, y2 = norm(x), F.rms_norm(x2, (d,), weight=w2, eps=1e-6)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy); y2.backward(gy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4 / scale)
    torch.testing.assert_close(norm.weight.grad, w2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_bit_identical_to_transformers(dtype):
    ours, theirs = RMSNorm(32, eps=1e-5).to(dtype), hf.DogeRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad(): ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32, dtype=dtype) * 10
    with torch.no_grad(): a, b = ours(x), theirs(x)
    assert a.dtype == dtype and torch.equal(a, b)


def test_rmsnorm_fp16_large_values_do_not_overflow():
    x = torch.full((2, 64), 1000.0, dtype=torch.float16)   # sum of squares 6.4e7 > fp16 max
    y = RMSNorm(64)(x)
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones(2, 64), atol=1e-3)


def test_rmsnorm_repr_and_state_dict():
    n = RMSNorm(12, eps=1e-5)
    assert 'eps=1e-05' in repr(n) and list(n.state_dict()) == ['weight']


def _rot(x, m, inv):
    ang = m * torch.cat([inv, inv])
    return x * ang.cos() + rotate_half(x) * ang.sin()


@FAST
@given(half=st.integers(1, 32), m=st.integers(0, 3000), n=st.integers(0, 3000), s=st.integers(0, 3000),
       seed=st.integers(0, 2**16))
def test_rope_relative_position_invariance(half, m, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    d = 2 * half
    q, k = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    inv = DogeRotaryEmbedding(d).inv_freq.double()
    a, b = _rot(q, m, inv) @ _rot(k, n, inv), _rot(q, m + s, inv) @ _rot(k, n + s, inv)
    assert abs(a - b) <= 1e-8 * (1 + q.norm() * k.norm())
    assert torch.allclose(_rot(q, m, inv).norm(), q.norm())   # rotations keep length


def test_rope_dynamic_matches_transformers_call_sequence():
    cfg = DogeConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=64,
                     rope_parameters={'rope_type': 'dynamic', 'factor': 4.0, 'rope_theta': 10000.0})
    ours, theirs = DogeRotaryEmbedding.from_config(cfg), hf.DogeRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.bfloat16)
    for n in [10, 64, 65, 300, 100, 63, 500, 1]:   # below, at, just over, grow, reuse, reset, grow, decode-like
        pos = torch.arange(n)[None].expand(3, -1)
        for a, b in zip(ours(x, pos), theirs(x, pos)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(ours.inv_freq, theirs.inv_freq)


def test_rope_offset_positions_and_apply():
    cfg = DogeConfig(hidden_size=64, num_attention_heads=2, rope_parameters={'rope_type': 'default', 'rope_theta': 5e5})
    ours, theirs = DogeRotaryEmbedding.from_config(cfg), hf.DogeRotaryEmbedding(cfg)
    assert ours.base == 5e5 and ours.head_dim == 32
    pos = torch.tensor([[5, 6, 7], [0, 1, 2]])        # e.g. decoding after a prompt
    q, k = torch.randn(2, 4, 3, 32), torch.randn(2, 2, 3, 32)
    cos, sin = ours(q, pos)
    for a, b in zip((cos, sin), theirs(q, pos)): assert torch.equal(a, b)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)
    # unsqueeze_dim=2 for [B, S, H, D] layouts
    qt, kt = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    assert torch.allclose(qt.transpose(1, 2), apply_rotary_pos_emb(q, k, cos, sin)[0])


def test_rope_config_forms_and_errors():
    class Legacy:   # pre-transformers-5 config: rope_theta attribute + rope_scaling dict
        hidden_size, num_attention_heads, max_position_embeddings = 64, 4, 128
        rope_theta, rope_scaling = 1e5, {'type': 'dynamic', 'factor': 2.0}
    r = DogeRotaryEmbedding.from_config(Legacy())
    assert (r.rope_type, r.factor, r.base, r.head_dim, r.original_max_seq_len) == ('dynamic', 2.0, 1e5, 16, 128)
    assert DogeRotaryEmbedding(16, scaling={'rope_type': 'linear', 'factor': 2}).rope_type == 'linear'
    with pytest.raises(ConfigError, match='nope'): DogeRotaryEmbedding(16, scaling={'rope_type': 'nope'})
    with pytest.raises(ConfigError, match='factor'): DogeRotaryEmbedding(16, scaling={'rope_type': 'dynamic'})
    with pytest.raises(ConfigError, match='short_factor'): DogeRotaryEmbedding(16, scaling={'rope_type': 'longrope', 'factor': 2.0})
    with pytest.raises(ConfigError, match='even'): DogeRotaryEmbedding(7)
    bad = DogeConfig(hidden_size=64, num_attention_heads=4,
                     rope_parameters={'rope_type': 'default', 'rope_theta': 1e4, 'partial_rotary_factor': 0.5})
    with pytest.raises(ConfigError, match='partial'): DogeRotaryEmbedding.from_config(bad)


def test_default_rope_parameters_is_transformers_default():
    cfg = DogeConfig(hidden_size=96, num_attention_heads=3, rope_parameters={'rope_type': 'default', 'rope_theta': 5e5})
    ours, scale = default_rope_parameters(RopeConfig(32, 2048, dict(cfg.rope_parameters)))
    theirs, their_scale = hf.DogeRotaryEmbedding.compute_default_rope_parameters(cfg)
    assert torch.equal(ours, theirs) and scale == their_scale == 1.0


def test_rope_buffers_not_persistent():
    assert DogeRotaryEmbedding(16).state_dict() == {}
