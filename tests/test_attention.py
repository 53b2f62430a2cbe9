"Randomised and parity tests for small_doge.attention (Dynamic Mask Attention reference)."
import sys, types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers import DogeConfig
from transformers.models.doge import modeling_doge as hf

from small_doge.core import ConfigError
from small_doge.attention import dynamic_bias, dynamic_mask, dynamic_mask_attention
from small_doge.rope import DogeRotaryEmbedding, apply_rotary_pos_emb
from small_doge.norm import RMSNorm

FAST = settings(max_examples=30, deadline=None)


# ---------- independent slow references (plain Python over keys) ----------

def mask_ref(bias, Sq, W=None, am=None):
    "Per query: visible keys sorted by (bias, position) descending, first W kept."
    B, Hkv, Sk = bias.shape
    keep = torch.zeros(B, Hkv, Sq, Sk, dtype=torch.bool)
    bl = bias.float().tolist()
    for b in range(B):
        for h in range(Hkv):
            for i in range(Sq):
                vis = [j for j in range(Sk - Sq + i + 1) if am is None or am[b, j]]
                vis = sorted(vis, key=lambda j: (bl[b][h][j], j), reverse=True)[:W]
                keep[b, h, i, vis] = True
    return keep


def attn_ref(q, k, v, bias, W=None, am=None, scaling=None):
    "Float64 attention over the reference mask; zeros where a query keeps no key."
    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    keep = mask_ref(bias, Sq, W, am).repeat_interleave(G, 1)
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * (D ** -0.5 if scaling is None else scaling)
    s = (s + bias.double().repeat_interleave(G, 1)[:, :, None]).masked_fill(~keep, float('-inf'))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return p @ v.double().repeat_interleave(G, 1)


@st.composite
def problems(draw, max_s=12):
    B = draw(st.integers(1, 2)); Hkv = draw(st.integers(1, 2)); G = draw(st.integers(1, 3))
    Sk = draw(st.integers(1, max_s)); Sq = draw(st.integers(1, Sk)); D = draw(st.sampled_from([4, 8]))
    W = draw(st.one_of(st.none(), st.integers(1, Sk + 2)))
    pads = draw(st.lists(st.integers(0, Sk), min_size=B, max_size=B))   # left padding per row (may be all)
    am = draw(st.one_of(st.none(), st.just((torch.arange(Sk)[None] >= torch.tensor(pads)[:, None]).long())))
    ties = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, Hkv * G if i == 0 else Hkv, Sq if i == 0 else Sk, D, generator=g) for i in range(3))
    bias = (torch.randint(0, 3, (B, Hkv, Sk), generator=g).float() * 0.5 + 1) if ties else torch.rand(B, Hkv, Sk, generator=g) * 3
    return q, k, v, bias, W, am


# ---------- the mask ----------

@FAST
@given(p=problems(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_mask_matches_reference(p, dtype):
    q, k, v, bias, W, am = p
    bias = bias.to(dtype)   # tie-heavy biases are exact in every dtype
    keep = dynamic_mask(bias, q.shape[2], W, am)
    assert torch.equal(keep, mask_ref(bias, q.shape[2], W, am))
    visible = mask_ref(torch.zeros_like(bias), q.shape[2], None, am).sum(-1)
    assert torch.equal(keep.sum(-1), visible if W is None else visible.clamp(max=W))


@FAST
@given(p=problems())
def test_mask_invariant_under_monotone_bias_transform(p):
    q, k, v, bias, W, am = p
    Sq = q.shape[2]
    assert torch.equal(dynamic_mask(bias, Sq, W, am), dynamic_mask(torch.exp(2 * bias) + 5, Sq, W, am))


@pytest.mark.parametrize('Sq,Sk,W,pad', [(16, 16, 4, 0), (16, 16, 4, 5), (1, 30, 7, 3), (6, 20, 1, 0), (10, 10, 10, 2)])
def test_equal_biases_give_sliding_window_over_real_tokens(Sq, Sk, W, pad):
    am = (torch.arange(Sk) >= pad).long()[None]
    keep = dynamic_mask(torch.ones(1, 1, Sk, dtype=torch.bfloat16), Sq, W, am)[0, 0]
    for i in range(Sq):
        p = Sk - Sq + i
        real = [j for j in range(pad, p + 1)]
        assert keep[i].nonzero()[:, 0].tolist() == real[-W:] if real else not keep[i].any()


# ---------- attention ----------

@FAST
@given(p=problems(), backend=st.sampled_from(['eager', 'sdpa']))
def test_attention_matches_float64_reference(p, backend):
    q, k, v, bias, W, am = p
    out = dynamic_mask_attention(q, k, v, bias, keep_window_size=W, attention_mask=am, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), attn_ref(q, k, v, bias, W, am), rtol=1e-4, atol=1e-5)


@FAST
@given(p=problems(max_s=10))
def test_eager_and_sdpa_gradients_agree(p):
    q, k, v, bias, W, am = p
    res = []
    for backend in ('eager', 'sdpa'):
        ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = dynamic_mask_attention(*ts, keep_window_size=W, attention_mask=am, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        res.append([out.detach()] + [t.grad for t in ts])
    for a, b in zip(*res):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_match_float64_reference_with_gradcheck():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 5, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g)
    bias = torch.rand(1, 2, 7, generator=g) * 2
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    ts = [t.double().requires_grad_() for t in (q, k, v, bias)]
    for backend in ('eager', 'sdpa'):
        assert torch.autograd.gradcheck(
            lambda *a: dynamic_mask_attention(*a, keep_window_size=3, attention_mask=am, backend=backend), ts)


@FAST
@given(p=problems())
def test_decoding_rows_equal_prefill_rows(p):
    "Queries are the last Sq positions: a short query block reproduces the last rows of a full prefill."
    q, k, v, bias, W, am = p
    Sq, Sk = q.shape[2], k.shape[2]
    g = torch.Generator().manual_seed(0)
    q_full = torch.cat([torch.randn(q.shape[0], q.shape[1], Sk - Sq, q.shape[3], generator=g), q], 2)
    full = dynamic_mask_attention(q_full, k, v, bias, keep_window_size=W, attention_mask=am)
    part = dynamic_mask_attention(q, k, v, bias, keep_window_size=W, attention_mask=am)
    torch.testing.assert_close(part, full[:, :, Sk - Sq:], rtol=1e-5, atol=1e-6)


def test_padding_queries_are_zero_with_zero_finite_gradients():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 1, 6, 8, generator=g),
          torch.randn(2, 1, 6, 8, generator=g), torch.rand(2, 1, 6, generator=g)]
    am = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])   # one row entirely padding
    for backend in ('eager', 'sdpa'):
        xs = [t.clone().requires_grad_() for t in ts]
        out = dynamic_mask_attention(*xs, keep_window_size=2, attention_mask=am, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :, :2], torch.zeros(2, 2, 8))
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in xs)
        assert torch.equal(xs[0].grad[0], torch.zeros_like(xs[0].grad[0]))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('backend', ['eager', 'sdpa'])
def test_low_precision_close_to_fp32(dtype, backend):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(2, 4, 16, 32, generator=g), torch.randn(2, 2, 16, 32, generator=g),
          torch.randn(2, 2, 16, 32, generator=g), torch.rand(2, 2, 16, generator=g) * 2]
    low = [t.to(dtype) for t in ts]
    am = torch.tensor([[1] * 16, [0] * 3 + [1] * 13])
    out = dynamic_mask_attention(*low, keep_window_size=5, attention_mask=am, backend=backend)
    ref = dynamic_mask_attention(*[t.float() for t in low], keep_window_size=5, attention_mask=am)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_scaling_argument():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    bias = torch.rand(1, 2, 5, generator=g)
    for backend in ('eager', 'sdpa'):
        out = dynamic_mask_attention(q, k, v, bias, scaling=0.9, keep_window_size=3, backend=backend)
        torch.testing.assert_close(out.double(), attn_ref(q, k, v, bias, 3, scaling=0.9), rtol=1e-5, atol=1e-6)


# ---------- bias and transformers parity ----------

def _hf_attention(H, Hkv, W, seed):
    cfg = DogeConfig(hidden_size=16 * H, num_attention_heads=H, num_key_value_heads=Hkv, keep_window_size=W,
                     max_position_embeddings=64, attn_implementation='eager')
    torch.manual_seed(seed)
    attn = hf.DogeAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        attn.A.uniform_(-2, 2)   # nonzero A: distinct biases, so top-k ties do not arise
        attn.q_norm.weight.uniform_(0.5, 1.5); attn.k_norm.weight.uniform_(0.5, 1.5)
    return cfg, attn


@pytest.mark.parametrize('H,Hkv,W,S', [(2, 2, 5, 12), (4, 2, 3, 16), (4, 1, 8, 9), (2, 1, 32, 10)])
def test_dynamic_bias_matches_transformers(H, Hkv, W, S):
    cfg, attn = _hf_attention(H, Hkv, W, seed=H + S)
    x = torch.randn(2, S, cfg.hidden_size)
    v = attn.v_proj(x).view(2, S, -1, 16).transpose(1, 2)       # [B, Hkv, S, D] as inside DogeAttention
    expected = torch.exp(attn.A * F.softplus(attn.dt_proj(v.transpose(1, 2).reshape(2, S, -1)))).transpose(-1, -2)
    # equal to rounding: ours sums each row on its own (see the next test), transformers uses a matrix product
    torch.testing.assert_close(dynamic_bias(v, attn.dt_proj.weight, attn.A), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(dynamic_bias(attn.v_proj(x), attn.dt_proj.weight, attn.A), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize('Hkv,D,S', [(1, 128, 4096), (3, 64, 777), (2, 16, 33)])
def test_dynamic_bias_of_a_key_depends_on_its_value_only(Hkv, D, S):
    "Bit for bit: a key's bias is the same whether it is computed alone, in a batch of keys, or with other rows."
    g = torch.Generator().manual_seed(S)
    v, w, A = torch.randn(2, S, Hkv * D, generator=g), torch.randn(Hkv, Hkv * D, generator=g) * 0.1, torch.randn(Hkv, generator=g)
    v[1, 5] = v[0, 3]   # a repeated value vector (a repeated token in layer 0) must tie exactly
    full = dynamic_bias(v, w, A)
    for b, j in [(0, 0), (0, S - 1), (1, 5), (0, S // 2)]:
        assert torch.equal(dynamic_bias(v[b:b + 1, j:j + 1], w, A)[0, :, 0], full[b, :, j])
    assert torch.equal(full[1, :, 5], full[0, :, 3])
    assert torch.equal(dynamic_bias(v[:, :S // 3], w, A), full[:, :, :S // 3])


@pytest.mark.parametrize('H,Hkv,W,S', [(2, 2, 5, 12), (4, 2, 3, 16), (4, 1, 8, 9), (2, 1, 32, 10)])
@pytest.mark.parametrize('backend', ['eager', 'sdpa'])
def test_full_attention_layer_matches_transformers(H, Hkv, W, S, backend):
    cfg, attn = _hf_attention(H, Hkv, W, seed=H * S)
    rope = DogeRotaryEmbedding.from_config(cfg)
    x = torch.randn(2, S, cfg.hidden_size)
    pe = rope(x, torch.arange(S)[None])
    causal = torch.zeros(S, S).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = attn(x, position_embeddings=pe, attention_mask=causal[None, None])[0]
        qn, kn = RMSNorm(16), RMSNorm(16)
        qn.load_state_dict(attn.q_norm.state_dict()); kn.load_state_dict(attn.k_norm.state_dict())
        q = qn(attn.q_proj(x).view(2, S, -1, 16)).transpose(1, 2)
        k = kn(attn.k_proj(x).view(2, S, -1, 16)).transpose(1, 2)
        v = attn.v_proj(x).view(2, S, -1, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        o = dynamic_mask_attention(q, k, v, dynamic_bias(v, attn.dt_proj.weight, attn.A), keep_window_size=W,
                                   backend=backend)
        ours = attn.o_proj(o.transpose(1, 2).reshape(2, S, -1))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@FAST
@given(S=st.integers(2, 14), W=st.integers(1, 16), pad=st.integers(0, 5), seed=st.integers(0, 999))
def test_kept_set_matches_transformers_for_distinct_biases(S, W, pad, seed):
    "With distinct biases (no ties) the visible set equals transformers' prepare_dynamic_mask, padding included."
    _, attn = _hf_attention(2, 1, W, seed=0)
    bias = torch.randperm(2 * S, generator=torch.Generator().manual_seed(seed))[:S].float().view(1, 1, S) / S + 0.5
    am = (torch.arange(S) >= min(pad, S)).long()[None]
    allowed = torch.ones(S, S, dtype=torch.bool).tril() & am.bool()[:, None, :]
    add = torch.zeros(1, 1, S, S).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    m = attn.prepare_dynamic_mask(torch.zeros(1, S, 1), bias, keep_window_size=W, attention_mask=add)
    assert torch.equal(m > torch.finfo(torch.float32).min, dynamic_mask(bias, S, W, am))


# ---------- backends and errors ----------

def test_triton_backend_dispatches_lazily(monkeypatch):
    seen = {}
    def fake(query, key, value, bias, *, keep_window_size=None, attention_mask=None, scaling=None):
        seen.update(W=keep_window_size, am=attention_mask, scaling=scaling)
        return torch.zeros_like(query)
    mod = types.ModuleType('small_doge.kernels.dmattn'); mod.dmattn_triton = fake
    monkeypatch.setitem(sys.modules, 'small_doge.kernels.dmattn', mod)
    q = torch.randn(1, 2, 4, 8); kv = torch.randn(1, 1, 4, 8); am = torch.ones(1, 4)
    out = dynamic_mask_attention(q, kv, kv, torch.ones(1, 1, 4), keep_window_size=3, attention_mask=am,
                                 scaling=0.3, backend='triton')
    assert out.shape == q.shape and seen['W'] == 3 and seen['am'] is am and seen['scaling'] == 0.3


def test_triton_backend_missing_module_is_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'small_doge.kernels.dmattn', None)   # import of it raises ImportError
    q = torch.randn(1, 2, 4, 8); kv = torch.randn(1, 1, 4, 8)
    with pytest.raises(ConfigError, match='triton'):
        dynamic_mask_attention(q, kv, kv, torch.ones(1, 1, 4), backend='triton')


def _good():
    return torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.rand(2, 2, 6)


@pytest.mark.parametrize('mutate,exc,msg', [
    (lambda q, k, v, b, kw: (q, k, v, b, dict(kw, backend='flash')), ConfigError, 'unknown attention backend'),
    (lambda q, k, v, b, kw: (q[:, :3], k, v, b, kw), ConfigError, 'multiple of key/value heads'),
    (lambda q, k, v, b, kw: (q, k, v, b[..., :5], kw), ValueError, r'bias must be \[B, Hkv, Sk\]'),
    (lambda q, k, v, b, kw: (q, k, v, b, dict(kw, attention_mask=torch.ones(2, 5))), ValueError, 'attention_mask must be'),
    (lambda q, k, v, b, kw: (q, k[:, :, :4], v[:, :, :4], b[..., :4], kw), ValueError, 'more queries'),
    (lambda q, k, v, b, kw: (q, k, v[:, :, :5], b, kw), ValueError, 'value'),
    (lambda q, k, v, b, kw: (q[..., :4], k, v, b, kw), ValueError, 'head_dim'),
    (lambda q, k, v, b, kw: (q.double(), k, v, b, kw), ValueError, 'dtypes differ'),
    (lambda q, k, v, b, kw: (q, k, v, b, dict(kw, keep_window_size=0)), ConfigError, 'keep_window_size'),
    (lambda q, k, v, b, kw: (q, k, v, b, dict(kw, keep_window_size=2.5)), ConfigError, 'keep_window_size'),
    (lambda q, k, v, b, kw: (q[0], k, v, b, kw), ValueError, 'query must be 4-D'),
])
def test_input_validation(mutate, exc, msg):
    q, k, v, b, kw = mutate(*_good(), {})
    with pytest.raises(exc, match=msg):
        dynamic_mask_attention(q, k, v, b, **kw)
