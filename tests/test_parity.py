"""Parity of small_doge's Doge with transformers' native `doge` model: checkpoints both ways, logits, MoE, aux loss.

transformers' eager Doge has two quirks this file works around (and documents):
- top-k window ties: biases of keys with identical value vectors (a repeated token in layer 0) tie exactly, and
  transformers breaks them with `torch.topk` (unspecified order) while we keep the later key. Sequences here use
  distinct tokens, so no bias ties exist and both must agree to float precision.
- CDMoE routing: transformers' `router_logits.view(2, B*L, K)` mixes the logits of different tokens, so its MoE is
  only right for one token per forward. MoE parity is checked on single tokens (and token-by-token decoding).
- padded query rows (pure padding) differ (ours outputs zeros there); only real positions are compared.
"""
import pytest
import torch
import transformers
from transformers import DogeConfig as HFDogeConfig, DogeForCausalLM as HFDogeForCausalLM
from transformers.cache_utils import DynamicCache

from small_doge.doge import DOGE_PRESETS, DogeConfig, DogeForCausalLM

transformers.logging.disable_progress_bar()
TOL = 1e-5
W = 8  # keep_window_size of the test configs


def _kw(**over):
    return dict(DOGE_PRESETS['tiny'], keep_window_size=W, **over)


def _perturb(model, seed):
    "Non-trivial values where init is trivial: A != 0, residual scales and norm gains away from 1."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('.A'): p.copy_(torch.empty_like(p).uniform_(-2, 2, generator=g))
            elif n.endswith(('residual', 'norm.weight', 'layernorm.weight')):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
    return model


def _native(seed=0, **over):
    torch.manual_seed(seed)
    return _perturb(HFDogeForCausalLM(HFDogeConfig(**_kw(**over), attn_implementation='eager')), seed).eval()


def _distinct_ids(batch, length, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(batch)])


@pytest.fixture(scope='module')
def native_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('native')
    native = _native()
    native.save_pretrained(d)
    return d, native


def test_native_checkpoint_loads_into_ours(native_dir):
    d, native = native_dir
    ours, info = DogeForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    assert ours.model.layers[0].self_attn.A.abs().min() > 0   # the non-trivial A came through
    ours.eval()
    for length in (W - 3, 5 * W):   # shorter and longer than keep_window_size
        ids = _distinct_ids(2, length, seed=length)
        with torch.no_grad(): diff = (ours(ids).logits - native(ids).logits).abs().max().item()
        print(f'native->ours L={length}: max |dlogit| = {diff:.2e}')
        assert diff < TOL


@pytest.mark.parametrize('tied', [True, False])
def test_our_checkpoint_loads_into_native(tmp_path, tied):
    torch.manual_seed(1)
    ours = _perturb(DogeForCausalLM(DogeConfig(**_kw(tie_word_embeddings=tied))), 1).eval()
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ours.save_pretrained(tmp_path)
    native, info = HFDogeForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation='eager')
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    assert set(native.state_dict()) == set(ours.state_dict())
    assert torch.equal(native.lm_head.weight, ours.lm_head.weight)
    native.eval()
    for length in (W - 1, 4 * W + 3):
        ids = _distinct_ids(2, length, seed=100 + length)
        with torch.no_grad(): diff = (ours(ids).logits - native(ids).logits).abs().max().item()
        print(f'ours->native L={length}: max |dlogit| = {diff:.2e}')
        assert diff < TOL


@pytest.mark.parametrize('side', ['left', 'right'])
@pytest.mark.parametrize('length', [W - 2, 4 * W])
def test_padding_parity(native_dir, side, length):
    d, native = native_dir
    ours = DogeForCausalLM.from_pretrained(d).eval()
    ids = _distinct_ids(3, length, seed=7)
    mask = torch.ones_like(ids)
    pads = torch.tensor([0, 3, length // 2])
    for b, n in enumerate(pads.tolist()):
        if n == 0: continue
        if side == 'left': mask[b, :n] = 0
        else: mask[b, length - n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)   # what generate() passes: real tokens count from 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        b = native(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    diff = (a - b)[real].abs().max().item()
    print(f'padding {side} L={length}: max |dlogit| on real tokens = {diff:.2e}')
    assert diff < TOL


def test_sdpa_backend_matches_eager():
    torch.manual_seed(2)
    eager = _perturb(DogeForCausalLM(DogeConfig(**_kw())), 2).eval()
    sdpa = DogeForCausalLM(DogeConfig(**_kw(attn_backend='sdpa'))).eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = _distinct_ids(2, 5 * W, seed=3)
    mask = torch.ones_like(ids); mask[1, :4] = 0
    with torch.no_grad():
        diff = (eager(ids, attention_mask=mask).logits - sdpa(ids, attention_mask=mask).logits)[mask.bool()]
    print(f'sdpa vs eager: max |dlogit| = {diff.abs().max().item():.2e}')
    assert diff.abs().max().item() < TOL


MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=4)


def test_moe_parity_single_token_and_stepwise(tmp_path):
    native = _native(seed=3, **MOE)
    native.save_pretrained(tmp_path)
    ours, info = DogeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']
    ours.eval()
    ids = _distinct_ids(1, 3 * W, seed=4)
    with torch.no_grad():
        # one token per forward: transformers' routing is correct there
        diff1 = (ours(ids[:, :1]).logits - native(ids[:, :1]).logits).abs().max().item()
        # token-by-token decoding with transformers' cache = our single full forward
        cache, steps = DynamicCache(), []
        for t in range(ids.shape[1]):
            steps.append(native(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        diff2 = (torch.cat(steps, 1) - ours(ids).logits).abs().max().item()
        # and a full forward of transformers differs (its router mixes tokens): documents the upstream bug
        bug = (native(ids).logits - ours(ids).logits).abs().max().item()
    print(f'MoE single token: {diff1:.2e}; native stepwise vs ours full: {diff2:.2e}; native full (bug): {bug:.2e}')
    assert diff1 < TOL and diff2 < TOL
    assert bug > 1e-3


def test_moe_aux_loss_matches_native_single_token(tmp_path):
    native = _native(seed=5, **MOE)
    ours = DogeForCausalLM(DogeConfig(**_kw(**MOE))).eval()
    ours.load_state_dict(native.state_dict())
    ids = torch.tensor([[17]])
    with torch.no_grad():
        a = ours(ids, output_router_logits=True).aux_loss
        b = native(ids, output_router_logits=True).aux_loss
    assert torch.allclose(a, b, atol=1e-6), (a, b)


def test_moe_gradients_match_native_single_token():
    native = _native(seed=6, **MOE).train()
    ours = DogeForCausalLM(DogeConfig(**_kw(**MOE))).train()
    ours.load_state_dict(native.state_dict())
    ids = torch.tensor([[5]])
    for m in (native, ours):
        m.zero_grad(); m(ids, use_cache=False).logits.square().sum().backward()
    g_ours = dict(ours.named_parameters())
    n = 0
    for name, p in native.named_parameters():
        if p.grad is None: continue
        assert torch.allclose(p.grad, g_ours[name].grad, atol=1e-5, rtol=1e-4), name
        n += 1
    assert n > 10


def test_auto_classes_keep_native_doge_and_load_ours(native_dir, tmp_path):
    """Registering small_doge must not hijack transformers' own `doge`. Our dense checkpoints are saved as `doge` (so
    Auto gives transformers' class, with the same weights); our MoE ones as `small_doge` (Auto gives ours)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d, _ = native_dir
    assert type(AutoModelForCausalLM.from_pretrained(d)) is HFDogeForCausalLM
    assert type(AutoConfig.for_model('doge')) is HFDogeConfig
    assert type(AutoModelForCausalLM.from_config(HFDogeConfig(**_kw()))) is HFDogeForCausalLM
    assert type(AutoModelForCausalLM.from_config(DogeConfig(**_kw()))) is DogeForCausalLM
    for kw, cls in ((_kw(), HFDogeForCausalLM), (_kw(**MOE), DogeForCausalLM)):
        ours = DogeForCausalLM(DogeConfig(**kw))
        ours.save_pretrained(tmp_path/cls.__module__)
        back = AutoModelForCausalLM.from_pretrained(tmp_path/cls.__module__)
        assert type(back) is cls
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
