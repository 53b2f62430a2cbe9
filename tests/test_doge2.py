"""Doge2 upcycling (lesson 09) on tiny random Llamas: exact conversion, clear errors, the phased warm-up (each phase
trains exactly its parameters, boundaries, resume mid-phase), the factorised aux loss and routing memory."""
import json, math

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings, strategies as st
from transformers import DogeForCausalLM as HFDogeForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers import TrainerCallback

from small_doge.core import CheckpointError, ConfigError
from small_doge.doge import DogeConfig, DogeForCausalLM
from small_doge.doge2 import (PhasedWarmup, TensorTracker, UpcycleRecipe, _DropFrozenGrads, llama_to_doge,
                              phase_trains, upcycle)
from small_doge.moe import expert_logits, load_balancing_loss, product_key_topk
from small_doge.pretrain import WSDTrainer, collate_blocks


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters=dict(rope_type='default', rope_theta=100000.0))
    return LlamaForCausalLM(LlamaConfig(**{**base, **kw})).eval()


def without_qk_norm(doge):
    for layer in doge.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity(); layer.self_attn.k_norm = torch.nn.Identity()
    return doge


@pytest.mark.parametrize('tied', [True, False])
@pytest.mark.parametrize('heads', [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize('rope', [dict(rope_type='default', rope_theta=1e5), dict(rope_type='dynamic', factor=2.0, rope_theta=1e4)])
def test_conversion_is_exact_but_for_qk_norm(tied, heads, rope):
    llama = tiny_llama(tie_word_embeddings=tied, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                       rope_parameters=rope)
    doge = llama_to_doge(llama, num_experts=16, num_experts_per_tok=4)
    state = doge.state_dict()
    for name, t in llama.state_dict().items():   # every Llama tensor, bit for bit, under its own name
        assert torch.equal(state[name], t), name
    assert (doge.lm_head.weight is doge.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = llama(ids).logits
        dense = llama_to_doge(llama, num_experts=None)
        assert torch.allclose(doge(ids).logits, dense(ids).logits, atol=1e-5)        # up_embed = 0: experts silent
        assert not torch.allclose(doge(ids).logits, ref, atol=1e-3)                  # q/k RMSNorm changes attention
        assert torch.allclose(without_qk_norm(doge)(ids).logits, ref, atol=1e-4)      # ... and nothing else does


def test_new_parameters_start_where_the_lesson_says():
    doge = llama_to_doge(tiny_llama(), num_experts=16, num_experts_per_tok=4)
    for layer in doge.model.layers:
        assert torch.equal(layer.self_attn.A, torch.zeros(2))
        assert torch.equal(layer.input_residual, torch.ones(64)) and torch.equal(layer.post_attention_residual, torch.ones(64))
        assert torch.equal(layer.mlp.up_embed.weight, torch.zeros(16, 64))
        assert layer.self_attn.dt_proj.weight.abs().min() > 0   # A's gradient needs it non-zero
        assert torch.equal(layer.self_attn.q_norm.weight, torch.ones(16))
    assert doge.config.keep_window_size == 128   # the source's max positions: no key is ever dropped


def test_calibration_fits_the_llamas_query_and_key_lengths():
    llama = tiny_llama()
    calib = torch.randint(0, 256, (4, 48))
    doge = llama_to_doge(llama, num_experts=None, calibration_ids=calib)
    q = {}
    h = llama.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: q.setdefault('q', o))
    with torch.no_grad(): llama(calib)
    h.remove()
    x = q['q'].double().reshape(-1, 16)
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    gain = doge.model.layers[1].self_attn.q_norm.weight.double()
    fitted = ((x / rms * gain - x) ** 2).sum()
    for other in (gain * 1.05, gain * 0.95, torch.ones_like(gain)):   # a least-squares optimum: any other gain is worse
        assert fitted < ((x / rms * other - x) ** 2).sum()


def test_round_trip_and_native_doge(tmp_path):
    llama = tiny_llama(tie_word_embeddings=False)
    ids = torch.randint(0, 256, (2, 30))
    moe = llama_to_doge(llama, num_experts=16, num_experts_per_tok=4, calibration_ids=ids)
    moe.save_pretrained(tmp_path/'moe')
    back = DogeForCausalLM.from_pretrained(tmp_path/'moe').eval()
    drop = lambda c: {k: v for k, v in c.to_dict().items() if k != '_name_or_path'}
    assert drop(back.config) == drop(moe.config)
    for k, v in moe.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k
    dense = llama_to_doge(llama, num_experts=0, calibration_ids=ids)
    dense.save_pretrained(tmp_path/'dense')
    native, info = HFDogeForCausalLM.from_pretrained(tmp_path/'dense', output_loading_info=True, attn_implementation='eager')
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    with torch.no_grad():
        assert torch.allclose(native.eval()(ids).logits, dense(ids).logits, atol=1e-4)


def test_bad_input_gives_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match='not found'): llama_to_doge(tmp_path/'nowhere')
    (tmp_path/'empty').mkdir()
    with pytest.raises(CheckpointError, match='no config.json .* no .gguf'): llama_to_doge(tmp_path/'empty')
    (tmp_path/'two').mkdir(); (tmp_path/'two'/'a.gguf').write_bytes(b''); (tmp_path/'two'/'b.gguf').write_bytes(b'')
    with pytest.raises(CheckpointError, match='2 .gguf files'): llama_to_doge(tmp_path/'two')
    (tmp_path/'w.bin').write_bytes(b'x')
    with pytest.raises(CheckpointError, match='not .gguf'): llama_to_doge(tmp_path/'w.bin')
    (tmp_path/'bad.gguf').write_bytes(b'not gguf at all')
    with pytest.raises(CheckpointError, match='could not load'): llama_to_doge(tmp_path/'bad.gguf')
    for mt in ('gpt2', 'qwen2'):
        (tmp_path/mt).mkdir(); (tmp_path/mt/'config.json').write_text(json.dumps({'model_type': mt}))
        with pytest.raises(CheckpointError, match=f"'{mt}' model, not a Llama"): llama_to_doge(tmp_path/mt)
    with pytest.raises(ConfigError, match='not a multiple of num_key_value_heads'): llama_to_doge(tiny_llama(num_key_value_heads=3))
    with pytest.raises(ConfigError, match='head_dim = hidden_size'): llama_to_doge(tiny_llama(head_dim=32))
    with pytest.raises(ConfigError, match='attention_bias'): llama_to_doge(tiny_llama(attention_bias=True))
    with pytest.raises(ConfigError, match='perfect square'): llama_to_doge(tiny_llama(), num_experts=10)
    # a saved Llama whose weights are missing
    tiny_llama().config.save_pretrained(tmp_path/'noweights')
    with pytest.raises(CheckpointError, match='could not load'): llama_to_doge(tmp_path/'noweights')


def test_llama3_rope_converts_and_unknown_rope_type_is_an_error():
    "Doge's RoPE takes every transformers rope type (issue 11): a llama3-scaled Llama converts exactly, positions past the original window included."
    llama3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=32, rope_theta=1e4)
    source = tiny_llama(rope_parameters=llama3)
    doge = llama_to_doge(source, num_experts=None)
    assert doge.config.rope_parameters['rope_type'] == 'llama3'
    for layer in doge.model.layers: layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    ids = torch.randint(0, 256, (1, 100))
    with torch.no_grad(): assert torch.allclose(doge(ids).logits, source(ids).logits, atol=1e-4)
    source.config.rope_parameters = {'rope_type': 'bogus', 'rope_theta': 1e4}
    with pytest.raises(ConfigError, match="rope_type 'bogus' has no Doge equivalent"): llama_to_doge(source)


def test_cli_style_recipe_errors_come_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match='3 non-negative ints'): upcycle(UpcycleRecipe(warmup_phase_steps=[1, 2, 3, 4]))
    with pytest.raises(CheckpointError, match='not found'): upcycle(UpcycleRecipe(model=str(tmp_path/'nope')))


# ---------------------------------------------------------------- the phased warm-up

class Snapshots(TrainerCallback):
    def __init__(self): self.params, self.state_keys = [], []
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        names = {id(p): n for n, p in model.named_parameters()}
        self.state_keys.append({names[id(p)] for p in optimizer.state})


def trainer_for(model, callbacks, steps, out, accum=1, **kw):
    torch.manual_seed(0)
    ds = Dataset.from_dict({'input_ids': torch.randint(0, 256, (64, 24)).tolist()})
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             weight_decay=0.1, gradient_accumulation_steps=accum, save_strategy='no', report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, **kw)
    return WSDTrainer(model=model, args=args, train_dataset=ds, data_collator=collate_blocks, callbacks=callbacks,
                      wsd=dict(warmup_steps=0, decay_steps=0))


def moved_model():
    "A converted MoE away from its exact start (A, up_embed non-zero), so every parameter gets a gradient."
    model = llama_to_doge(tiny_llama(), num_experts=16, num_experts_per_tok=4, router_aux_loss_coef=0.01,
                          output_router_logits=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('.A', 'up_embed.weight')): p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize('accum', [1, 2])
def test_each_phase_trains_exactly_its_parameters(tmp_path, accum):
    model = moved_model()
    phases, snaps = PhasedWarmup([2, 1, 1]), Snapshots()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer_for(model, [phases, snaps], 5, tmp_path, accum=accum).train()
    trained = set()
    for step, (before, after) in enumerate(zip([start] + snaps.params, snaps.params)):
        phase = phases.phase_at(step)
        expect = {n for n in after if phase_trains(n, phase)}
        assert {n for n in after if not torch.equal(before[n], after[n])} == expect, (step, phase)
        trained |= expect
        assert snaps.state_keys[step] == trained   # AdamW holds state only for parameters that have trained
    assert phases.switches == [(0, 1), (2, 2), (3, 3), (4, 4)]
    assert all(p.requires_grad for p in model.parameters())   # unfrozen again after training
    counts = [sum(phase_trains(n, p) for n in start) for p in (1, 2, 3, 4)]
    assert counts == [4 * 2, 4 * 2 + 3 * 2, 4 * 2 + 3 * 2 + 2 * 2, len(start)]


def test_phase_groups_cover_exactly_the_new_parameters():
    names = [n for n, _ in llama_to_doge(tiny_llama(), num_experts=16, num_experts_per_tok=4).named_parameters()]
    llama_names = set(tiny_llama().state_dict())
    assert {n for n in names if phase_trains(n, 3)} == {n for n in names if n not in llama_names}


def test_phase_boundaries_and_empty_phases():
    pw = PhasedWarmup([2, 0, 3])
    assert [pw.phase_at(s) for s in range(7)] == [1, 1, 3, 3, 3, 4, 4]
    assert pw.boundaries == (2, 2, 5)
    for bad in ([1, 2], [1, 2, -1], [1.5, 1, 1], [True, 1, 1], 'abc', None):
        with pytest.raises(ConfigError, match='3 non-negative ints'): PhasedWarmup(bad)


def test_drop_frozen_grads_keeps_frozen_parameters_out_of_the_optimizer():
    "Whatever writes zeros into a frozen parameter's .grad (a DDP reducer), AdamW must not decay or move it."
    model = moved_model()
    for n, p in model.named_parameters(): p.requires_grad_(phase_trains(n, 1)); p.grad = torch.zeros_like(p)
    _DropFrozenGrads().on_pre_optimizer_step(None, None, None, model=model)
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())


def test_optimizer_without_all_parameters_is_refused(tmp_path):
    model = moved_model()
    model.model.embed_tokens.weight.requires_grad_(False)   # the Trainer would leave it out of the optimizer
    with pytest.raises(ConfigError, match='optimizer lacks'):
        trainer_for(model, [PhasedWarmup([1, 1, 1])], 2, tmp_path).train()


@pytest.fixture(scope='module')
def tiny_source(tmp_path_factory):
    "A tiny Llama saved with a tokenizer trained on a slice of the standard library."
    from small_doge.data import pystdlib_corpus
    from small_doge.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp('src')
    tok = train_tokenizer(pystdlib_corpus(max_files=30)['train'], vocab_size=384)
    tiny_llama(vocab_size=len(tok), max_position_embeddings=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_recipe(src, out, **kw):
    return UpcycleRecipe(**{**dict(model=str(src), data='pystdlib', data_max_files=30, block_size=24,
                                   per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                   per_device_eval_batch_size=8, max_steps=11, warmup_phase_steps=[2, 4, 2],
                                   learning_rate=3e-3, num_experts=16, num_experts_per_tok=4, calibration_blocks=2,
                                   max_val_blocks=4, logging_steps=1, save_steps=5, disable_tqdm=True,
                                   attn_backend='sdpa', output_dir=str(out)), **kw})


class StopAt(TrainerCallback):
    def __init__(self, step): self.step = step
    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step: control.should_training_stop = True


@pytest.mark.slow   # ~220 s on the shared CPU; lesson 09's resume cell checks the same in the default run
def test_resume_mid_phase_equals_an_uninterrupted_run(tiny_source, tmp_path):
    whole = upcycle(tiny_recipe(tiny_source, tmp_path/'whole'))
    upcycle(tiny_recipe(tiny_source, tmp_path/'split'), callbacks=[StopAt(7)])   # checkpoint-5 is inside phase 2
    split = upcycle(tiny_recipe(tiny_source, tmp_path/'split', resume_from_checkpoint=True))
    assert split['resumed_from'].endswith('checkpoint-5')
    assert whole['phase_switches'] == [(0, 1), (2, 2), (6, 3), (8, 4)]
    assert split['phase_switches'] == [(5, 2), (6, 3), (8, 4)]
    a = DogeForCausalLM.from_pretrained(whole['model_dir']).state_dict()
    b = DogeForCausalLM.from_pretrained(split['model_dir']).state_dict()
    for k in a: assert torch.equal(a[k], b[k]), k
    losses = lambda r: [(h['step'], h['loss']) for h in r['log_history'] if 'loss' in h and h['step'] > 5]
    assert losses(whole) == losses(split)
    assert [s for s, _ in whole['val_history']] == [0, 2, 6, 8, 11]


def test_control_run_trains_everything_from_step_0(tiny_source, tmp_path):
    snaps = Snapshots()
    res = upcycle(tiny_recipe(tiny_source, tmp_path/'control', phased=False, max_steps=4, save_steps=None,
                              warmup_phase_steps=[1, 1, 1]), callbacks=[snaps])
    n_params = len(snaps.params[0])
    assert len(snaps.state_keys[0]) == n_params   # every parameter stepped at step 0
    assert [s for s, _ in res['val_history']] == [0, 1, 2, 3, 4]   # the phase ends are still evaluated
    assert res['phase_switches'] == [(0, 1), (1, 2), (2, 3), (3, 4)]


# ---------------------------------------------------------------- the factorised aux loss

def dense_aux_loss(layers, E, k, mask=None):
    "The formula over all experts: softmax of the [N, E] scores, f from their top-k (the lesson's first draft)."
    scores = torch.cat([expert_logits(l) for l in layers]).float()
    real = torch.ones(len(scores)) if mask is None else mask.reshape(-1).float().repeat(len(layers))
    counts = torch.zeros_like(scores).scatter_add_(-1, scores.topk(k).indices, torch.ones(len(scores), k))
    f = (counts * real[:, None]).sum(0) / (real.sum() * k)
    P = (scores.softmax(-1) * real[:, None]).sum(0) / real.sum()
    return E * (f * P).sum()


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 9), k=st.integers(1, 12), B=st.integers(1, 3), L=st.integers(1, 7), layers=st.integers(1, 3),
       seed=st.integers(0, 10**6), masked=st.booleans())
def test_factorised_aux_loss_equals_the_dense_formula(K, k, B, L, layers, seed, masked):
    E, k = K * K, min(k, K * K)
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B * L, 2 * K, generator=g, requires_grad=True) for _ in range(layers)]
    mask = (torch.rand(B, L, generator=g) > 0.3).long() if masked else None
    if mask is not None: mask[0, -1] = 1   # at least one real token
    new, old = load_balancing_loss(logits, E, k, mask), dense_aux_loss(logits, E, k, mask)
    assert torch.allclose(new, old, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(new, logits), torch.autograd.grad(old, logits)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_aux_loss_rejects_per_expert_logits():
    with pytest.raises(ValueError, match=r'2\*sqrt\(num_experts\) = 8'): load_balancing_loss(torch.zeros(5, 16), 16, 4)


def test_model_never_builds_a_tokens_by_experts_tensor():
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig.from_preset('tiny-moe', num_experts=121, num_experts_per_tok=6)).train()
    ids = torch.randint(0, 512, (1, 43))
    with TensorTracker() as tt:
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
    assert out.aux_loss is not None and out.router_logits[0].shape == (43, 22)
    assert not [s for s in tt.shapes if 43 in s and (121 in s or 43 * 121 in s)]


def test_tensor_tracker_counts_allocations_not_views():
    x = torch.randn(64, 64)
    with TensorTracker() as tt:
        y = x @ x; z = y.t(); w = y.relu(); del y, z; v = w + 1
    assert tt.peak == 2 * 64 * 64 * 4 and tt.current == 2 * 64 * 64 * 4


def test_cli_upcycle(tiny_source, tmp_path, capsys):
    from small_doge.cli import main
    from small_doge.runs import save_recipe
    recipe = save_recipe(tiny_recipe(tiny_source, tmp_path/'unused', save_steps=None), tmp_path/'tiny-upcycle.yaml')
    argv = ['upcycle', '--from', str(tiny_source), '--out', str(tmp_path/'run'), '--recipe', str(recipe),
            '--set', 'max_steps=3', '--set', 'warmup_phase_steps=[1, 1, 0]']
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index('{\n'):])
    assert result['steps'] == 3 and result['phase_switches'] == [[0, 1], [1, 2], [2, 4]]
    assert (tmp_path/'run'/'model'/'model.safetensors').is_file() and (tmp_path/'run'/'results.json').is_file()
    assert main(['upcycle', '--from', str(tmp_path/'nope'), '--out', str(tmp_path/'x'), '--recipe', str(recipe)]) == 2
    assert 'upcycle: error: model to convert not found' in capsys.readouterr().err
    assert main(['upcycle', '--from', str(tiny_source), '--out', str(tmp_path/'y'), '--recipe', 'pretrain-tiny-cpu']) == 2
    assert "not 'upcycle'" in capsys.readouterr().err
