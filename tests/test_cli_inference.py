"`small-doge generate`, `chat` and `bench` as a user runs them: subprocesses, pipes, SIGINT, bad input."
import json, os, signal, subprocess, sys, threading, time

import pytest
import torch

from small_doge.core import seed_everything
from small_doge.doge import DogeConfig, DogeForCausalLM

ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1'}

def ctrl_c_as_in_a_terminal():
    "Child setup: a test run started in the background inherits SIGINT ignored, and Python keeps an inherited SIG_IGN."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, '-m', 'small_doge.cli', *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout, env=ENV)


def one_clear_error(r, *words):
    "Exit status 2, one line on stderr naming the problem, no traceback."
    err = r.stderr.decode(errors='replace')
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert 'Traceback' not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith('Loading weights')]   # transformers' progress bar
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    return lines[0]


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    "A tiny chat model with 4096 positions whose greedy replies never end on their own (its stop tokens never win)."
    from small_doge.tokenizer import stop_token_ids, train_tokenizer
    d = tmp_path_factory.mktemp('tiny-chat')
    tok = train_tokenizer(['def f(x):\n    return x\n', 'Woof! Ask me about json.', 'hello there'] * 40, vocab_size=300)
    seed_everything(0)
    model = DogeForCausalLM(DogeConfig.from_preset('tiny', vocab_size=len(tok), max_position_embeddings=4096,
                                                   tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                                   eos_token_id=tok.eos_token_id))
    with torch.no_grad():
        for i in stop_token_ids(tok): model.lm_head.weight[i] = 0   # logit 0 never beats the largest of 300 random logits
    model.save_pretrained(d); tok.save_pretrained(d)
    return d


@pytest.fixture(scope='module')
def tiny_preset_dir(tmp_path_factory):
    "A model of the tiny preset as it is (256 positions)."
    from small_doge.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp('tiny-preset')
    tok = train_tokenizer(['def f(x):\n    return x\n', 'hello there'] * 40, vocab_size=300)
    seed_everything(1)
    DogeForCausalLM(DogeConfig.from_preset('tiny', vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                           eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# ---------------------------------------------------------------- generate
def test_generate_default_fits_the_tiny_preset(tiny_preset_dir):
    "No --max-new-tokens: 256 new tokens would not fit in 256 positions; the default is derived from the model."
    r = cli('generate', '--model', tiny_preset_dir, '--prompt', 'def f(x):')
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().startswith('def f(x):') and len(r.stdout.decode()) > len('def f(x):')


@pytest.mark.slow   # a CLI subprocess each (~5-10 CPU s of imports): CI budget; the in-process tests cover the same code
def test_generate_streams_and_samples_reproducibly(tiny_preset_dir):
    a = cli('generate', '--model', tiny_preset_dir, '--prompt', 'hello', '--max-new-tokens', 12, '--temperature', 0.8, '--seed', 3)
    b = cli('generate', '--model', tiny_preset_dir, '--prompt', 'hello', '--max-new-tokens', 12, '--temperature', 0.8, '--seed', 3)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.decode().startswith('hello')


@pytest.mark.parametrize('args,words', [
    (['--max-new-tokens', 0], ['--max-new-tokens must be >= 1, got 0']),
    (['--max-new-tokens', -4], ['got -4']),
    pytest.param(['--temperature', -1], ['--temperature must be >= 0'], marks=pytest.mark.slow),
    pytest.param(['--temperature', 'nan'], ['--temperature'], marks=pytest.mark.slow),
    pytest.param(['--top-p', 0], ['--top-p must be in (0, 1]'], marks=pytest.mark.slow),
    (['--max-new-tokens', 300], ['max_length=256']),
])
def test_generate_bad_options(tiny_preset_dir, args, words):
    one_clear_error(cli('generate', '--model', tiny_preset_dir, '--prompt', 'hello', *args), 'small-doge generate: error:', *words)


def test_generate_empty_long_and_undecodable_prompts(tiny_preset_dir):
    one_clear_error(cli('generate', '--model', tiny_preset_dir, '--prompt', ''), 'empty prompt')
    one_clear_error(cli('generate', '--model', tiny_preset_dir, '--prompt', 'word ' * 400), 'positions')
    r = subprocess.run([sys.executable, '-m', 'small_doge.cli', 'generate', '--model', str(tiny_preset_dir), '--prompt',
                        os.fsdecode(b'bad \xff byte')], capture_output=True, timeout=300, env=ENV)
    one_clear_error(r, 'not valid UTF-8')


def test_a_model_that_is_not_a_doge(tmp_path):
    (tmp_path/'config.json').write_text(json.dumps({'model_type': 'gpt2', 'n_layer': 2}))
    for cmd in (['generate', '--prompt', 'hi'], ['chat']):
        one_clear_error(cli(*cmd, '--model', tmp_path, stdin=b'hi\n'), 'not Doge')


# ---------------------------------------------------------------- chat
@pytest.mark.slow   # a CLI subprocess each (~5-10 CPU s of imports): CI budget; the in-process tests cover the same code
def test_chat_conversation_bad_bytes_and_a_huge_message(model_dir):
    script = b'Hello\n' + b'bad \xff\xfe line\n' + b'word ' * 20_000 + b'\n' + b'Still there?\n/exit\n'
    r = cli('chat', '--model', model_dir, '--max-new-tokens', 20, stdin=script)
    out = r.stdout.decode(errors='replace')
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert 'not valid UTF-8' in out and 'message too long' in out
    assert out.count('doge> ') == 2 and 'Traceback' not in r.stderr.decode()


@pytest.mark.slow   # a CLI subprocess each (~5-10 CPU s of imports): CI budget; the in-process tests cover the same code
def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(model_dir):
    p = subprocess.Popen([sys.executable, '-m', 'small_doge.cli', 'chat', '--model', str(model_dir), '--max-new-tokens', '3500'],
                         preexec_fn=ctrl_c_as_in_a_terminal,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(b) for b in iter(lambda: p.stdout.read(1), b'')], daemon=True)
    reader.start()
    def wait_for(text, n=1, timeout=240):
        end = time.time() + timeout
        while bytes(seen).count(text) < n:
            assert time.time() < end and p.poll() is None, (bytes(seen)[-2000:], p.poll())
            time.sleep(0.05)
    try:
        p.stdin.write(b'Tell me a long story\n'); p.stdin.flush()
        wait_for(b'doge> ')
        time.sleep(0.3)                                     # mid-reply: 3500 tokens take far longer than this
        p.send_signal(signal.SIGINT)
        wait_for(b'[stopped]')
        p.stdin.write(b'And now?\n'); p.stdin.flush()        # the same session goes on...
        wait_for(b'doge> ', n=2)
        p.send_signal(signal.SIGINT)                        # (stop that one too, to keep the test short)
        wait_for(b'[stopped]', n=2)
        p.stdin.write(b'/exit\n'); p.stdin.flush()
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None: p.kill()
    reader.join(timeout=10)
    assert b'Traceback' not in p.stderr.read()
    assert bytes(seen).count(b'you> ') >= 3


# ---------------------------------------------------------------- bench
@pytest.mark.slow   # a CLI subprocess each (~5-10 CPU s of imports): CI budget; the in-process tests cover the same code
def test_bench_decode_and_train_tables(tiny_preset_dir):
    r = cli('bench', 'decode', '--model', tiny_preset_dir, '--threads', 1, '--new-tokens', 4, '--context', 8, '--batch', 2,
            '--repeats', 1, '--json')
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads(r.stdout)
    assert res['greedy_tokens_identical']['FastGenerator == small_doge generate()'] is True and len(res['rows']) == 9
    r = cli('bench', 'train', '--preset', 'tiny', '--threads', 1, '--batch', 2, '--seq-len', 32, '--repeats', 1)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    table = r.stdout.decode()
    assert 'transformers native (eager)' in table and 'small_doge, sdpa attention' in table and 'vs native' in table
    one_clear_error(cli('bench', 'decode', '--preset', 'doge-1b'), "unknown Doge preset 'doge-1b'")
    one_clear_error(cli('bench', 'decode', '--preset', 'tiny', '--context', 300), 'more than the model allows')
