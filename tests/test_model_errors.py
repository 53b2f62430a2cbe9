"""Bad input to small_doge's Doge raises one clear exception each: ConfigError, DataError or CheckpointError."""
import json

import pytest
import torch
import transformers

from small_doge.core import CheckpointError, ConfigError, DataError, SmallDogeError
from small_doge.doge import DogeConfig, DogeForCausalLM

transformers.logging.disable_progress_bar()


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return DogeForCausalLM(DogeConfig.from_preset('tiny')).eval()


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp('ckpt')
    tiny.save_pretrained(d)
    return d


# ---- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kw, msg', [
    (dict(hidden_size=100, num_attention_heads=8), 'not divisible by num_attention_heads'),
    (dict(num_attention_heads=8, num_key_value_heads=3), 'not divisible by num_key_value_heads'),
    (dict(hidden_size=24, num_attention_heads=8, num_key_value_heads=8), 'must be even'),
    (dict(is_moe=True, num_experts=1000), 'perfect square'),
    (dict(is_moe=True, num_experts=0), 'perfect square'),
    (dict(is_moe=True, num_experts=16, num_experts_per_tok=17), 'num_experts_per_tok'),
    (dict(attn_backend='flash'), 'attn_backend'),
    (dict(hidden_act='nope'), 'hidden_act'),
    (dict(keep_window_size=0), 'keep_window_size'),
    (dict(vocab_size=-3), 'vocab_size'),
    (dict(pad_token_id=40000), 'pad_token_id'),
    (dict(sliding_window=128), 'sliding_window'),
    (dict(rope_parameters={'rope_type': 'nope'}), 'rope_type'),
    (dict(rope_parameters={'rope_type': 'dynamic'}), 'factor'),
    (dict(rope_parameters={'rope_type': 'yarn'}), 'factor'),
])
def test_bad_config(kw, msg):
    with pytest.raises(ConfigError, match=msg): DogeConfig(**kw)


def test_unknown_preset():
    with pytest.raises(ConfigError, match='unknown Doge preset'): DogeConfig.from_preset('doge-7b')


def test_config_mutated_after_creation_is_caught_by_model():
    cfg = DogeConfig.from_preset('tiny'); cfg.num_key_value_heads = 3
    with pytest.raises(ConfigError, match='num_key_value_heads'): DogeForCausalLM(cfg)


# ---- inputs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('ids, msg', [
    ([[1, 512]], 'token id 512 is outside the vocabulary'),
    ([[-1, 3]], 'token id -1 is outside the vocabulary'),
])
def test_bad_token_ids(tiny, ids, msg):
    with pytest.raises(DataError, match=msg): tiny(torch.tensor(ids))


def test_float_ids(tiny):
    with pytest.raises(DataError, match='integer ids'): tiny(torch.ones(1, 3))


def test_sequence_longer_than_positions_runs_as_in_transformers(tiny):
    "RoPE extrapolates past max_position_embeddings (transformers allows it); the CLI keeps prompts inside."
    from transformers.cache_utils import DynamicCache
    with torch.no_grad():
        assert tiny(torch.zeros(1, 257, dtype=torch.long)).logits.shape == (1, 257, 512)
        cache = DynamicCache()
        tiny(torch.zeros(1, 250, dtype=torch.long), past_key_values=cache, use_cache=True)
        assert tiny(torch.zeros(1, 7, dtype=torch.long), past_key_values=cache, use_cache=True).logits.shape[1] == 7


def test_dynamic_rope_allows_longer_sequences():
    m = DogeForCausalLM(DogeConfig.from_preset('tiny', max_position_embeddings=16,
                                               rope_parameters={'rope_type': 'dynamic', 'factor': 4.0})).eval()
    with torch.no_grad(): assert m(torch.zeros(1, 40, dtype=torch.long)).logits.shape == (1, 40, 512)


def test_bad_masks_and_labels(tiny):
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(DataError, match='attention_mask must be 2-D'): tiny(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(DataError, match='attention_mask must be 2-D'): tiny(ids, attention_mask=torch.ones(2, 5, 5))
    with pytest.raises(DataError, match='causal mask with padding'): tiny(ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(DataError, match='causal mask with padding'): tiny(ids, attention_mask=torch.ones(2, 1, 4, 5))
    with pytest.raises(DataError, match='label 600'): tiny(ids, labels=torch.full((2, 5), 600))
    with pytest.raises(DataError, match='exactly one'): tiny()


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_roundtrip_ok(ckpt, tiny):
    back = DogeForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(): assert torch.equal(back(ids).logits, tiny(ids).logits)
    assert sorted(p.name for p in ckpt.iterdir() if p.name != 'generation_config.json') == ['config.json',
                                                                                          'model.safetensors']


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match='not found'): DogeForCausalLM.from_pretrained(tmp_path/'nope')


def _copy(ckpt, dest, skip=()):
    dest.mkdir()
    for p in ckpt.iterdir():
        if p.name not in skip: (dest/p.name).write_bytes(p.read_bytes())
    return dest


def test_missing_config(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c', skip=('config.json',))
    with pytest.raises(CheckpointError, match='no config.json'): DogeForCausalLM.from_pretrained(d)


def test_garbage_config(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c'); (d/'config.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='not valid JSON'): DogeForCausalLM.from_pretrained(d)


def test_missing_weights(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c', skip=('model.safetensors',))
    with pytest.raises(CheckpointError, match='no model.safetensors'): DogeForCausalLM.from_pretrained(d)


def test_pickle_weights_refused(ckpt, tmp_path, tiny):
    d = _copy(ckpt, tmp_path/'c', skip=('model.safetensors',))
    torch.save(tiny.state_dict(), d/'pytorch_model.bin')
    with pytest.raises(CheckpointError, match='only safetensors'): DogeForCausalLM.from_pretrained(d)


@pytest.mark.parametrize('payload', [b'', b'garbage bytes, not a safetensors file', b'\xff' * 64])
def test_garbage_weights(ckpt, tmp_path, payload):
    d = _copy(ckpt, tmp_path/'c'); (d/'model.safetensors').write_bytes(payload)
    with pytest.raises(CheckpointError, match='corrupt'): DogeForCausalLM.from_pretrained(d)


def test_truncated_weights(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c')
    data = (d/'model.safetensors').read_bytes(); (d/'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError): DogeForCausalLM.from_pretrained(d)


def test_wrong_architecture(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c')
    cfg = json.loads((d/'config.json').read_text()); cfg['model_type'] = 'llama'
    (d/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'llama' model, not Doge"): DogeForCausalLM.from_pretrained(d)


def test_invalid_config_in_checkpoint(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c')
    cfg = json.loads((d/'config.json').read_text()); cfg['num_key_value_heads'] = 3
    (d/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match='num_key_value_heads'): DogeForCausalLM.from_pretrained(d)


def test_weights_do_not_fit_config(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c')
    cfg = json.loads((d/'config.json').read_text()); cfg['intermediate_size'] = 96    # shapes differ
    (d/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r'do not fit its config: model\.layers\.0\.mlp\.down_proj\.weight '
                                              r'\(64, 128\) in the file, \(64, 96\) in the model'):
        DogeForCausalLM.from_pretrained(d)


def test_missing_layer_is_initialised_and_reported_as_in_transformers(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path/'c')
    cfg = json.loads((d/'config.json').read_text()); cfg['num_hidden_layers'] = 3    # one layer's weights missing
    (d/'config.json').write_text(json.dumps(cfg))
    _, info = DogeForCausalLM.from_pretrained(d, output_loading_info=True)
    assert info['missing_keys'] and all(k.startswith('model.layers.2.') for k in info['missing_keys'])


def test_errors_share_a_base():
    for e in (ConfigError, DataError, CheckpointError): assert issubclass(e, SmallDogeError)
