"small_doge.evaluate: the stdlib task generators, decoding speed and evaluate_model (lm-eval on a saved model)."
import json

import pytest
import torch

from small_doge.core import CheckpointError, ConfigError, DataError, seed_everything
from small_doge.data import stdlib_api_docs
from small_doge.doge import DogeConfig, DogeForCausalLM
from small_doge.evaluate import (OFFLINE_TASKS, SEED_PROTOCOL, SEED_RESULTS, api_summary_task,
                                 compare_with_seeds, evaluate_model, generation_speed, next_line_task,
                                 run_lm_eval, task_scores)
from small_doge.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny tensors: one thread is faster, and much faster on a shared machine."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

def help_text(a): return f"{a['qualname']}{a['signature']}\n    {a['summary']}\n"

@pytest.fixture(scope='module')
def tok():
    return train_tokenizer([help_text(a) for a in stdlib_api_docs()], vocab_size=384)

def tiny_model(tok, seed=0, **kw):
    seed_everything(seed)
    cfg = DogeConfig.from_preset('tiny', vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **kw)
    return DogeForCausalLM(cfg).eval()

@pytest.fixture(scope='module')
def model(tok): return tiny_model(tok)


# ---------------------------------------------------------------- offline tasks
def test_api_summary_task_is_well_formed_and_split():
    api = {a['qualname']: a for a in stdlib_api_docs()}
    train, test = api_summary_task(n=60, split='train'), api_summary_task(n=60, split='test')
    assert not {e['id'] for e in train} & {e['id'] for e in test}
    assert api_summary_task(n=60, split='train') == train   # deterministic
    for e in train + test:
        assert e['choices'][e['label']] == '    ' + api[e['id']]['summary']
        assert e['context'] == f"{e['id']}{api[e['id']]['signature']}\n" and len(set(e['choices'])) == 4
    pool = {e['choices'][e['label']] for e in test}
    assert all(c in pool for e in test for c in e['choices'])   # distractors come from the same split
    with pytest.raises(ConfigError, match='split'): api_summary_task(split='validation')
    with pytest.raises(DataError, match='distinct summaries'): api_summary_task(n=2)

def test_next_line_task_true_line_follows_context():
    import inspect, json.decoder, textwrap
    texts = [inspect.getsource(m) for m in (json.decoder, textwrap)]
    task = next_line_task(texts, n=40, context_lines=3)
    assert len(task) == 40
    for e in task:
        true = e['choices'][e['label']]
        assert any(e['context'] + true in t for t in texts)
        assert len(set(c.strip() for c in e['choices'])) == 4
    with pytest.raises(DataError, match='two documents'): next_line_task(texts[:1])

def test_random_model_is_at_chance(tok):
    "Loosely: random weights score 25% +- noise through lm-eval (n=100, stderr ~4.3 points), for two seeds."
    accs = []
    for seed in (0, 1):
        scores = task_scores(run_lm_eval(tiny_model(tok, seed=seed), tok, ['doge_api_summary_heldout', 'doge_next_line'],
                                         metadata=dict(n=100, seed=3)))
        for task, r in scores.items():
            assert 0.1 <= r['acc'] <= 0.42 and 0.1 <= r['acc_norm'] <= 0.42, (task, r)
            accs.append(r['acc'])
    assert 0.15 <= sum(accs) / len(accs) <= 0.35


# ---------------------------------------------------------------- the seeds' table
def test_seed_results_and_comparison():
    assert SEED_RESULTS['doge-20m']['cpu_tokens_per_s'] == 142 and SEED_RESULTS['doge-320m']['triviaqa'] == 9.4
    assert all(set(SEED_PROTOCOL) <= set(r) for r in SEED_RESULTS.values())
    rows = compare_with_seeds({'piqa': {'acc_norm': 0.6, 'acc': 0.5}, 'winogrande': {'acc': 0.51}}, 'doge-60m')
    assert rows == [dict(benchmark='piqa', task='piqa', shots=5, metric='acc_norm', ours=60.0, seeds=61.4),
                    dict(benchmark='winogrande', task='winogrande', shots=0, metric='acc', ours=51.0, seeds=50.8)]
    with pytest.raises(ConfigError, match='unknown seed model'): compare_with_seeds({}, 'doge-1b')


# ---------------------------------------------------------------- speed
def test_generation_speed(model, tok):
    torch.set_num_threads(1)
    r = generation_speed(model, tok, prompt_tokens=8, new_tokens=6, batch_size=2, repeats=2, threads=2)
    assert r['threads'] == 2 and torch.get_num_threads() == 1   # measured on 2 threads, then restored
    assert r['tokens_per_s'] == pytest.approx(2 * 6 / r['seconds']) and r['tokens_per_s'] > 0
    assert (r['new_tokens'], r['batch_size'], r['device'], r['dtype']) == (6, 2, 'cpu', 'float32')
    assert model.training is False
    with pytest.raises(ConfigError): generation_speed(model, tok, new_tokens=0)


# ---------------------------------------------------------------- chat: tests/test_inference.py (chat_generate and chat_repl live in small_doge.inference)


# ---------------------------------------------------------------- evaluate_model
def test_evaluate_model_end_to_end(tmp_path, model, tok):
    model.save_pretrained(tmp_path/'m'); tok.save_pretrained(tmp_path/'m')
    r = evaluate_model(tmp_path/'m', limit=6, out_dir=tmp_path/'eval', speed=True, device='cpu')
    json.dumps(r)   # the CLI prints it as JSON
    assert r['tasks'] == list(OFFLINE_TASKS) and set(r['scores']) == set(OFFLINE_TASKS)
    assert {'acc', 'acc_norm', 'acc_stderr'} <= set(r['scores']['doge_next_line'])
    assert {'bits_per_byte', 'byte_perplexity'} <= set(r['scores']['doge_stdlib_perplexity'])
    assert r['scores']['doge_arithmetic']['acc'] == 0.0   # random weights never write a right <answer>
    saved = json.loads((tmp_path/'eval'/'results.json').read_text())
    assert task_scores(saved) == r['scores'] and all(v['effective'] == 6 for v in saved['n-samples'].values())
    table = (tmp_path/'eval'/'results.md').read_text()
    assert all(f'| {t} | 0 | 6 |' in table for t in OFFLINE_TASKS)
    assert r['speed']['tokens_per_s'] > 0 and r['parameters'] == sum(p.numel() for p in model.parameters())

def test_evaluate_model_checkpoint_errors(tmp_path, model, tok):
    with pytest.raises(CheckpointError, match='not found'): evaluate_model(tmp_path/'missing')
    (tmp_path/'empty').mkdir()
    with pytest.raises(CheckpointError, match='config.json'): evaluate_model(tmp_path/'empty')
    model.save_pretrained(tmp_path/'no_tok')
    with pytest.raises(CheckpointError, match='tokenizer'): evaluate_model(tmp_path/'no_tok')
    other = tmp_path/'other'; other.mkdir()
    (other/'config.json').write_text(json.dumps({'model_type': 'llama'}))
    with pytest.raises(CheckpointError, match='llama'): evaluate_model(other)
    model.save_pretrained(tmp_path/'ok'); tok.save_pretrained(tmp_path/'ok')
    with pytest.raises(ConfigError, match='limit'): evaluate_model(tmp_path/'ok', limit=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_scoring_on_cuda_matches_cpu(tok):
    m = tiny_model(tok)
    cpu = task_scores(run_lm_eval(m, tok, ['doge_api_summary_seen'], limit=16))
    gpu = task_scores(run_lm_eval(m.cuda(), tok, ['doge_api_summary_seen'], limit=16))
    assert cpu['doge_api_summary_seen']['acc'] == pytest.approx(gpu['doge_api_summary_seen']['acc'], abs=1 / 16 + 1e-9)
    r = generation_speed(m, tok, new_tokens=8, repeats=1)
    assert r['device'].startswith('cuda')
