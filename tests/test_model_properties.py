"""Reliability properties of small_doge's Doge: causality (hypothesis), cached decoding == full forward, padding,
gradient checkpointing, MoE per-token routing, and a TRL SFT smoke test (dense and MoE)."""
import functools
import tempfile

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st
from transformers.cache_utils import DynamicCache

from small_doge.doge import DOGE_PRESETS, DogeConfig, DogeForCausalLM

transformers.logging.disable_progress_bar()
VOCAB = 64


@functools.lru_cache(maxsize=None)
def model(moe: bool, window: int, backend: str = 'eager') -> DogeForCausalLM:
    "A tiny random model with A != 0 (distinct key biases), cached across examples."
    preset = 'tiny-moe' if moe else 'tiny'
    torch.manual_seed(int(moe) * 10 + window)
    m = DogeForCausalLM(DogeConfig.from_preset(preset, vocab_size=VOCAB, keep_window_size=window,
                                               attn_backend=backend)).eval()
    with torch.no_grad():
        for layer in m.model.layers: layer.self_attn.A.uniform_(-2, 2)
    return m


@settings(max_examples=30, deadline=None, derandomize=True)
@given(moe=st.booleans(), window=st.sampled_from([3, 64]), backend=st.sampled_from(['eager', 'sdpa']),
       batch=st.integers(1, 2), length=st.integers(2, 20), data=st.data())
def test_causality(moe, window, backend, batch, length, data):
    "Changing tokens after position t never changes the logits at positions <= t (window 3: top-k active)."
    m = model(moe, window, backend)
    t = data.draw(st.integers(0, length - 2), label='t')
    seed = data.draw(st.integers(0, 2 ** 16), label='seed')
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    other = ids.clone()
    other[:, t + 1:] = torch.randint(0, VOCAB, (batch, length - t - 1), generator=g)
    with torch.no_grad():
        a, b = m(ids).logits[:, :t + 1], m(other).logits[:, :t + 1]
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def _cached(m, ids, chunks, mask=None):
    cache, outs, start = DynamicCache(), [], 0
    for n in chunks:
        kw = {} if mask is None else dict(attention_mask=mask[:, :start + n],
                                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + n])
        outs.append(m(ids[:, start:start + n], past_key_values=cache, use_cache=True, **kw).logits)
        start += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize('moe', [False, True])
@pytest.mark.parametrize('chunks', [[1] * 24, [10, 1, 1, 12], [5, 19]])
def test_cached_decoding_equals_full_forward(moe, chunks):
    m = model(moe, 4)   # window 4 << 24 tokens: the top-W selection runs over cached keys
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, cached = m(ids).logits, _cached(m, ids, chunks)
    assert torch.allclose(full, cached, atol=1e-5), (full - cached).abs().max()


@pytest.mark.parametrize('moe', [False, True])
def test_cached_decoding_with_left_padding(moe):
    m = model(moe, 4)
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids); mask[0, :6] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = m(ids, attention_mask=mask, position_ids=pos).logits
        cached = _cached(m, ids, [8, 1, 1, 10], mask)
        alone = m(ids[:1, 6:]).logits   # the padded row computed without its padding
    real = mask.bool()
    assert torch.allclose(full[real], cached[real], atol=1e-5)
    assert torch.allclose(full[0, 6:], alone[0], atol=1e-5)


def test_batched_generation_matches_single():
    m = model(False, 4)
    short = torch.randint(1, VOCAB, (1, 3), generator=torch.Generator().manual_seed(3))
    long_ = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1), long_])
    mask = (torch.arange(9) >= torch.tensor([[6], [0]])).long()
    with torch.no_grad():
        both = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        a = m.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = m.generate(long_, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(both[0, 6:], a[0]) and torch.equal(both[1], b[0])


def test_moe_tokens_routed_independently():
    "Permuting or perturbing other tokens never changes a token's MoE layer output."
    mlp = model(True, 64).model.layers[0].mlp
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = mlp(x)[0]
        perm = torch.randperm(7)
        assert torch.allclose(mlp(x[:, perm])[0], base[:, perm], atol=1e-6)
        noisy = x + torch.randn_like(x); noisy[:, 3] = x[:, 3]
        assert torch.allclose(mlp(noisy)[0][:, 3], base[:, 3], atol=1e-6)


@pytest.mark.parametrize('moe', [False, True])
def test_gradient_checkpointing_same_loss_and_grads(moe):
    cfg = DogeConfig.from_preset('tiny-moe' if moe else 'tiny', vocab_size=VOCAB, keep_window_size=4,
                                 output_router_logits=moe)
    torch.manual_seed(6)
    m = DogeForCausalLM(cfg).train()
    ids = torch.randint(0, VOCAB, (2, 12))

    def run():
        m.zero_grad(); loss = m(ids, labels=ids).loss; loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    l0, g0 = run()
    m.activation_checkpointing_enable(dict(use_reentrant=False))
    l1, g1 = run()
    assert torch.allclose(l0, l1, atol=1e-6)
    for n in g0: assert torch.allclose(g0[n], g1[n], atol=1e-5), n


def test_dense_config_hides_router_switch_moe_config_has_it():
    "TRL decides 'MoE or not' by hasattr(config, 'output_router_logits')."
    assert not hasattr(DogeConfig.from_preset('tiny'), 'output_router_logits')
    assert DogeConfig.from_preset('tiny-moe').output_router_logits is False
    m = model(False, 64)
    out = m(torch.tensor([[1, 2, 3]]), output_router_logits=True)
    assert out.aux_loss is None and out.router_logits is None


def _char_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {'<pad>': 0, '<unk>': 1, '</s>': 2, **{c: i + 3 for i, c in enumerate(sorted(set(''.join(texts))))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Split('', 'isolated'), decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>', unk_token='<unk>', eos_token='</s>')


@pytest.mark.parametrize('preset', ['tiny', 'tiny-moe'])
def test_trl_sft_smoke(preset):
    "TRL's SFTTrainer trains the dense model and the MoE for two steps (TRL's aux loss off: it needs [N, E] logits, ours are [N, 2K])."
    from small_doge.sft import router_aux_loss_coef
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    texts = ['the quick brown fox jumps over the lazy dog', 'Doge is a small fast language model.'] * 4
    tok = _char_tokenizer(texts)
    m = DogeForCausalLM(DogeConfig.from_preset(preset, vocab_size=len(tok), pad_token_id=0, eos_token_id=2))
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     logging_steps=1, save_strategy='no', use_cpu=True, max_length=64, disable_tqdm=True,
                     router_aux_loss_coef=router_aux_loss_coef(m.config))
    trainer = SFTTrainer(model=m, args=args, train_dataset=Dataset.from_dict({'text': texts}), processing_class=tok)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    logged = trainer.state.log_history[0]
    assert 'aux_loss' not in logged
    out_dir = tempfile.mkdtemp()
    trainer.save_model(out_dir)   # the Trainer's save path goes through our safetensors-only save_pretrained
    back, theirs = DogeForCausalLM.from_pretrained(out_dir).state_dict(), m.state_dict()
    assert set(back) == set(theirs)
    for k in back: assert torch.equal(back[k], theirs[k].to(back[k].dtype)), k
