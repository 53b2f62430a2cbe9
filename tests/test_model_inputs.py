"""Model-API inputs that used to give an obscure error or a silently wrong result (issue 20's API cases), and weights
that are not finite. Decisions (documented in lesson 07): 1-D ids, empty sequences and empty batches are a `DataError`
(transformers' own Doge fails on them with an internal error); non-finite `inputs_embeds` are a `DataError` before any
work; a checkpoint with NaN/inf weights is a `CheckpointError` naming the tensor."""
import json

import pytest
import torch
import transformers

from small_doge.core import CheckpointError, DataError
from small_doge.doge import DogeConfig, DogeForCausalLM, DogeModel, DogeForSequenceClassification

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return DogeForCausalLM(DogeConfig.from_preset('tiny')).eval()


@pytest.mark.parametrize('call', ['causal_lm', 'base', 'generate'])
def test_one_dimensional_ids_ask_for_a_batch_dimension(tiny, call):
    ids = torch.tensor([1, 2, 3])
    fn = {'causal_lm': tiny, 'base': tiny.model,
          'generate': lambda x: tiny.generate(x, max_new_tokens=2, pad_token_id=0)}[call]
    with pytest.raises(DataError, match=r'\[batch, seq\].*add a batch dimension'): fn(ids)
    fn(ids[None])   # the suggested fix works


@pytest.mark.parametrize('shape', [(1, 0), (0, 5), (0, 0)])
def test_empty_sequence_or_batch(tiny, shape):
    with pytest.raises(DataError, match='empty'): tiny(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(DataError, match='empty'): tiny(inputs_embeds=torch.zeros(*shape, 64))


def test_generate_from_an_empty_prompt(tiny):
    with pytest.raises(DataError, match='empty'):
        tiny.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2, pad_token_id=0)


def test_inputs_embeds_of_the_wrong_shape(tiny):
    with pytest.raises(DataError, match='hidden_size=64'): tiny(inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(DataError, match=r'\[batch, seq, hidden_size\]'): tiny(inputs_embeds=torch.zeros(3, 64))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_inputs_embeds_are_refused_before_they_spread(tiny, bad):
    "Before: a NaN at position 5 turned every logit NaN, positions 0-4 included. Now: one error naming it."
    emb = tiny.model.embed_tokens(torch.tensor([[1, 2, 3, 4, 5, 6, 7]])).detach()
    emb[0, 5, 3] = bad
    with pytest.raises(DataError, match='batch 0, position 5'): tiny(inputs_embeds=emb)
    emb[0, 5, 3] = 0.0
    assert torch.isfinite(tiny(inputs_embeds=emb).logits).all()


def test_ids_from_a_stale_vocabulary_still_refused(tiny):
    with pytest.raises(DataError, match=r'token id 512 is outside the vocabulary \[0, 512\)'):
        tiny(torch.tensor([[1, 512]]))


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_checkpoint_with_non_finite_weights(tmp_path, tiny, value):
    from safetensors.torch import load_file, save_file
    tiny.save_pretrained(tmp_path)
    weights = load_file(tmp_path/'model.safetensors')
    weights['model.layers.1.mlp.up_proj.weight'][3, 7] = value
    save_file(weights, tmp_path/'model.safetensors', metadata={'format': 'pt'})
    for cls in (DogeForCausalLM, DogeModel, DogeForSequenceClassification):
        with pytest.raises(CheckpointError, match=r'layers\.1\.mlp\.up_proj\.weight holds NaN or inf'):
            cls.from_pretrained(tmp_path)


def test_config_json_with_model_type_key_does_not_leak_into_the_config(tmp_path, tiny):
    "config.json says `doge` for a dense model; the loaded config is still small_doge's class and type."
    tiny.save_pretrained(tmp_path)
    assert json.loads((tmp_path/'config.json').read_text())['model_type'] == 'doge'
    cfg = DogeConfig.from_pretrained(tmp_path)
    assert cfg.model_type == 'small_doge' and 'model_type' not in cfg.__dict__
    assert DogeConfig.from_dict(cfg.to_dict()) == cfg
