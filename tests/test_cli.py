"End-to-end tests of the `small-doge` console script, run as a user would (a subprocess, offline)."
import json, os, subprocess, sys
from pathlib import Path
import pytest

def small_doge(*args, home, check=True, timeout=600):
    env = dict(os.environ, SMALL_DOGE_HOME=str(home), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    r = subprocess.run([sys.executable, '-m', 'small_doge.cli', *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r

COMMANDS = ('run', 'corpus', 'tokenizer', 'pretrain', 'sft', 'dpo', 'reason', 'recipes', 'eval', 'chat', 'generate')

def test_help_lists_subcommands(tmp_path):
    out = small_doge('--help', home=tmp_path).stdout
    for name in COMMANDS: assert name in out
    for name in COMMANDS:
        assert f'usage: small-doge {name}' in small_doge(name, '--help', home=tmp_path).stdout

def test_console_script_installed():
    exe = Path(sys.executable).with_name('small-doge')
    assert exe.exists(), 'the small-doge console script is not installed next to python'
    assert subprocess.run([str(exe), '--help'], capture_output=True, text=True).returncode == 0

def test_corpus_then_tokenizer(tmp_path):
    corpus = tmp_path/'corpus'
    summary = json.loads(small_doge('corpus', '--out', corpus, '--max-files', 30, home=tmp_path).stdout)
    assert summary['train']['rows'] > 0 and summary['validation']['rows'] > 0
    assert (corpus/'dataset_dict.json').exists()
    tok = tmp_path/'tok'
    summary = json.loads(small_doge('tokenizer', '--corpus', corpus, '--out', tok, '--vocab-size', 400, home=tmp_path).stdout)
    assert summary['vocab_size'] == 400 and summary['bytes_per_token'] > 1.0 and summary['lossless']
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(tok)
    assert t.decode(t('def f(x): return x')['input_ids']) .endswith('def f(x): return x')
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')], 'temporary files left behind'

def test_run_first_stages(tmp_path):
    r = small_doge('run', '--preset', 'tiny', '--stages', 'corpus,tokenizer', '--out', tmp_path/'run', home=tmp_path)
    summary = json.loads(r.stdout[r.stdout.index('{'):])
    assert '[corpus]' in r.stdout and '[tokenizer]' in r.stdout
    report = (tmp_path/'run'/'report.md').read_text()
    assert 'tokenizer' in report and (tmp_path/'run'/'results.json').exists() and summary['report'].endswith('report.md')
    again = small_doge('run', '--preset', 'tiny', '--stages', 'tokenizer', '--out', tmp_path/'run', home=tmp_path).stdout
    assert '[corpus] reused from' in again and '[tokenizer] ' in again       # a later run picks up finished stages
    assert list(json.loads((tmp_path/'run'/'results.json').read_text())['results']) == ['corpus', 'tokenizer']
    r = small_doge('run', '--preset', 'tiny', '--stages', 'corpus,nope', '--out', tmp_path/'run2', home=tmp_path, check=False)
    assert r.returncode == 2 and "unknown stages ['nope']" in r.stderr

@pytest.mark.slow
def test_tiny_run_shows_the_four_effects(tmp_path):
    "The README's main command, end to end (about 12-13 minutes on 2 cores), and what each stage is measured to do."
    r = small_doge('run', '--preset', 'tiny', '--out', tmp_path/'run', home=tmp_path, timeout=3600)
    effects = json.loads(r.stdout[r.stdout.index('{', r.stdout.index('[samples]')):])['effects']
    assert sorted(effects) == ['dpo', 'forgetting', 'pretrain', 'reason', 'sft'], effects
    assert all(effects[s].startswith('holds') for s in ('pretrain', 'sft', 'dpo', 'forgetting')), effects   # Python kept (replay)
    # reasoning: trace SFT teaches the task; GRPO's gain is small at this size (one or two SE of a single run, positive
    # in seven of seven whole-stage runs, lesson 13), so asserted loosely: up, in the format, greedy not clearly worse
    reason = json.loads((tmp_path/'run'/'reason'/'results.json').read_text())
    assert reason['accuracy_after_sft'] > reason['accuracy_start'] + 0.1 and reason['format_rate_after_grpo'] >= 0.9, reason
    assert reason['grpo_sampled_gain'] > 0 and reason['accuracy_after_grpo'] >= reason['accuracy_after_sft'] - 0.05, reason
    for f in ('report.md', 'results.json', 'curves.png', 'reason/model/model.safetensors', 'eval/final/results.json'):
        assert (tmp_path/'run'/f).exists(), f
    report = (tmp_path/'run'/'report.md').read_text()
    assert '| doge_arithmetic | acc |' in report and '| model after | Python perplexity' in report   # lm-eval, forgetting matrix

def test_bad_input_is_one_clear_error(tmp_path):
    r = small_doge('corpus', '--out', tmp_path/'c', '--files', tmp_path/'missing.txt', home=tmp_path, check=False)
    assert r.returncode == 2 and 'missing.txt' in r.stderr and 'Traceback' not in r.stderr
    bad = tmp_path/'latin1.txt'; bad.write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
    r = small_doge('corpus', '--out', tmp_path/'c', '--files', bad, home=tmp_path, check=False)
    assert r.returncode == 2 and 'latin1.txt' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'c').exists()
    r = small_doge('tokenizer', '--corpus', tmp_path/'nothing', '--out', tmp_path/'t', home=tmp_path, check=False)
    assert r.returncode == 2 and 'nothing' in r.stderr and not (tmp_path/'t').exists()

@pytest.fixture(scope='module')
def tiny_model_dir(tmp_path_factory):
    "A randomly initialised tiny Doge saved with a small trained tokenizer (what a training stage leaves behind)."
    from small_doge.data import pystdlib_corpus
    from small_doge.tokenizer import train_tokenizer, save_tokenizer
    from small_doge.doge import DogeConfig, DogeForCausalLM
    d = tmp_path_factory.mktemp('model')
    tok = train_tokenizer(pystdlib_corpus(max_files=10, cache=False)['train'], vocab_size=400)
    cfg = DogeConfig.from_preset('tiny', vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    DogeForCausalLM(cfg).save_pretrained(d); save_tokenizer(tok, d/'tok')
    for f in (d/'tok').iterdir(): f.rename(d/f.name)
    (d/'tok').rmdir()
    return d

def test_generate_chat_eval(tiny_model_dir, tmp_path):
    r = small_doge('generate', '--model', tiny_model_dir, '--prompt', 'def main(', '--max-new-tokens', 5, home=tmp_path)
    assert r.stdout.startswith('def main(')
    env = dict(os.environ, SMALL_DOGE_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, '-m', 'small_doge.cli', 'chat', '--model', str(tiny_model_dir), '--max-new-tokens', '4'],
                       input='hello\n/exit\n', capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('doge> ') == 1   # one reply to the one message, then /exit
    out = json.loads(small_doge('eval', '--model', tiny_model_dir, '--n-examples', 8, '--out', tmp_path/'eval', '--no-speed', home=tmp_path).stdout)
    assert out['scores']['doge_stdlib_perplexity']['bits_per_byte'] > 0 and len(out['scores']) == 5
    assert (tmp_path/'eval'/'results.json').exists() and 'doge_next_line' in (tmp_path/'eval'/'results.md').read_text()

def test_stage_command_rejects_bad_recipe(tmp_path):
    r = small_doge('pretrain', '--config', 'pretrain-tiny-cpu', '--set', 'lerning_rate=1', home=tmp_path, check=False)
    assert r.returncode == 2 and 'lerning_rate' in r.stderr and 'Traceback' not in r.stderr
    r = small_doge('sft', '--config', 'pretrain-tiny-cpu', home=tmp_path, check=False)
    assert r.returncode == 2 and "not 'sft'" in r.stderr
    r = small_doge('eval', '--model', tmp_path/'nothing', home=tmp_path, check=False)
    assert r.returncode == 2 and 'nothing' in r.stderr and 'Traceback' not in r.stderr
    assert json.loads(small_doge('recipes', home=tmp_path).stdout)
