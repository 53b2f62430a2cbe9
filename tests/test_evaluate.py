"small_doge.evaluate: perplexity, harness-style multiple choice (forced models, batching, parity), offline tasks, speed, chat, evaluate_model."
import io, json, math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from small_doge.core import CheckpointError, ConfigError, DataError, seed_everything
from small_doge.data import ByteTokenizer, stdlib_api_docs
from small_doge.doge import DOGE_PRESETS, DogeConfig, DogeForCausalLM
from small_doge.evaluate import (HUB_BENCHMARKS, SEED_RESULTS, api_summary_task, arc_example,
                                 check_mc_examples, choice_loglikelihoods, document_windows,
                                 encode, encode_pair, evaluate_model, generation_speed, hellaswag_example,
                                 load_benchmark, mmlu_example, multiple_choice_accuracy,
                                 next_line_task, openbookqa_example, perplexity, piqa_example, sequence_logprobs,
                                 winogrande_example)
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


class ForcedLM(torch.nn.Module):
    "Every prediction is `token_id` (logit 0, everything else -30); accepts the kwargs the scorer passes."
    def __init__(self, token_id, vocab_size):
        super().__init__(); self.token_id, self.vocab_size = token_id, vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))
    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = torch.full((*input_ids.shape, self.vocab_size), -30.0)
        logits[..., self.token_id] = 0.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

ZLM, BTOK = ForcedLM(ord('z'), 258), ByteTokenizer()


# ---------------------------------------------------------------- log-probs and perplexity
def test_sequence_logprobs_match_model_loss(model, tok):
    seqs = [encode(tok, help_text(a)) for a in stdlib_api_docs()[:6]]
    lps = sequence_logprobs(model, seqs, tok.pad_token_id)
    for s, lp in zip(seqs, lps):
        x = torch.tensor([s])
        with torch.no_grad(): ref = model(x, labels=x).loss.item()
        assert lp.shape == (len(s) - 1,)
        assert math.isclose(-lp.mean().item(), ref, rel_tol=1e-4)
    tails = sequence_logprobs(model, seqs, tok.pad_token_id, keep=2)
    for lp, t in zip(lps, tails): torch.testing.assert_close(t, lp[-2:], atol=1e-5, rtol=0)

def test_document_windows_predict_every_token_once():
    for n in (1, 2, 5, 17):
        for bs in (2, 3, 8):
            w = document_windows(range(n), bs)
            assert all(len(x) <= bs for x in w)
            predicted = [t for x in w for t in x[1:]]
            assert predicted == list(range(1, n))

def test_perplexity_document_mode_exact(model, tok):
    texts = [help_text(a) for a in stdlib_api_docs()[10:16]]
    total = count = 0
    for t in texts:
        ids = torch.tensor([encode(tok, t) + [tok.eos_token_id]])
        with torch.no_grad(): total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    r = perplexity(model, tok, texts, block_size=512, mode='document', progress=False)
    assert r['tokens'] == count
    assert math.isclose(r['loss'], total / count, rel_tol=1e-4) and math.isclose(r['ppl'], math.exp(r['loss']))
    # short windows predict the same tokens with less context: same count, different loss
    short = perplexity(model, tok, texts, block_size=4, mode='document', batch_size=3, progress=False)
    assert short['tokens'] == count

def test_perplexity_pack_counts_and_limits(model, tok):
    texts = [help_text(a) for a in stdlib_api_docs()[:30]]
    n_tokens = sum(len(encode(tok, t)) + 1 for t in texts)
    r = perplexity(model, tok, texts, block_size=32, progress=False)
    assert r['tokens'] == n_tokens - r['blocks'] and r['blocks'] == math.ceil(n_tokens / 32)
    assert 0.5 * len(tok) < r['ppl'] < 1.5 * len(tok)   # random model: about uniform
    assert perplexity(model, tok, texts, block_size=32, max_blocks=2, progress=False)['tokens'] == 62
    assert model.training is False

def test_perplexity_errors(model, tok):
    with pytest.raises(DataError, match='non-empty'): perplexity(model, tok, ['', ''], progress=False)
    with pytest.raises(ConfigError, match='mode'): perplexity(model, tok, ['abc'], mode='sliding', progress=False)
    with pytest.raises(ConfigError, match='block_size'): perplexity(model, tok, ['abc'], block_size=1, progress=False)


# ---------------------------------------------------------------- multiple choice
def test_encode_pair_moves_space_and_keeps_joint_tokenisation(tok):
    for ctx, cont in [('import ', 'os'), ('json.dumps(obj)\n', '    Serialize obj.'), ('Question: x\nAnswer:', ' yes')]:
        c, k = encode_pair(tok, ctx, cont)
        assert c + k == encode(tok, ctx + cont)
        assert c == encode(tok, ctx.rstrip())
        assert tok.decode(k) == ctx[len(ctx.rstrip()):] + cont

def test_forced_model_certain_answers():
    ex = dict(context='Pick:', choices=[' abc', ' zzz', ' zz!'], label=1)
    scores = choice_loglikelihoods(ZLM, BTOK, [ex], progress=False)[0]
    assert scores == pytest.approx([-120, -30, -60], abs=1e-3)
    assert multiple_choice_accuracy(ZLM, BTOK, [ex] * 3, progress=False)['acc'] == 1.0
    r = multiple_choice_accuracy(ZLM, BTOK, [ex, dict(ex, label=0)], progress=False)
    assert (r['acc'], r['n'], r['chance']) == (0.5, 2, pytest.approx(1 / 3))
    # sum prefers the short choice, per-character the long one
    r = multiple_choice_accuracy(ZLM, BTOK, [dict(context='Q:', choices=['q', 'zzzzzzzzqq'], label=1)], progress=False)
    assert (r['acc'], r['acc_norm']) == (0.0, 1.0)

def test_empty_context_and_truncation():
    # no context: conditioned on the tokenizer's EOS (ByteTokenizer has no BOS), so every character is scored
    assert choice_loglikelihoods(ZLM, BTOK, [dict(context='', choices=['zz', 'ab'], label=0)], progress=False)[0] == \
        pytest.approx([0, -60], abs=1e-3)
    # over-long requests keep their end; the continuation is still fully scored
    long = dict(context='a' * 50, choices=['zzzz', 'zzaz'], label=0)
    assert choice_loglikelihoods(ZLM, BTOK, [long], max_length=8, progress=False)[0] == pytest.approx([0, -30], abs=1e-3)

def test_winogrande_style_contexts():
    ex = dict(context=['aaa', 'zzz'], choices=[' zz', ' zz'], label=1)
    s = choice_loglikelihoods(ZLM, BTOK, [ex], progress=False)[0]
    assert s[0] == pytest.approx(s[1])

@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.text('abcxyz \n', max_size=12), st.lists(st.text('abz ', min_size=1, max_size=6),
                                                                      min_size=2, max_size=4)), min_size=1, max_size=5),
       st.integers(1, 7))
def test_batching_does_not_change_scores(examples, batch_size):
    model = ByteDoge.get()
    exs = [dict(context=c, choices=ch, label=0) for c, ch in examples]
    one = choice_loglikelihoods(model, BTOK, exs, batch_size=1, progress=False)
    many = choice_loglikelihoods(model, BTOK, exs, batch_size=batch_size, progress=False)
    for a, b in zip(one, many): assert a == pytest.approx(b, abs=1e-3)

class ByteDoge:
    _m = None
    @classmethod
    def get(cls):
        if cls._m is None:
            seed_everything(1)
            cls._m = DogeForCausalLM(DogeConfig.from_preset('tiny', vocab_size=258, pad_token_id=257, eos_token_id=256)).eval()
        return cls._m

def test_scores_agree_with_transformers_native_doge(tok):
    "The scorer only needs the causal-LM interface: transformers' own Doge with the same weights scores the same."
    from transformers import DogeConfig as HFDogeConfig, DogeForCausalLM as HFDogeForCausalLM
    ours = tiny_model(tok, keep_window_size=256)
    hf_cfg = HFDogeConfig(**{k: v for k, v in ours.config.to_dict().items() if k in HFDogeConfig().to_dict() and k != 'model_type'})
    hf = HFDogeForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict())
    exs = api_summary_task(n=6, split='train')
    a = choice_loglikelihoods(ours, tok, exs, batch_size=5, progress=False)
    b = choice_loglikelihoods(hf, tok, exs, batch_size=5, progress=False)
    for x, y in zip(a, b): assert x == pytest.approx(y, abs=2e-3)

def test_check_mc_examples_names_the_problem():
    ok = dict(context='q', choices=['a', 'b'], label=1)
    check_mc_examples([ok])
    for bad, msg in [([], 'no multiple-choice'), ([dict(ok, label=2)], 'label 2'), ([dict(ok, label=True)], 'label True'),
                     ([dict(ok, choices=['a'])], '1 choice'), ([{'context': 'q', 'label': 0}], "['choices']"),
                     ([dict(ok, context=['a', 'b', 'c'])], '3 contexts')]:
        with pytest.raises(DataError, match=msg.replace('[', r'\[').replace(']', r'\]')): check_mc_examples(bad)
    with pytest.raises(DataError, match='no tokens'):
        choice_loglikelihoods(ZLM, BTOK, [dict(context='q', choices=['', 'a'], label=0)], progress=False)


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
    "Loosely: random weights give 25% +- noise (n=100, stderr ~4.3 points), for several seeds."
    import inspect, json.encoder, textwrap, statistics
    tasks = [api_summary_task(n=100, split='test', seed=3),
             next_line_task([inspect.getsource(m) for m in (json.encoder, textwrap, statistics)], n=100, context_lines=4)]
    accs = []
    for seed in (0, 1):
        m = tiny_model(tok, seed=seed)
        for t in tasks:
            r = multiple_choice_accuracy(m, tok, t, progress=False)
            assert 0.1 <= r['acc'] <= 0.42 and 0.1 <= r['acc_norm'] <= 0.42, r
            accs.append(r['acc'])
    assert 0.15 <= sum(accs) / len(accs) <= 0.35


# ---------------------------------------------------------------- hub converters (never downloaded here)
def test_hub_converters():
    arc = arc_example(dict(question='Q?', answerKey='C', choices=dict(text=['a', 'b', 'c'], label=['A', 'B', 'C'])))
    assert arc == dict(context='Question: Q?\nAnswer:', choices=[' a', ' b', ' c'], label=2)
    assert arc_example(dict(question='Q?', answerKey='2', choices=dict(text=['a', 'b'], label=['1', '2'])))['label'] == 1
    assert piqa_example(dict(goal='G', sol1='x', sol2='y', label=0)) == dict(context='Question: G\nAnswer:', choices=[' x', ' y'], label=0)
    hs = hellaswag_example(dict(activity_label='Cooking', ctx_a='A cook.', ctx_b='she', label='2',
                                endings=['a [header] b', ' c  d ', 'e', 'f']))
    assert hs == dict(context='Cooking: A cook. She', choices=[' a b', ' c d', ' e', ' f'], label=2)
    ob = openbookqa_example(dict(question_stem='Sun is', answerKey=' B', choices=dict(text=['cold', 'hot'], label=['A', 'B'])))
    assert ob == dict(context='Sun is', choices=[' cold', ' hot'], label=1)
    wg = winogrande_example(dict(sentence='Ann gave Bo a gift because _ was kind.', option1='Ann', option2='Bo', answer='1'))
    assert wg == dict(context=['Ann gave Bo a gift because Ann', 'Ann gave Bo a gift because Bo'],
                      choices=[' was kind.', ' was kind.'], label=0)
    mm = mmlu_example(dict(question=' 1+1? ', subject='high_school_math', choices=['1', '2', '3', '4'], answer=1))
    assert mm['context'] == ('The following are multiple choice questions (with answers) about high school math.\n\n'
                             '1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:')
    assert (mm['choices'], mm['label']) == ([' A', ' B', ' C', ' D'], 1)
    check_mc_examples([arc, hs, ob, wg, mm])

def test_hub_registry_covers_seed_benchmarks():
    assert {'arc_easy', 'arc_challenge', 'piqa', 'hellaswag', 'openbookqa', 'winogrande', 'mmlu'} <= set(HUB_BENCHMARKS)
    assert all(callable(spec['convert']) and spec['path'] and spec['split'] for spec in HUB_BENCHMARKS.values())
    assert SEED_RESULTS['doge-20m']['cpu_tokens_per_s'] == 142
    with pytest.raises(ConfigError, match='unknown benchmark'): load_benchmark('trivia')


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
    r = evaluate_model(tmp_path/'m', n_examples=12, block_size=64, max_eval_tokens=256, max_files=120,
                       progress=False, speed=True, device='cpu')
    json.dumps(r)   # the CLI prints it as JSON
    assert set(r['multiple_choice']) == {'api_summary_seen', 'api_summary_heldout', 'next_line'}
    assert all(v['n'] == 12 for v in r['multiple_choice'].values())
    assert r['perplexity']['blocks'] == 4 and r['perplexity']['tokens'] == 4 * 63
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_scoring_on_cuda_matches_cpu(tok):
    m = tiny_model(tok)
    exs = api_summary_task(n=8, split='train')
    cpu = choice_loglikelihoods(m, tok, exs, progress=False)
    gpu = choice_loglikelihoods(m.cuda(), tok, exs, progress=False)
    for a, b in zip(cpu, gpu): assert a == pytest.approx(b, abs=1e-2)
    r = generation_speed(m, tok, new_tokens=8, repeats=1)
    assert r['device'].startswith('cuda')

def test_batching_with_absolute_positions():
    "Left padding needs explicit position ids: a GPT-2 (learned absolute positions) scores the same batched or not."
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=64, n_embd=32, n_layer=1, n_head=2, eos_token_id=256)).eval()
    exs = [dict(context='ab', choices=[' z', ' zzzzzz a'], label=0), dict(context='a much longer context', choices=['x', 'y'], label=1)]
    one = choice_loglikelihoods(gpt, BTOK, exs, batch_size=1, progress=False)
    many = choice_loglikelihoods(gpt, BTOK, exs, batch_size=4, progress=False)
    for a, b in zip(one, many): assert a == pytest.approx(b, abs=1e-4)
    seqs = [list(b'short'), list(b'a longer sequence of bytes')]
    lps = sequence_logprobs(gpt, seqs, pad_id=257)
    for s, lp in zip(seqs, lps): torch.testing.assert_close(lp, sequence_logprobs(gpt, [s])[0], atol=1e-4, rtol=0)
