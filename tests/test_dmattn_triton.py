"Triton Dynamic Mask Attention (small_doge.kernels.dmattn) against the eager reference, in Triton's interpreter on CPU."
import os, subprocess, sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')   # before triton is imported
pytest.importorskip('triton')
from hypothesis import given, settings, HealthCheck, strategies as st

from small_doge.attention import dynamic_mask, dynamic_mask_attention
from small_doge.kernels.dmattn import dmattn_triton, drop_rows, first_keys, key_ranks

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
REPO = Path(__file__).resolve().parents[1]


def kept_from_drop_rows(drop, Sq):
    Sk = drop.shape[-1]
    p = torch.arange(Sk - Sq, Sk, device=drop.device)[:, None]
    j = torch.arange(Sk, device=drop.device)
    return (j <= p) & (p < drop[..., None, :])


def make_bias(kind, B, Hkv, S, gen):
    if kind == 'ties': return torch.ones(B, Hkv, S)
    if kind == 'few': return torch.randint(0, 3, (B, Hkv, S), generator=gen).float()
    return torch.randn(B, Hkv, S, generator=gen)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S=st.integers(1, 60), W=st.integers(1, 20), Sq_frac=st.floats(0, 1), kind=st.sampled_from(['rand', 'ties', 'few']),
       pad=st.booleans(), seed=st.integers(0, 2**16))
def test_drop_rows_are_the_reference_mask(S, W, Sq_frac, kind, pad, seed):
    "Key j is kept exactly for rows j <= p < d_j: the [j, d_j) claim, checked against the reference boolean mask."
    gen = torch.Generator().manual_seed(seed)
    bias = make_bias(kind, 2, 2, S, gen)
    am = (torch.rand(2, S, generator=gen) > 0.3).long() if pad else None
    Sq = max(1, round(Sq_frac * S))
    drop = drop_rows(bias.to(DEVICE), W, None if am is None else am.to(DEVICE), n_queries=Sq).cpu()
    assert torch.equal(kept_from_drop_rows(drop, Sq), dynamic_mask(bias, Sq, W, am))


def test_key_ranks_and_first_keys():
    test_bias = torch.tensor([[[0.5, 2.0, 0.5, 1.0]]])
    assert key_ranks(test_bias).tolist() == [[[3, 0, 2, 1]]]
    assert key_ranks(torch.ones(1, 1, 4), torch.tensor([[1, 0, 1, 1]])).tolist() == [[[2, 3, 1, 0]]]
    drop = drop_rows(torch.randn(2, 2, 45, device=DEVICE), 5, (torch.rand(2, 45, device=DEVICE) > .2).long()).cpu()
    j, p = torch.arange(45), torch.arange(45)[:, None]
    brute = torch.where((drop[..., None, :] > p) & (drop[..., None, :] > j), j, 45).amin(-1)
    assert torch.equal(first_keys(drop), brute.int())
    assert drop_rows(torch.ones(1, 1, 12, device=DEVICE), 4).cpu().tolist() == [[[4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12, 12]]]


def run_both(B, H, Hkv, Sq, Sk, D, W=None, pad=None, dtype=torch.float32, ties=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype).requires_grad_()
    q, k, v = mk(B, H, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)
    bias = (torch.ones(B, Hkv, Sk) if ties else torch.randn(B, Hkv, Sk, generator=gen)).to(DEVICE, dtype).requires_grad_()
    do = torch.randn(B, H, Sq, D, generator=gen).to(DEVICE, dtype)
    pad = None if pad is None else pad.to(DEVICE)
    res = []
    for attn in (dynamic_mask_attention, dmattn_triton):
        o = attn(q, k, v, bias, keep_window_size=W, attention_mask=pad)
        res.append([o, *torch.autograd.grad(o, (q, k, v, bias), do)])
    return res


def max_rel_err(res):
    return {n: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()
            for n, a, b in zip(('out', 'dq', 'dk', 'dv', 'dbias'), *res)}


def _pad(B, S, runs):
    am = torch.ones(B, S, dtype=torch.long)
    for b, lo, hi in runs: am[b, lo:hi] = 0
    return am

CASES = {
    'prefill-window': dict(B=1, H=2, Hkv=1, Sq=45, Sk=45, D=16, W=7),
    'gqa-padding-blank-tiles': dict(B=2, H=4, Hkv=2, Sq=45, Sk=45, D=16, W=6, pad=_pad(2, 45, [(0, 0, 35), (1, 3, 7)])),
    'sq<sk': dict(B=2, H=4, Hkv=2, Sq=13, Sk=45, D=32, W=9, pad=_pad(2, 45, [(0, 0, 20)])),
    'decode': dict(B=2, H=4, Hkv=1, Sq=1, Sk=50, D=16, W=8, pad=_pad(2, 50, [(1, 0, 10)])),
    'decode-no-window': dict(B=1, H=2, Hkv=2, Sq=1, Sk=33, D=16, W=None),
    'ties-sliding-window': dict(B=1, H=2, Hkv=2, Sq=40, Sk=40, D=16, W=5, ties=True),
    'no-window-padding': dict(B=2, H=2, Hkv=1, Sq=45, Sk=45, D=16, W=None, pad=_pad(2, 45, [(0, 0, 17)])),
    'window>=S-odd-dim': dict(B=1, H=2, Hkv=1, Sq=30, Sk=30, D=24, W=64),
    'window=1': dict(B=1, H=2, Hkv=1, Sq=20, Sk=20, D=16, W=1),
    'all-padding-row-block': dict(B=1, H=1, Hkv=1, Sq=33, Sk=33, D=16, W=4, pad=_pad(1, 33, [(0, 0, 33)])),
}

@pytest.mark.parametrize('name', list(CASES))
def test_forward_and_gradients_match_eager_fp32(name):
    errs = max_rel_err(run_both(**CASES[name]))
    assert max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    errs = max_rel_err(run_both(B=1, H=4, Hkv=2, Sq=33, Sk=33, D=16, W=5, dtype=dtype,
                                pad=_pad(1, 33, [(0, 0, 4)])))
    assert max(errs.values()) <= tol, errs


def test_strided_inputs_and_backend():
    q = torch.randn(1, 29, 4, 16, device=DEVICE).transpose(1, 2)
    k, v = (torch.randn(1, 29, 2, 16, device=DEVICE).transpose(1, 2) for _ in range(2))
    bias = torch.randn(1, 29, 2, device=DEVICE).transpose(1, 2)
    ref = dynamic_mask_attention(q, k, v, bias, keep_window_size=6)
    torch.testing.assert_close(dynamic_mask_attention(q, k, v, bias, keep_window_size=6, backend='triton'), ref,
                               atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem():
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match='bias must be'): dmattn_triton(q, k, v, torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match='head_dim'): dmattn_triton(q, k, torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match='keep_window_size'): dmattn_triton(q, k, v, torch.randn(1, 1, 8), keep_window_size=0)


def test_doge_model_logits_match_eager():
    doge = pytest.importorskip('small_doge.doge')
    torch.manual_seed(0)
    cfg = doge.DogeConfig.from_preset('tiny', attn_backend='eager')
    model = doge.DogeForCausalLM(cfg).to(DEVICE).eval()
    with torch.no_grad():
        for layer in model.model.layers: layer.self_attn.A.uniform_(-2, 2)   # break the ties: a real top-W choice
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    am = torch.ones(2, 24, dtype=torch.long, device=DEVICE); am[1, :5] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        model.config.attn_backend = 'triton'
        out = model(ids, attention_mask=am).logits
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], atol=1e-4, rtol=1e-4)


def test_doge_model_training_step_grads_match_eager():
    doge = pytest.importorskip('small_doge.doge')
    torch.manual_seed(0)
    cfg = doge.DogeConfig.from_preset('tiny', attn_backend='eager', num_hidden_layers=1)
    model = doge.DogeForCausalLM(cfg).to(DEVICE)
    with torch.no_grad(): model.model.layers[0].self_attn.A.fill_(-1.0)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), device=DEVICE)
    grads = []
    for backend in ('eager', 'triton'):
        model.config.attn_backend = backend
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]: torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-3, msg=n)


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / 'results.md'
    env = {**os.environ, 'TRITON_INTERPRET': '1'}
    r = subprocess.run([sys.executable, str(REPO / 'kernels' / 'bench_dmattn.py'), '--cpu-smoke', '--out', str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    assert '| triton |' in text and 'correctness' in text and 'interpreter' in text


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Sk=st.integers(1, 40), sq_frac=st.floats(0, 1), W=st.one_of(st.none(), st.integers(1, 24)),
       groups=st.sampled_from([(1, 1), (2, 1), (4, 2)]), pad=st.booleans(), ties=st.booleans(), seed=st.integers(0, 99))
def test_random_shapes_match_eager(Sk, sq_frac, W, groups, pad, ties, seed):
    "Forward and gradients over random tiny shapes: odd lengths, Sq <= Sk, GQA, padding, any window."
    H, Hkv = groups
    Sq = max(1, round(sq_frac * Sk))
    am = (torch.rand(2, Sk, generator=torch.Generator().manual_seed(seed)) > 0.3).long() if pad else None
    errs = max_rel_err(run_both(B=2, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=16, W=W, pad=am, ties=ties, seed=seed))
    assert max(errs.values()) <= 1e-4, errs


def test_kernels_compile_for_h100_without_a_gpu():
    "The compiled (GPU) path: Triton compiles the kernels for sm_90 and ptxas assembles them, no device needed."
    pytest.importorskip('triton.backends.nvidia.compiler')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    r = subprocess.run([sys.executable, str(REPO / 'kernels' / 'bench_dmattn.py'), '--compile-check', '16bit:128'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'compiled 4 kernels for sm_90' in r.stdout
