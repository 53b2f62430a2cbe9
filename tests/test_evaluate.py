"small_doge.evaluate: the stdlib task generators, decoding speed, chat, and evaluate_model (lm-eval on a saved model)."
import io, json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from small_doge.core import CheckpointError, ConfigError, DataError, seed_everything
from small_doge.data import stdlib_api_docs, token_ids
from small_doge.doge import DogeConfig, DogeForCausalLM
from small_doge.evaluate import (OFFLINE_TASKS, SEED_PROTOCOL, SEED_RESULTS, _fit_history, api_summary_task, chat_generate,
                                 chat_repl, compare_with_seeds, evaluate_model, generation_speed, next_line_task,
                                 run_lm_eval, task_scores)
from small_doge.tokenizer import IM_END, train_tokenizer


def encode(tok, text): return list(token_ids(tok, [text])[0])

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


# ---------------------------------------------------------------- chat
class Scripted(LogitsProcessor):
    "Force `reply(turn)` + `<|im_end|>` + tail; a new turn starts when the input is not the previous one plus a token."
    def __init__(self, tok, reply, tail=()):
        self.tok, self.reply, self.tail, self.turn, self.last = tok, reply, list(tail), 0, -1
    def __call__(self, input_ids, scores):
        n = input_ids.shape[1]
        if n != self.last + 1: self.turn, self.start = self.turn + 1, n
        self.last = n
        script = encode(self.tok, self.reply(self.turn)) + [self.tok.convert_tokens_to_ids(IM_END)] + self.tail
        forced = torch.full_like(scores, -float('inf'))
        forced[:, script[min(n - self.start, len(script) - 1)]] = 0
        return forced

def test_chat_generate_returns_only_the_reply(model, tok):
    p = Scripted(tok, lambda t: 'Woof, `json.dumps`!', tail=encode(tok, 'junk'))
    msgs = [dict(role='system', content='Be brief.'), dict(role='user', content='Hi')]
    assert chat_generate(model, tok, msgs, logits_processor=LogitsProcessorList([p])) == 'Woof, `json.dumps`!'
    out = chat_generate(model, tok, msgs, max_new_tokens=5)   # unscripted: at most 5 tokens, no markup
    assert isinstance(out, str) and '<|im_' not in out and len(encode(tok, out)) <= 5
    with pytest.raises(DataError, match='at least one message'): chat_generate(model, tok, [])

def test_chat_generate_respects_model_positions(model, tok):
    n_pos = model.config.max_position_embeddings
    out = chat_generate(model, tok, [dict(role='user', content='hi')], max_new_tokens=10 * n_pos,
                        logits_processor=LogitsProcessorList([Scripted(tok, lambda t: 'x' * 2000)]))
    assert 0 < len(encode(tok, out)) < n_pos   # capped, not a DataError from running past the positions
    with pytest.raises(DataError, match='positions'):
        chat_generate(model, tok, [dict(role='user', content='word ' * n_pos)])

def test_chat_repl_with_fake_keyboard(model, tok):
    keys, screen = iter(['Hello', '  ', 'Again', '/reset', 'Fresh', '/exit', 'unread']), io.StringIO()
    proc = LogitsProcessorList([Scripted(tok, lambda t: f'Woof {t}!')])
    h = chat_repl(model, tok, system='Be brief.', input_fn=lambda p: next(keys), out=screen, logits_processor=proc)
    assert [m['content'] for m in h] == ['Be brief.', 'Fresh', 'Woof 3!']
    text = screen.getvalue()
    assert 'doge> Woof 1!\n' in text and 'doge> Woof 2!\n' in text and '(history cleared)' in text and '<|im' not in text

def test_chat_repl_eof_and_no_stream(model, tok):
    keys = iter(['Hi'])
    def fake_input(prompt):
        try: return next(keys)
        except StopIteration: raise EOFError from None
    screen = io.StringIO()
    h = chat_repl(model, tok, input_fn=fake_input, out=screen, stream=False,
                  logits_processor=LogitsProcessorList([Scripted(tok, lambda t: 'Bye')]))
    assert h == [dict(role='user', content='Hi'), dict(role='assistant', content='Bye')]
    assert 'doge> Bye\n' in screen.getvalue()

def test_fit_history_drops_oldest_turns(tok):
    h = [dict(role='system', content='s'), dict(role='user', content='a ' * 50), dict(role='assistant', content='b'),
         dict(role='user', content='c')]
    assert _fit_history(tok, h, 30) == [h[0], h[3]]
    assert _fit_history(tok, h, 10_000) == h
    assert _fit_history(tok, h[3:], 1) == h[3:]   # the last message always stays


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
