"Lesson 14 against lm-evaluation-harness: the by-hand scorer equals HFLM, the packaged offline tasks, the seeds' settings (offline: names resolve, shots, metrics), errors, and `lm_eval` from the shell."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
import yaml

from small_doge.core import CheckpointError, ConfigError, DataError, seed_everything
from small_doge.data import check_answer, format_trace, arithmetic_trace, stdlib_api_docs, token_ids
from small_doge.doge import DogeConfig, DogeForCausalLM
from small_doge.evaluate import (OFFLINE_TASKS, SEED_PROTOCOL, api_summary_data, api_summary_task, arithmetic_data,
                                 arithmetic_prompt, arithmetic_results, evaluate_model, load_tasks, next_line_data,
                                 run_lm_eval, stdlib_text_data, task_data_dir, task_scores, tasks_dir)
from small_doge.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

def help_text(a): return f"{a['qualname']}{a['signature']}\n    {a['summary']}\n"

@pytest.fixture(scope='module')
def tok():
    return train_tokenizer([help_text(a) for a in stdlib_api_docs()], vocab_size=384)

@pytest.fixture(scope='module')
def model(tok):
    "Dense, and a window as long as its positions: no top-k ties, so transformers' native Doge computes the same."
    seed_everything(0)
    cfg = DogeConfig.from_preset('tiny', vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, keep_window_size=256)
    return DogeForCausalLM(cfg).eval()

@pytest.fixture(scope='module')
def saved(tmp_path_factory, model, tok):
    d = tmp_path_factory.mktemp('tiny')/'model'
    model.save_pretrained(d); tok.save_pretrained(d)
    return d


# ---------------------------------------------------------------- the draft equals lm-eval
@torch.no_grad()
def draft_scores(model, tok, ex):
    "Lesson 14's draft: the continuation's summed log-prob, one forward pass per choice, context/continuation split like lm-eval."
    enc = lambda s: list(token_ids(tok, [s])[0])
    out = []
    for choice in ex['choices']:
        ctx, cont = ex['context'], choice
        n_space = len(ctx) - len(ctx.rstrip())
        if n_space: ctx, cont = ctx[:-n_space], ctx[-n_space:] + cont
        c, whole = enc(ctx), enc(ctx + cont)
        ids = torch.tensor([whole])
        lp = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[-(len(whole) - len(c)):].sum().item())
    return out

def test_draft_equals_lm_eval_per_example_and_in_accuracy(tmp_path, model, tok):
    exs = api_summary_task(n=6, split='train', seed=5)
    exs.append(dict(context='json.dumps(obj) returns  ', choices=['a string', 'bytes', 'None'], label=0))   # trailing spaces
    task = dict(task='draft_check', dataset_path='json', dataset_kwargs=dict(data_files=dict(test=str(tmp_path/'mc.jsonl'))),
                test_split='test', output_type='multiple_choice', doc_to_text='context', doc_to_choice='choices',
                doc_to_target='label', target_delimiter='', metric_list=[dict(metric='acc'), dict(metric='acc_norm')])
    (tmp_path/'mc.jsonl').write_text(''.join(json.dumps(ex) + '\n' for ex in exs))
    (tmp_path/'draft_check.yaml').write_text(yaml.safe_dump(task))
    res = run_lm_eval(model, tok, [str(tmp_path/'draft_check.yaml')], log_samples=True)
    samples = sorted(res['samples']['draft_check'], key=lambda s: s['doc_id'])
    theirs = [[r[0][0] for r in s['resps']] for s in samples]
    ours = [draft_scores(model, tok, ex) for ex in exs]
    for t, o in zip(theirs, ours): assert t == pytest.approx(o, abs=1e-5)
    argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)
    acc = sum(argmax(o) == ex['label'] for o, ex in zip(ours, exs)) / len(exs)
    acc_norm = sum(argmax([v / len(c) for v, c in zip(o, ex['choices'])]) == ex['label'] for o, ex in zip(ours, exs)) / len(exs)
    assert (res['results']['draft_check']['acc,none'], res['results']['draft_check']['acc_norm,none']) == (acc, acc_norm)

def test_lm_eval_scores_transformers_native_doge_the_same(model, tok):
    "lm-eval needs only the causal-LM interface: transformers' own Doge with the same weights scores the same."
    from transformers import DogeConfig as HFDogeConfig, DogeForCausalLM as HFDogeForCausalLM
    hf_cfg = HFDogeConfig(**{k: v for k, v in model.config.to_dict().items() if k in HFDogeConfig().to_dict() and k != 'model_type'})
    hf = HFDogeForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict())
    a = run_lm_eval(model, tok, ['doge_api_summary_seen'], limit=8, log_samples=True)['samples']['doge_api_summary_seen']
    b = run_lm_eval(hf, tok, ['doge_api_summary_seen'], limit=8, log_samples=True)['samples']['doge_api_summary_seen']
    for x, y in zip(a, b): assert [r[0][0] for r in x['resps']] == pytest.approx([r[0][0] for r in y['resps']], abs=1e-4)


# ---------------------------------------------------------------- the packaged offline tasks
def test_offline_tasks_are_packaged_and_registered():
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    assert {*OFFLINE_TASKS, 'doge_offline', 'doge_seeds', 'doge_seeds_arc', 'doge_seeds_mmlu'} <= set(tm.all_tasks)
    assert (Path(__file__).parents[1]/'setup.py').read_text().count("'tasks/*.yaml'") == 1   # shipped as package data
    tm_, built = load_tasks(['doge_offline'])
    assert sorted(t.task_name for t in built) == sorted(OFFLINE_TASKS)

def test_task_data_is_generated_once_and_matches_the_generators(tmp_path, monkeypatch):
    monkeypatch.setenv('SMALL_DOGE_HOME', str(tmp_path))
    rows = api_summary_data(split='test', n=12, seed=1)['test']
    assert rows.to_list() == api_summary_task(12, split='test', seed=1)
    files = sorted(task_data_dir().glob('api_summary_test-*.jsonl'))
    assert len(files) == 1 and files[0].parent == tmp_path/'eval-tasks'
    mtime = files[0].stat().st_mtime_ns
    api_summary_data(split='test', n=12, seed=1)
    assert files[0].stat().st_mtime_ns == mtime                      # cached, not rewritten
    files[0].write_text('{"context": broken\n')
    with pytest.raises(DataError, match=str(files[0].name)): api_summary_data(split='test', n=12, seed=1)
    nl = next_line_data(n=10)['test']
    assert len(nl) == 10 and all(len(set(r['choices'])) == 4 and 0 <= r['label'] < 4 for r in nl)
    texts = stdlib_text_data(n=5, max_chars=300)['test']['text']
    assert len(texts) == 5 and all(0 < len(t) <= 300 for t in texts)

def test_arithmetic_task_prompt_and_checker(tok):
    problems = arithmetic_data(n=30, min_operands=3, max_operands=3, ops='+-')['test']
    from small_doge.data import reasoning_dataset
    train = set(p[0]['content'] for p in reasoning_dataset(n_train=300, n_test=30, min_operands=3, max_operands=3, ops='+-')['train']['prompt'])
    assert not train & set(problems['question'])                     # held out from the recipes' training problems
    doc = problems[0]
    assert arithmetic_prompt(doc) == tok.apply_chat_template([dict(role='user', content=doc['question'])],
                                                             add_generation_prompt=True, tokenize=False)
    right = format_trace(arithmetic_trace(doc['question'].removeprefix('Compute ')))
    assert arithmetic_results(doc, [right]) == dict(acc=1.0, format_rate=1.0) and check_answer(right, doc['answer'])
    assert arithmetic_results(doc, [right.replace(f"<answer>{doc['answer']}<", '<answer>1000<')]) == dict(acc=0.0, format_rate=1.0)


# ---------------------------------------------------------------- the seeds' settings (lm-eval's registry, offline)
def _plain_yaml(path):
    class Loader(yaml.SafeLoader): pass
    Loader.add_constructor('!function', lambda loader, node: loader.construct_scalar(node))
    Loader.add_multi_constructor('', lambda loader, suffix, node: None)
    return yaml.load(Path(path).read_text(), Loader=Loader)

def test_seed_settings_resolve_in_lm_evals_registry():
    "Every task of doge_seeds resolves offline, with the shots of SEED_PROTOCOL and the metric it compares."
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(tasks_dir()))
    index = tm.task_index
    members = _plain_yaml(tasks_dir()/'doge_seeds.yaml')['task']
    shots = {}
    for m in members:
        name = m['task'] if isinstance(m, dict) else m
        assert name in tm.all_tasks, name
        shots[name] = m['num_fewshot'] if isinstance(m, dict) else _plain_yaml(index[name].yaml_path)['num_fewshot']
    assert shots == {p['task']: p['num_fewshot'] for p in SEED_PROTOCOL.values()}
    def leaf_configs(name):
        "The YAML configs (includes resolved) of the tasks under `name`."
        from lm_eval.tasks._yaml_loader import load_yaml
        entry = index[name]
        if entry.kind.name == 'TAG': return [c for t in sorted(entry.tags) for c in leaf_configs(t)]
        cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
        if entry.kind.name == 'GROUP': return [c for t in cfg['task'] for c in leaf_configs(t)]
        return [cfg]
    for col, p in SEED_PROTOCOL.items():
        configs = leaf_configs(p['task'])
        assert configs, col
        metric = p['metric'].split(',')[0]
        for cfg in configs:
            names = [m['metric'] for m in cfg.get('metric_list', [])] or ['acc', 'acc_norm']   # multiple_choice defaults
            assert metric in names, (col, cfg.get('task'), names)
    assert len(leaf_configs('doge_seeds_mmlu')) == 57 and len(leaf_configs('doge_seeds_arc')) == 2
    for group in ('doge_seeds_arc', 'doge_seeds_mmlu'):
        assert _plain_yaml(tasks_dir()/f'{group}.yaml')['aggregate_metric_list'][0]['metric'] == 'acc_norm'


# ---------------------------------------------------------------- bad input: one clear error naming it
def test_unknown_task_missing_data_and_no_tokenizer(tmp_path, saved, model):
    with pytest.raises(ConfigError, match="unknown task 'doge_api_sumary_seen'"): evaluate_model(saved, tasks=['doge_api_sumary_seen'])
    with pytest.raises(ConfigError, match='task file not found: .*nope.yaml'): evaluate_model(saved, tasks=[str(tmp_path/'nope.yaml')])
    task = dict(task='my_task', dataset_path='json', output_type='multiple_choice', test_split='test',
                dataset_kwargs=dict(data_files=dict(test=str(tmp_path/'missing.jsonl'))))
    (tmp_path/'my_task.yaml').write_text(yaml.safe_dump(task))
    with pytest.raises(DataError, match='data file not found: .*missing.jsonl'): evaluate_model(saved, tasks=[str(tmp_path/'my_task.yaml')])
    model.save_pretrained(tmp_path/'no_tok')
    with pytest.raises(CheckpointError, match='tokenizer'): evaluate_model(tmp_path/'no_tok')


# ---------------------------------------------------------------- `small-doge eval` and `lm_eval` from the shell agree
def _bin(name): return str(Path(sys.executable).parent/name)

def test_small_doge_eval_and_lm_eval_shell_give_the_same_numbers(tmp_path, saved):
    if json.loads((saved/'config.json').read_text()).get('model_type') != 'doge':
        pytest.skip('needs issue 11: saved checkpoints must load without small_doge (config model_type doge)')
    tasks = ['doge_api_summary_seen', 'doge_next_line', 'doge_stdlib_perplexity', 'doge_arithmetic']
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    ours = subprocess.run([_bin('small-doge'), 'eval', '--model', str(saved), '--tasks', ','.join(tasks), '--limit', '6',
                           '--out', str(tmp_path/'ours'), '--device', 'cpu', '--no-speed'],
                          capture_output=True, text=True, env=env, timeout=900)
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = subprocess.run([_bin('lm_eval'), '--model', 'hf', '--model_args', f'pretrained={saved},dtype=float32',
                             '--tasks', ','.join(tasks), '--include_path', str(tasks_dir()), '--limit', '6',
                             '--batch_size', '8', '--device', 'cpu', '--output_path', str(tmp_path/'theirs')],
                            capture_output=True, text=True, env=env, timeout=900)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    a = task_scores(json.loads((tmp_path/'ours'/'results.json').read_text()))
    b = task_scores(json.loads(next((tmp_path/'theirs').rglob('results_*.json')).read_text()))
    assert set(a) == set(b) == set(tasks)
    for t in tasks:
        for metric, value in a[t].items():
            assert b[t][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (t, metric)
