"""small_doge's Doge used the way transformers users use a model (issue 11): Auto classes and pipelines, checkpoints
that load without small_doge, config-driven outputs, resizing, lenient loading, attention choice, static cache, every
RoPE type, sequence classification. Each test names the behaviour it pins down; tiny presets keep them fast."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          DogeConfig as HFDogeConfig, DogeForCausalLM as HFDogeForCausalLM,
                          DogeForSequenceClassification as HFDogeForSequenceClassification)
from transformers.models.doge import modeling_doge as hf

from small_doge.core import CheckpointError, ConfigError
from small_doge.doge import (DOGE_PRESETS, REMOTE_CODE_FILE, DogeConfig, DogeForCausalLM,
                             DogeForSequenceClassification, DogeModel)
from small_doge.rope import DogeRotaryEmbedding
from test_parity import _perturb   # tests/ is on sys.path (pytest's rootdir-relative imports)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def _perturbed(model, seed=0):
    "Non-trivial weights where init is trivial (A != 0: distinct key biases), in eval mode."
    return _perturb(model, seed).eval()


def _tiny(preset='tiny', seed=0, **over):
    torch.manual_seed(seed)
    return _perturbed(DogeForCausalLM(DogeConfig.from_preset(preset, **over)), seed)


def _distinct(batch, length, vocab=512, seed=0):
    "Token ids without repeats in a row: no two keys share a bias (see the tie rule in lesson 07)."
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(batch)])


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set('abcdefghijklmnopqrstuvwxyz .,'))
    vocab = {'<pad>': 0, '<unk>': 1, '</s>': 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Split('', 'isolated'), decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>', unk_token='<unk>', eos_token='</s>')


def _run_python(code, tmp_path):
    "Run `code` in a fresh interpreter (offline, own remote-code cache); return what it printed after RESULT, as JSON."
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_MODULES_CACHE': str(tmp_path/'hf-modules'),
           'TRANSFORMERS_VERBOSITY': 'error', 'TOKENIZERS_PARALLELISM': 'false'}
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.rsplit('RESULT', 1)[-1])


# ---- checkpoints that transformers loads without small_doge --------------------------------------------------------
@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    "A dense and an MoE checkpoint saved by the course, with a tokenizer, and small_doge's greedy continuations."
    root = tmp_path_factory.mktemp('saved')
    prompt = _distinct(1, 6, seed=3)
    out = {}
    for kind, preset in (('dense', 'tiny'), ('moe', 'tiny-moe')):
        m = _tiny(preset, seed=4, keep_window_size=64)   # window > prompt + new tokens: no top-W tie to break
        m.save_pretrained(root/kind)
        _char_tokenizer().save_pretrained(root/kind)
        with torch.no_grad(): greedy = m.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        out[kind] = (root/kind, greedy[0].tolist())
    return out, prompt[0].tolist()


def test_saved_config_json_says_what_loads_it(saved):
    "Dense: transformers' own `doge` (no code saved). MoE: `small_doge` + auto_map to code saved beside the weights."
    (dense, _), (moe, _) = saved[0]['dense'], saved[0]['moe']
    d, m = json.loads((dense/'config.json').read_text()), json.loads((moe/'config.json').read_text())
    assert d['model_type'] == 'doge' and 'auto_map' not in d and not (dense/REMOTE_CODE_FILE).exists()
    assert m['model_type'] == 'small_doge' and m['auto_map']['AutoModelForCausalLM'].startswith('modeling_small_doge.')
    assert (moe/REMOTE_CODE_FILE).is_file()


def test_remote_code_imports_only_torch_transformers_and_stdlib(saved):
    "transformers' own import check of the saved module: nothing beyond what transformers itself needs."
    from transformers.dynamic_module_utils import get_imports
    moe = saved[0]['moe'][0]
    stdlib = set(sys.stdlib_module_names)
    assert {i for i in get_imports(moe/REMOTE_CODE_FILE) if i not in stdlib} <= {'torch', 'transformers', 'safetensors'}
    source = (moe/REMOTE_CODE_FILE).read_text()
    assert 'from small_doge' not in source.split('try:')[0] and 'from .' not in source


def test_checkpoints_load_and_generate_without_small_doge(saved, tmp_path):
    "A fresh Python that never imports small_doge loads both and generates small_doge's greedy tokens."
    ckpts, prompt = saved
    got = _run_python(f'''
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        prompt = torch.tensor([{prompt}])
        dense = AutoModelForCausalLM.from_pretrained({str(ckpts['dense'][0])!r}).eval()
        moe = AutoModelForCausalLM.from_pretrained({str(ckpts['moe'][0])!r}, trust_remote_code=True).eval()
        out = {{k: m.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0].tolist()
               for k, m in (('dense', dense), ('moe', moe))}}
        out['classes'] = [type(dense).__module__, type(moe).__module__]
        moe.save_pretrained('resaved')   # a remote-code model saves its own module again
        out['resaved_same_code'] = open('resaved/{REMOTE_CODE_FILE}').read() == open({str(ckpts['moe'][0]/REMOTE_CODE_FILE)!r}).read()
        again = AutoModelForCausalLM.from_pretrained('resaved', trust_remote_code=True).eval()
        out['resaved_same_logits'] = bool(torch.equal(again(prompt).logits, moe(prompt).logits))
        try: AutoModelForCausalLM.from_pretrained({str(ckpts['moe'][0])!r}); out['refused'] = False
        except ValueError as e: out['refused'] = 'trust_remote_code' in str(e)
        out['small_doge_imported'] = [k for k in sys.modules if k == 'small_doge' or k.startswith('small_doge.')]
        print('RESULT', json.dumps(out))''', tmp_path)
    assert got['small_doge_imported'] == []
    assert got['classes'][0] == 'transformers.models.doge.modeling_doge'     # transformers' own class
    assert got['classes'][1].endswith('.modeling_small_doge')                # the code saved beside the weights
    assert got['dense'] == ckpts['dense'][1]
    assert got['moe'] == ckpts['moe'][1]
    assert got['resaved_same_code'] and got['resaved_same_logits']
    assert got['refused']   # without trust_remote_code the MoE is refused, not loaded as native (token-mixing) doge


def test_import_small_doge_alone_makes_pipeline_work(saved, tmp_path):
    "`import small_doge` (nothing else from it) teaches transformers model_type small_doge, without importing torch."
    ckpts, _ = saved
    legacy = tmp_path/'legacy'   # a dense checkpoint written before dense models were saved as `doge`
    legacy.mkdir()
    for p in ckpts['dense'][0].iterdir(): (legacy/p.name).write_bytes(p.read_bytes())
    cfg = json.loads((legacy/'config.json').read_text()); cfg['model_type'] = 'small_doge'
    (legacy/'config.json').write_text(json.dumps(cfg))
    got = _run_python(f'''
        import json, sys
        import small_doge
        torch_at_import = 'torch' in sys.modules
        from transformers import pipeline
        out = {{'torch_at_import': torch_at_import}}
        for name, path in (('moe', {str(ckpts['moe'][0])!r}), ('legacy', {str(legacy)!r})):
            pipe = pipeline('text-generation', model=path)
            out[name] = [type(pipe.model).__module__, pipe('the fox', max_new_tokens=5, do_sample=False)[0]['generated_text']]
        print('RESULT', json.dumps(out))''', tmp_path)
    assert got['torch_at_import'] is False
    for name in ('moe', 'legacy'):
        assert got[name][0] == 'small_doge.doge' and got[name][1].startswith('the fox'), got


def test_auto_classes_in_process(saved, tmp_path):
    "With small_doge imported: its MoE checkpoints load as small_doge classes, also for sequence classification."
    moe = saved[0]['moe'][0]
    assert type(AutoConfig.from_pretrained(moe)) is DogeConfig
    assert type(AutoModelForCausalLM.from_pretrained(moe)) is DogeForCausalLM
    clf = AutoModelForSequenceClassification.from_pretrained(moe, num_labels=3)
    assert type(clf) is DogeForSequenceClassification and clf.score.out_features == 3
    assert type(AutoModelForCausalLM.from_pretrained(saved[0]['dense'][0])) is HFDogeForCausalLM
    # ... and the course's own classes read both model types: `doge`, and `small_doge` (MoE, or saved before)
    assert type(DogeForCausalLM.from_pretrained(saved[0]['dense'][0])) is DogeForCausalLM
    legacy = tmp_path/'legacy'
    DogeForCausalLM.from_pretrained(saved[0]['dense'][0]).save_pretrained(legacy)
    cfg = json.loads((legacy/'config.json').read_text()); cfg['model_type'] = 'small_doge'
    (legacy/'config.json').write_text(json.dumps(cfg))
    assert type(AutoModelForCausalLM.from_pretrained(legacy)) is DogeForCausalLM
    fields = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k != '_name_or_path'}
    assert fields(DogeForCausalLM.from_pretrained(legacy).config) == fields(DogeConfig.from_pretrained(saved[0]['dense'][0]))


# ---- outputs the config asks for -------------------------------------------------------------------------------------
def test_config_output_hidden_states_and_attentions():
    m = _tiny(output_hidden_states=True)
    ids = _distinct(2, 9)
    out = m(ids)
    assert out.hidden_states is not None and len(out.hidden_states) == m.config.num_hidden_layers + 1
    assert out.attentions is None
    out = m(ids, output_hidden_states=False, output_attentions=True)   # arguments win over the config
    assert out.hidden_states is None and len(out.attentions) == m.config.num_hidden_layers
    m.config.output_attentions = True
    assert m(ids).attentions[0].shape == (2, m.config.num_attention_heads, 9, 9)


@pytest.mark.parametrize('window', [4, 64])
def test_attention_weights_equal_native(window):
    "output_attentions gives transformers' eager attention weights (distinct tokens: no ties in the top-W window)."
    m = _tiny(keep_window_size=window)
    native = HFDogeForCausalLM(HFDogeConfig(**{**DOGE_PRESETS['tiny'], 'keep_window_size': window},
                                            attn_implementation='eager')).eval()
    native.load_state_dict(m.state_dict())
    ids = _distinct(2, 12, seed=1)
    with torch.no_grad():
        ours, theirs = m(ids, output_attentions=True).attentions, native(ids, output_attentions=True).attentions
    for a, b in zip(ours, theirs): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    w = ours[0]
    assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
    assert (w.triu(1) == 0).all()   # causal
    if window == 4: assert ((w > 0).sum(-1) <= 4).all()


def test_return_dict_false_by_argument_and_by_config():
    m = _tiny()
    ids = _distinct(1, 5)
    full = m(ids, labels=ids)
    as_tuple = m(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.loss) and torch.equal(as_tuple[1], full.logits)
    base = m.model(ids, return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], m.model(ids).last_hidden_state)
    m.config.return_dict = False
    assert isinstance(m(ids), tuple) and isinstance(m.model(ids), tuple)
    assert not isinstance(m(ids, return_dict=True), tuple)


# ---- resizing, from_pretrained variants, lenient loading -------------------------------------------------------------
@pytest.mark.parametrize('tied', [True, False])
def test_resize_token_embeddings_accepts_new_ids(tied):
    m = _tiny(tie_word_embeddings=tied)
    m.resize_token_embeddings(520)
    ids = torch.tensor([[3, 515, 519]])
    out = m(ids, labels=ids)
    assert out.logits.shape == (1, 3, 520) and torch.isfinite(out.loss)
    with pytest.raises(Exception, match='outside the vocabulary'): m(torch.tensor([[520]]))


def test_from_pretrained_with_config_and_state_dict_only():
    m = _tiny()
    back, info = DogeForCausalLM.from_pretrained(None, config=m.config, state_dict=m.state_dict(),
                                                 output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']
    ids = _distinct(1, 6)
    with torch.no_grad(): assert torch.equal(back.eval()(ids).logits, m(ids).logits)


def test_base_model_checkpoint_into_causal_lm_initialises_the_head(tmp_path):
    "As in transformers: the missing head is initialised and reported, the rest loads."
    torch.manual_seed(0)
    base = DogeModel(DogeConfig.from_preset('tiny', tie_word_embeddings=False))
    base.save_pretrained(tmp_path)
    lm, info = DogeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info['missing_keys']) == {'lm_head.weight'} and not info['unexpected_keys']
    assert torch.equal(lm.model.embed_tokens.weight, base.embed_tokens.weight)
    assert torch.isfinite(lm.lm_head.weight).all() and lm.lm_head.weight.std() > 0


def test_tied_head_saved_without_lm_head_weight(tmp_path):
    "A tied checkpoint stores no lm_head.weight: tied it loads whole; untied the head is initialised and reported."
    from safetensors.torch import load_file
    m = _tiny(tie_word_embeddings=True)
    m.save_pretrained(tmp_path)
    assert 'lm_head.weight' not in load_file(tmp_path/'model.safetensors')
    back, info = DogeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info['missing_keys'] and torch.equal(back.lm_head.weight, m.model.embed_tokens.weight)
    untied, info = DogeForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=False, output_loading_info=True)
    assert set(info['missing_keys']) == {'lm_head.weight'}
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.model.embed_tokens.weight, m.model.embed_tokens.weight)


def test_upcycling_reports_the_new_router_and_experts(tmp_path):
    _tiny().save_pretrained(tmp_path)
    moe, info = DogeForCausalLM.from_pretrained(tmp_path, is_moe=True, num_experts=16, num_experts_per_tok=4,
                                                output_loading_info=True)
    assert info['missing_keys'] and all('.mlp.' in k for k in info['missing_keys'])
    assert {k.rsplit('.', 2)[-2] for k in info['missing_keys']} == {'router_gate', 'down_embed', 'up_embed'}


def test_checkpoint_with_no_fitting_weight_is_refused(tmp_path):
    from safetensors.torch import save_file
    _tiny().save_pretrained(tmp_path)
    save_file({'transformer.h.0.attn.c_attn.weight': torch.zeros(4, 4)}, tmp_path/'model.safetensors',
              metadata={'format': 'pt'})
    with pytest.raises(CheckpointError, match='no weight'): DogeForCausalLM.from_pretrained(tmp_path)


# ---- attention implementation, static cache --------------------------------------------------------------------------
def test_attn_implementation_maps_onto_attn_backend(tmp_path):
    m = _tiny()
    m.save_pretrained(tmp_path)
    sdpa = DogeForCausalLM.from_pretrained(tmp_path, attn_implementation='sdpa').eval()
    assert sdpa.config.attn_backend == 'sdpa' and sdpa.config._attn_implementation == 'sdpa'
    ids = _distinct(2, 20, seed=2)
    with torch.no_grad(): torch.testing.assert_close(sdpa(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-4)
    sdpa.set_attn_implementation('eager')
    assert sdpa.config.attn_backend == 'eager'
    assert DogeForCausalLM(DogeConfig.from_preset('tiny', attn_backend='sdpa')).config._attn_implementation == 'sdpa'
    with pytest.raises(ConfigError, match='flash_attention_2'):
        DogeForCausalLM.from_pretrained(tmp_path, attn_implementation='flash_attention_2')
    with pytest.raises(ConfigError, match='flex_attention'): m.set_attn_implementation('flex_attention')


@pytest.mark.parametrize('impl', ['sdpa', 'eager'])   # transformers passes a boolean / an additive 4-D mask
@pytest.mark.parametrize('moe', [False, True])
def test_static_cache_generation_equals_dynamic(impl, moe):
    m = _tiny('tiny-moe' if moe else 'tiny', keep_window_size=4)   # window 4: top-W runs over cached keys
    m.set_attn_implementation(impl)
    ids = _distinct(2, 9, seed=5)
    mask = torch.ones_like(ids); mask[0, :3] = 0; ids[0, :3] = 0   # left padding
    seen = []
    forward = m.model.forward
    m.model.forward = lambda *a, **k: seen.append(k['attention_mask'].dim()) or forward(*a, **k)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        static = m.generate(ids, cache_implementation='static', **kw)
        assert set(seen) == {4}   # the static cache really went through the 4-D mask
        dynamic = m.generate(ids, **kw)
    assert torch.equal(static, dynamic)


def test_unsupported_4d_mask_is_a_clear_error():
    from small_doge.core import DataError
    m = _tiny()
    ids = _distinct(1, 5)
    full = torch.ones(1, 1, 5, 5, dtype=torch.bool)   # bidirectional: not what a causal LM can run
    with pytest.raises(DataError, match='causal mask with padding'): m(ids, attention_mask=full)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.no_grad(): torch.testing.assert_close(m(ids, attention_mask=causal).logits, m(ids).logits)


# ---- RoPE: every transformers type, and positions past max_position_embeddings ---------------------------------------
ROPES = {
    'default': {},
    'linear': {'factor': 2.0},
    'dynamic': {'factor': 4.0},
    'yarn': {'factor': 4.0},
    'llama3': {'factor': 4.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 16},
    'longrope': {'factor': 4.0, 'short_factor': [1.0] * 8, 'long_factor': [2.0 + i / 8 for i in range(8)],
                 'original_max_position_embeddings': 16},
}


@pytest.mark.parametrize('rope_type', ROPES)
def test_every_rope_type_matches_transformers(rope_type):
    params = {'rope_type': rope_type, 'rope_theta': 10000.0, **ROPES[rope_type]}
    cfg = HFDogeConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32, rope_parameters=dict(params))
    ours, theirs = DogeRotaryEmbedding.from_config(cfg), hf.DogeRotaryEmbedding(cfg)
    x = torch.zeros(1)
    for n in (8, 40, 100, 20):   # inside, beyond (dynamic/longrope switch), further, back inside (reset)
        pos = torch.arange(n)[None]
        for a, b in zip(ours(x, pos), theirs(x, pos)): torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize('rope_type', ['default', 'linear', 'yarn'])
def test_model_runs_past_max_position_embeddings_like_transformers(rope_type):
    params = {'rope_type': rope_type, 'rope_theta': 10000.0, **ROPES[rope_type]}
    m = _tiny(max_position_embeddings=16, keep_window_size=64, rope_parameters=params)
    native = HFDogeForCausalLM(HFDogeConfig(**{**DOGE_PRESETS['tiny'], 'max_position_embeddings': 16,
                                               'keep_window_size': 64, 'rope_parameters': dict(params)},
                                            attn_implementation='eager')).eval()
    native.load_state_dict(m.state_dict())
    ids = _distinct(1, 40, seed=6)   # 40 positions > 16
    with torch.no_grad(): torch.testing.assert_close(m(ids).logits, native(ids).logits, atol=1e-5, rtol=1e-4)


# ---- sequence classification -----------------------------------------------------------------------------------------
def test_sequence_classification_matches_native(tmp_path):
    torch.manual_seed(7)
    cfg = DogeConfig.from_preset('tiny', num_labels=3, pad_token_id=0)
    ours = _perturbed(DogeForSequenceClassification(cfg), 7)
    ours.save_pretrained(tmp_path)
    native = HFDogeForSequenceClassification.from_pretrained(tmp_path, attn_implementation='eager').eval()
    ids = _distinct(2, 10, seed=8) + 1
    ids[0, 7:] = 0   # right padding: the score is read at the last real token
    mask = (ids != 0).long()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, native(ids, attention_mask=mask).logits
        alone = ours(ids[:1, :7]).logits
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[:1], alone, atol=1e-5, rtol=1e-4)
    loss = ours(ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert torch.isfinite(loss) and ours.score.weight.grad is not None
