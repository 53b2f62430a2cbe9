"Recipes: every packaged recipe loads, strict keys and types, the seeds' numbers, accelerate configs, TRL MoE trap, bad input."
import dataclasses, os
from pathlib import Path

import pytest
import yaml

from small_doge.core import CheckpointError, ConfigError, DataError
from small_doge.pretrain import PretrainRecipe, pretrain
from small_doge.runs import list_checkpoints, list_recipes, load_recipe, make_recipe, recipes_dir, run_recipe, save_recipe

STAGES = ('pretrain', 'sft', 'dpo', 'reason', 'upcycle')


def test_every_packaged_recipe_loads():
    names = list_recipes()
    for stage, size in [(s, z) for s in ('pretrain',) for z in ('doge-20m', 'doge-60m', 'doge-160m', 'doge-320m', 'tiny-cpu')]:
        assert f'{stage}-{size}' in names
    for stage in ('sft', 'dpo', 'reason'): assert f'{stage}-tiny-cpu' in names, names
    for n in names:
        r = load_recipe(n)
        assert r.stage in STAGES and r.name == n
        assert load_recipe(recipes_dir()/f'{n}.yaml') == r            # by path too


def test_seed_pretrain_numbers():
    expect = {'doge-20m': (8e-3, 8000, 0.5), 'doge-60m': (6e-3, 16000, 1), 'doge-160m': (4e-3, 24000, 1.5),
              'doge-320m': (2e-3, 32000, 2)}
    for size, (lr, steps, mtok) in expect.items():
        r = load_recipe(f'pretrain-{size}')
        assert (r.model, r.learning_rate, r.max_steps, r.block_size, r.bf16) == (size, lr, steps, 2048, True)
        assert abs(r.tokens_per_step / 2**20 - mtok) < 1e-9
        assert (r.warmup_ratio, r.decay_ratio, r.decay, r.min_lr_ratio) == (0.1, 0.1, 'linear', 0.0)
        assert (r.adam_beta1, r.adam_beta2, r.adam_epsilon, r.weight_decay, r.max_grad_norm) == (0.9, 0.95, 1e-8, 0.01, 1.0)
        assert r.data == 'hub:pretrain'


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path/'r.yaml'
    p.write_text('stage: pretrain\nmax_step: 10\n')
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'.*did you mean 'max_steps'") as e: load_recipe(p)
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"): load_recipe('pretrain-tiny-cpu', bogus=1)


def test_types_are_converted_or_rejected(tmp_path):
    p = tmp_path/'r.yaml'
    p.write_text('stage: pretrain\nlearning_rate: 8e-3\nmax_steps: 1e3\nsave_steps: null\nbf16: true\n')
    r = load_recipe(p)
    assert (r.learning_rate, r.max_steps, r.save_steps, r.bf16) == (0.008, 1000, None, True)
    p.write_text('stage: pretrain\nbf16: maybe\n')
    with pytest.raises(ConfigError, match="'bf16' must be bool"): load_recipe(p)
    p.write_text('stage: pretrain\nmax_steps: 2.5\n')
    with pytest.raises(ConfigError, match="'max_steps' must be int"): load_recipe(p)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match='recipe not found'): load_recipe(tmp_path/'nope.yaml')
    (tmp_path/'a.yaml').write_text('- just\n- a list\n')
    with pytest.raises(ConfigError, match='mapping'): load_recipe(tmp_path/'a.yaml')
    (tmp_path/'b.yaml').write_text('stage: finetune\n')
    with pytest.raises(ConfigError, match="stage must be one of"): load_recipe(tmp_path/'b.yaml')
    (tmp_path/'c.yaml').write_text('stage: [unclosed\n')
    with pytest.raises(ConfigError, match='not valid YAML'): load_recipe(tmp_path/'c.yaml')
    with pytest.raises(ConfigError, match="for stage 'sft', not 'pretrain'"): pretrain(load_recipe('sft-tiny-cpu'))


def test_save_and_load_round_trip(tmp_path):
    for n in list_recipes():
        r = load_recipe(n)
        assert load_recipe(save_recipe(r, tmp_path/f'{n}.yaml')) == r


def test_accelerate_configs():
    d = recipes_dir()/'accelerate'
    kinds = {'single_gpu': 'NO', 'ddp': 'MULTI_GPU', 'fsdp': 'FSDP', 'zero2': 'DEEPSPEED', 'zero3': 'DEEPSPEED'}
    for name, kind in kinds.items():
        cfg = yaml.safe_load((d/f'{name}.yaml').read_text())
        assert cfg['distributed_type'] == kind and cfg['mixed_precision'] == 'bf16'
        assert cfg['num_processes'] == (1 if name == 'single_gpu' else 8)
    assert yaml.safe_load((d/'zero3.yaml').read_text())['deepspeed_config']['zero_stage'] == 3
    assert yaml.safe_load((d/'fsdp.yaml').read_text())['fsdp_config']['fsdp_transformer_layer_cls_to_wrap'] == 'DogeDecoderLayer'
    # accelerate itself can read them
    from accelerate.commands.config.config_args import load_config_from_file
    for name in kinds: load_config_from_file(str(d/f'{name}.yaml'))


def test_packaged_in_wheel_metadata():
    "setup.py ships recipes/*.yaml and recipes/accelerate/*.yaml as package data."
    setup = (Path(__file__).parents[1]/'setup.py').read_text()
    assert "'recipes/*.yaml'" in setup and "'recipes/accelerate/*.yaml'" in setup


# ---------------------------------------------------------------- TRL treats configs with router settings as MoE

def _tiny_model(**kw):
    from small_doge.doge import DogeConfig, DogeForCausalLM
    return DogeForCausalLM(DogeConfig.from_preset('tiny', vocab_size=300, **kw))


@pytest.fixture(scope='module')
def tok():
    from small_doge.tokenizer import train_tokenizer
    return train_tokenizer(['def f(x):\n    return x + 1\n'] * 20, vocab_size=300)


def test_trl_dense_model_has_no_aux_loss(tmp_path, tok):
    "A dense Doge must not be treated as MoE by TRL (aux loss on missing router logits -> IndexError)."
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from small_doge.sft import router_aux_loss_coef
    from transformers import DogeConfig as HFDogeConfig
    # transformers' own config declares output_router_logits even for dense models: the trap
    assert hasattr(HFDogeConfig(), 'output_router_logits') and router_aux_loss_coef(HFDogeConfig()) == 0.0
    model = _tiny_model()
    assert router_aux_loss_coef(model.config) == 0.0
    model.config.output_router_logits = False       # declare the field, as transformers' DogeConfig does: the trap
    ds = Dataset.from_dict({'input_ids': [[1, 5, 6, 7, 8, 2]] * 8})
    def args(coef): return SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], bf16=False,
                                     activation_checkpointing=False, router_aux_loss_coef=coef, logging_steps=1,
                                     save_strategy='no', dataset_kwargs={'skip_prepare_dataset': True}, use_cpu=True)
    assert SFTTrainer(model=model, args=args(None), train_dataset=ds, processing_class=tok).aux_loss_enabled  # TRL: "MoE"
    tr = SFTTrainer(model=model, args=args(router_aux_loss_coef(model.config)), train_dataset=ds, processing_class=tok)
    assert not tr.aux_loss_enabled
    tr.train()
    assert all('aux_loss' not in h for h in tr.state.log_history)


def test_trl_trains_our_moe_model_without_its_aux_loss(tmp_path, tok):
    "TRL's fused LM head computes Mixtral's aux loss from [N, E] logits; Doge returns [N, 2K], so it is switched off."
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from small_doge.sft import router_aux_loss_coef
    model = _tiny_model(is_moe=True, num_experts=16, num_experts_per_tok=4)
    assert router_aux_loss_coef(model.config) == 0.0
    ds = Dataset.from_dict({'input_ids': [[1, 5, 6, 7, 8, 2]] * 8})
    def args(coef): return SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], bf16=False,
                                     activation_checkpointing=False, router_aux_loss_coef=coef, logging_steps=1,
                                     save_strategy='no', dataset_kwargs={'skip_prepare_dataset': True}, use_cpu=True)
    with pytest.raises(RuntimeError):   # what TRL's own aux loss does with product-key logits
        SFTTrainer(model=model, args=args(None), train_dataset=ds, processing_class=tok).train()
    model = _tiny_model(is_moe=True, num_experts=16, num_experts_per_tok=4)
    tr = SFTTrainer(model=model, args=args(router_aux_loss_coef(model.config)), train_dataset=ds, processing_class=tok)
    assert not tr.aux_loss_enabled
    tr.train()
    assert all('aux_loss' not in h for h in tr.state.log_history)


def test_cli_style_overrides():
    from small_doge.runs import parse_overrides
    ov = parse_overrides(['learning_rate=1e-3', 'bf16=false', 'save_steps=null', 'model_overrides={num_hidden_layers: 2}'])
    r = load_recipe('pretrain-tiny-cpu', **ov)
    assert (r.learning_rate, r.bf16, r.save_steps, r.model_overrides) == (1e-3, False, None, {'num_hidden_layers': 2})
    with pytest.raises(ConfigError, match='not key=value'): parse_overrides(['oops'])
    with pytest.raises(ConfigError, match="unknown key 'lr'"): load_recipe('pretrain-tiny-cpu', **parse_overrides(['lr=1']))


def test_run_recipe_dispatch(tmp_path):
    "run_recipe picks the stage's function; a recipe for a stage with bad input fails with that stage's error."
    with pytest.raises(CheckpointError, match='model not found'):
        run_recipe(load_recipe('sft-tiny-cpu', model_path=str(tmp_path/'none'), output_dir=str(tmp_path/'o')))
    with pytest.raises(CheckpointError, match='model not found'):
        run_recipe(load_recipe('dpo-tiny-cpu', model_path=str(tmp_path/'none'), output_dir=str(tmp_path/'o')))
    with pytest.raises(CheckpointError, match='model not found'):
        run_recipe(load_recipe('reason-tiny-cpu', model_path=str(tmp_path/'none'), output_dir=str(tmp_path/'o')))
