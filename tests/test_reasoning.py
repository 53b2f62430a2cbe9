"small_doge.reasoning: checker accuracy, the task's datasets, GRPO batch checks, and a tiny end-to-end run (trace SFT + GRPO)."
import json
from types import SimpleNamespace

import pytest
import torch

from small_doge.core import CheckpointError, ConfigError, DataError, seed_everything
from small_doge.data import format_trace, arithmetic_trace, reasoning_dataset
from small_doge.doge import DogeConfig, DogeForCausalLM
from small_doge.runs import load_recipe
from small_doge.reasoning import ReasonRecipe, checker_accuracy, reasoning_datasets, run_grpo, run_reasoning
from small_doge.sft import load_model_and_tokenizer
from small_doge.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

@pytest.fixture(scope='module')
def tok():
    d = reasoning_dataset(n_train=200, n_test=20, seed=0)
    return train_tokenizer(list(d['train']['trace']) * 3, vocab_size=320)

@pytest.fixture(scope='module')
def model_dir(tok, tmp_path_factory):
    "A random tiny Doge saved with its tokenizer, as a stage's start model."
    seed_everything(0)
    cfg = DogeConfig.from_preset('tiny', vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp('start')
    DogeForCausalLM(cfg).save_pretrained(d); tok.save_pretrained(d)
    return d


def test_checker_accuracy_counts_correct_and_well_formed(monkeypatch, tok):
    "Accuracy and format rate are fractions over the replies: feed known replies instead of generations."
    ds = reasoning_dataset(n_train=10, n_test=4, seed=1)['test']
    right = format_trace(arithmetic_trace(ds[0]['prompt'][0]['content'].removeprefix('Compute ')))
    replies = [right, '<answer>' + ds[1]['answer'] + '</answer>', f"<think>\nx\n</think>\n<answer>{int(ds[2]['answer']) + 1}</answer>", 'no idea']
    monkeypatch.setattr('small_doge.reasoning.generate_replies', lambda *a, **k: replies)
    got = checker_accuracy(None, tok, ds, n_samples=2)
    assert (got['accuracy'], got['format_rate'], got['n']) == (0.5, 0.5, 4)
    assert [s['correct'] for s in got['samples']] == [True, True]


def test_sampled_checker_accuracy_repeats_problems_and_is_seeded(monkeypatch, tok, model_dir):
    "Sampling asks for k completions per problem (the answers repeated to match), is reproducible, and leaves the global RNG alone."
    ds = reasoning_dataset(n_train=10, n_test=3, seed=1)['test']
    seen = {}
    def fake(model, tokenizer, prompts, **kw):
        seen.update(kw, n=len(prompts))
        return [f"<think>\nx\n</think>\n<answer>{a}</answer>" for a in [a for a in ds['answer'] for _ in range(4)]]
    monkeypatch.setattr('small_doge.reasoning.generate_replies', fake)
    got = checker_accuracy(SimpleNamespace(device=torch.device('cpu')), tok, ds, temperature=0.7, samples_per_problem=4)
    assert (got['accuracy'], got['n'], seen['n']) == (1.0, 12, 12) and (seen['do_sample'], seen['temperature'], seen['top_k']) == (True, 0.7, 0)
    assert [s['answer'] for s in got['samples']] == list(ds['answer'])     # one sample shown per problem
    monkeypatch.undo()
    model, tok2 = load_model_and_tokenizer(model_dir)
    state = torch.random.get_rng_state()
    a, b = (checker_accuracy(model, tok2, ds, max_new_tokens=6, temperature=1.0, samples_per_problem=2, seed=5) for _ in range(2))
    assert torch.equal(state, torch.random.get_rng_state())
    assert [s['reply'] for s in a['samples']] == [s['reply'] for s in b['samples']] and a['n'] == 6


def test_reasoning_datasets_hold_out_problems_and_drop_long_prompts(tok):
    r = ReasonRecipe(n_train=100, n_test=20, seed=3)
    dsd = reasoning_datasets(r, tok)
    assert (len(dsd['train']), len(dsd['test'])) == (100, 20)
    questions = lambda split: {p[0]['content'] for p in dsd[split]['prompt']}
    assert not questions('test') & questions('train')
    with pytest.raises(DataError, match='at most 3 tokens'): reasoning_datasets(ReasonRecipe(n_train=10, n_test=4, max_prompt_length=3), tok)


def test_grpo_batch_must_hold_whole_groups():
    with pytest.raises(ConfigError, match='multiple of num_generations'):
        run_grpo(ReasonRecipe(per_device_train_batch_size=6, num_generations=4), None, None, None)


def test_bad_recipe_and_missing_model(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'ops_'"): load_recipe('reason-tiny-cpu', ops_='+')
    with pytest.raises(CheckpointError): run_reasoning('reason-tiny-cpu', model_path=str(tmp_path / 'nope'), output_dir=str(tmp_path / 'r'))
    with pytest.raises(ConfigError, match='eval_samples'): run_reasoning('reason-tiny-cpu', eval_samples=0, output_dir=str(tmp_path / 'r'))
    with pytest.raises(ConfigError, match="accuracy_check must be one of \\['answer', 'trace'\\], got 'steps'"):
        run_reasoning('reason-tiny-cpu', accuracy_check='steps', output_dir=str(tmp_path / 'r'))


def test_run_reasoning_end_to_end(model_dir, tmp_path):
    "Both steps run, numbers are fractions, results.json and a loadable model are written."
    res = run_reasoning('reason-tiny-cpu', model_path=str(model_dir), output_dir=str(tmp_path / 'reason'), disable_tqdm=True,
                        n_train=32, n_test=8, max_eval_examples=8, sft_max_steps=3, sft_batch_size=8, max_steps=2,
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=12, logging_steps=1)
    assert res['grpo_steps'] == 2 and res['heldout_problems'] == 8
    for k in ('accuracy_start', 'accuracy_after_sft', 'accuracy_after_grpo', 'format_rate_after_grpo', 'sampled_accuracy_start',
              'sampled_accuracy_after_sft', 'sampled_accuracy_after_grpo'): assert 0.0 <= res[k] <= 1.0
    assert [h['step'] for h in res['log_history'] if 'reward' in h] == [1, 2]
    assert any('loss' in h for h in res['sft_log_history'])
    saved = json.loads((tmp_path / 'reason' / 'results.json').read_text())
    assert saved['accuracy_after_grpo'] == res['accuracy_after_grpo']
    model, tok = load_model_and_tokenizer(res['model_dir'])
    assert isinstance(model, DogeForCausalLM) and tok.chat_template
