"small_doge.inference: the top-W window against the full mask, FastGenerator against generate(), sampling, errors, chat."
import io, math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LogitsProcessor

from small_doge.attention import dynamic_mask
from small_doge.core import ConfigError, DataError, seed_everything
from small_doge.data import token_ids
from small_doge.doge import DogeConfig, DogeForCausalLM
from small_doge.inference import (FastGenerator, WindowCache, _fit_history, bench_decode, chat_generate, chat_repl,
                                  window_slot)

FAST = settings(max_examples=25, deadline=None)

def encode(tok, text): return list(token_ids(tok, [text])[0])


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny tensors: one thread is faster, and much faster on a shared machine."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def doge(moe=False, W=8, seed=0, **overrides):
    "A tiny Doge with nothing trivially 1: random A (distinct biases), norm gains and residual scales."
    seed_everything(seed)
    m = DogeForCausalLM(DogeConfig.from_preset('tiny-moe' if moe else 'tiny', keep_window_size=W, **overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith('.A'): p.copy_(torch.empty_like(p).uniform_(-2, 2, generator=g))
            elif n.endswith(('residual', 'norm.weight', 'layernorm.weight')): p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
    return m


def left_mask(lengths, width):
    return (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()


# ---------------------------------------------------------------- the window
@FAST
@given(W=st.integers(1, 9), S=st.integers(2, 60), ties=st.booleans(), pads=st.lists(st.integers(0, 12), min_size=1, max_size=3),
       seed=st.integers(0, 9999))
def test_incremental_window_equals_full_mask(W, S, ties, pads, seed):
    "Keys fed one at a time keep exactly the keys dynamic_mask keeps for that query (ties -> later key, padding never)."
    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(pads), 2
    pads = [min(p, S - 1) for p in pads]
    bias = (torch.randint(0, 3, (B, Hkv, S), generator=g) * 0.5 + 1) if ties else torch.rand(B, Hkv, S, generator=g)
    am = (torch.arange(S)[None] >= torch.tensor(pads)[:, None]).long()
    full = dynamic_mask(bias, S, W, am)
    P = 1 + seed % S   # a prefill of P keys, then one key at a time
    cache, pos = WindowCache(1, B, Hkv, W, 1, torch.float32, 'cpu'), torch.arange(S).float().expand(B, Hkv, S)
    cache.fill(0, pos[..., :P, None], pos[..., :P, None], bias[..., :P], am[:, :P].bool())
    def kept(n):   # the keys in the n slots in use, as a boolean over positions (padding, bias -inf, is not kept)
        real = cache.bias[0, :, :, :n] > -math.inf
        where = torch.where(real, cache.k[0, :, :, :n, 0].long(), S)
        return torch.zeros(B, Hkv, S + 1, dtype=torch.bool).scatter(-1, where, True)[..., :S]
    assert torch.equal(kept(min(P, W)), full[:, :, P - 1])
    for t in range(P, S):
        b = bias[..., t].masked_fill(~am[:, t, None].bool(), -math.inf)
        n = cache.insert(0, pos[..., t, None], pos[..., t, None], b, t)
        assert n == min(t + 1, W)
        assert torch.equal(kept(n), full[:, :, t])


def test_window_slot_prefers_replacing_the_oldest_of_equal_worst():
    kept_bias, kept_pos = torch.tensor([[1.0, 0.5, 0.5, 2.0]]), torch.tensor([[3, 9, 4, 1]])
    assert window_slot(kept_bias, kept_pos, torch.tensor([0.5])).item() == 2   # a tie with the worst: the new (later) key wins
    assert window_slot(kept_bias, kept_pos, torch.tensor([0.4])).item() == 4   # worse than every kept key: the scratch slot


# ---------------------------------------------------------------- greedy == generate()
CASES = [  # (moe, W, prompt lengths, new tokens)
    (False, 8, [24], 40), (False, 3, [24, 19, 7], 60), (False, 256, [24, 1], 30), (True, 8, [24, 11, 3], 40),
    (True, 2, [30], 50), (False, 1, [5, 9], 30), (False, 6, [150, 110], 100), (True, 6, [150, 40], 100)]

@pytest.mark.parametrize('moe,W,lengths,n_new', CASES)
def test_greedy_equals_generate(moe, W, lengths, n_new):
    m = doge(moe, W, seed=W + len(lengths))
    width = max(lengths)
    ids = torch.randint(0, 512, (len(lengths), width), generator=torch.Generator().manual_seed(width))
    mask = left_mask(lengths, width)
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    ours = FastGenerator(m).generate(ids, n_new, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_greedy_equals_generate_with_repeated_tokens_beyond_the_window():
    "A prompt that repeats a few tokens: layer-0 keys of equal tokens tie exactly, in the prefill and while decoding."
    m = doge(W=5, seed=3)
    ids = torch.tensor([[7, 8, 9, 7, 8, 9, 7, 7, 7, 8] * 4])
    ref = m.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0)
    assert torch.equal(FastGenerator(m).generate(ids, 60), ref)


def test_greedy_equals_generate_past_the_trained_length_with_dynamic_ntk():
    m = doge(W=8, max_position_embeddings=32, rope_parameters=dict(rope_type='dynamic', factor=4.0, rope_theta=10000.0))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = left_mask([20, 13], 20)
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=70, do_sample=False, pad_token_id=0)
    assert torch.equal(FastGenerator(m).generate(ids, 70, attention_mask=mask, pad_token_id=0), ref)


ROPES = {  # transformers' other RoPE types: static frequencies, scaled cos/sin (yarn, longrope), factors switched past 16
    'linear': dict(rope_type='linear', factor=2.0), 'yarn': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16),
    'llama3': dict(rope_type='llama3', factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    'longrope': dict(rope_type='longrope', short_factor=[1 + i / 10 for i in range(8)], long_factor=[2 + i / 5 for i in range(8)],
                     original_max_position_embeddings=16)}

@pytest.mark.parametrize('rope', ROPES)
def test_greedy_equals_generate_with_every_rope_type(rope):
    m = doge(W=8, max_position_embeddings=64, rope_parameters=dict(ROPES[rope], rope_theta=10000.0))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = left_mask([12, 7], 12)
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(FastGenerator(m).generate(ids, 40, attention_mask=mask, pad_token_id=0), ref)


def test_eos_ends_rows_like_generate():
    m = doge(seed=4)
    ids = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = left_mask([12, 8, 5], 12)
    free = m.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    eos = [free[1, 12 + 4].item(), free[2, 12 + 9].item()]
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ours = FastGenerator(m).generate(ids, 30, attention_mask=mask, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(ours, ref)
    m.generation_config.eos_token_id = eos   # the model's generation config is the default, as for generate()
    assert torch.equal(FastGenerator(m).generate(ids, 30, attention_mask=mask, pad_token_id=0), ref)


def test_per_row_limits_and_stream_and_streamer():
    g = FastGenerator(doge(seed=5))
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    both = g.generate(ids, [3, 8], pad_token_id=0)
    assert both.shape == (2, 18) and torch.equal(both[0, 13:], torch.zeros(5, dtype=torch.long))
    assert torch.equal(both[0, :13], g.generate(ids[:1], 3)[0]) and torch.equal(both[1], g.generate(ids[1:], 8)[0])
    assert torch.equal(torch.stack(list(g.stream(ids, 8)), 1), g.generate(ids, 8)[:, 10:])
    seen = []
    class Collect:
        def put(self, v): seen.append(v.clone())
        def end(self): seen.append(None)
    out = g.generate(ids[:1], 5, streamer=Collect())
    assert torch.equal(seen[0], ids[:1]) and seen[-1] is None and torch.equal(torch.cat(seen[1:-1]), out[0, 10:])


def test_refresh_reads_new_weights():
    m = doge(seed=6)
    g = FastGenerator(m)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(3))
    before = g.generate(ids, 20)
    with torch.no_grad(): m.lm_head.weight.mul_(-1)   # tied: the embedding changes too
    assert torch.equal(g.generate(ids, 20), before)   # a snapshot...
    assert torch.equal(g.refresh().generate(ids, 20), m.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0))


# ---------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_warpers_behave():
    g = FastGenerator(doge(seed=7))
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    a = g.generate(ids, 25, seed=11, **kw)
    assert torch.equal(a, g.generate(ids, 25, seed=11, **kw))
    assert torch.equal(a, g.generate(ids, 25, generator=torch.Generator().manual_seed(11), **kw))
    assert not torch.equal(a, g.generate(ids, 25, seed=12, **kw))
    greedy = g.generate(ids, 25)
    assert torch.equal(g.generate(ids, 25, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(g.generate(ids, 25, do_sample=True, top_p=1e-9, seed=0), greedy)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('call,exc,msg', [
    (lambda g: g.generate(torch.zeros(1, 0, dtype=torch.long)), DataError, 'empty prompt'),
    (lambda g: g.generate(torch.zeros(0, 4, dtype=torch.long)), DataError, 'empty batch'),
    (lambda g: g.generate([[1, 2]], attention_mask=[[0, 0]]), DataError, 'row 0 of the batch has no tokens'),
    (lambda g: g.generate([[1, 512]]), DataError, 'token id 512 is outside the vocabulary [0, 512)'),
    (lambda g: g.generate([[1.5, 2.0]]), DataError, 'integer token ids'),
    (lambda g: g.generate([3, 4]), DataError, 'shape [batch, seq]'),
    (lambda g: g.generate([[1, 2]], 0), ConfigError, 'max_new_tokens must be an int >= 1, got 0'),
    (lambda g: g.generate([[1, 2]], -3), ConfigError, 'got -3'),
    (lambda g: g.generate([[1, 2]], [4, 5]), ConfigError, 'max_new_tokens has 2 values for a batch of 1'),
    (lambda g: g.generate([[1, 2]], 255), ConfigError, '= 257 is more than max_length=256'),
    (lambda g: g.generate(torch.ones(1, 256, dtype=torch.long)), ConfigError, 'leaves no room'),
    (lambda g: g.generate([[1, 2]], do_sample=True, temperature=0.0), ConfigError, 'temperature must be > 0'),
    (lambda g: g.generate([[1, 2]], do_sample=True, temperature=-1), ConfigError, 'got -1'),
    (lambda g: g.generate([[1, 2]], do_sample=True, top_p=1.5), ConfigError, 'top_p must be in (0, 1], got 1.5'),
    (lambda g: g.generate([[1, 2]], do_sample=True, top_k=-2), ConfigError, 'top_k must be an int >= 0'),
    (lambda g: g.generate([[1, 2]], attention_mask=[[1, 0]]), DataError, 'pad on the left'),
    (lambda g: g.generate([[1, 2]], attention_mask=[[1, 2]]), DataError, '0 (padding) and 1 (token)'),
    (lambda g: g.generate([[1, 2]], attention_mask=[[1, 1, 1]]), DataError, 'shape of input_ids'),
    (lambda g: g.generate([[1, 2]], eos_token_id=9999), ConfigError, 'eos_token_id 9999'),
    (lambda g: g.generate([[1, 2]], seed=1, generator=torch.Generator()), ConfigError, 'seed or generator'),
])
def test_bad_requests_fail_before_work(call, exc, msg):
    with pytest.raises(exc) as e: call(FastGenerator(doge()))
    assert msg in str(e.value)


def test_bad_generators():
    with pytest.raises(ConfigError, match='needs a small_doge DogeForCausalLM'): FastGenerator(torch.nn.Linear(2, 2))
    from transformers import DogeConfig as NativeConfig, DogeForCausalLM as NativeDoge
    native = NativeDoge(NativeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ConfigError, match='got DogeForCausalLM'): FastGenerator(native)
    with pytest.raises(ConfigError, match='beyond the 256 positions'): FastGenerator(doge(), max_length=257)
    with pytest.raises(ConfigError, match='max_length must be an int'): FastGenerator(doge(), max_length=1)
    with pytest.raises(ConfigError, match='dtype must be one of'): FastGenerator(doge(), dtype=torch.int8)


def test_bf16_generator_runs_and_mostly_agrees():
    m = doge(seed=8)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(5))
    a, b = FastGenerator(m).generate(ids, 8), FastGenerator(m, dtype=torch.bfloat16).generate(ids, 8)
    assert a.shape == b.shape and torch.equal(a[:, :10], b[:, :10])


def test_bench_decode_measures_three_implementations():
    r = bench_decode(doge(seed=9), threads=1, context=8, new_tokens=4, batch=2, prefill_tokens=16, repeats=1)
    same = r['greedy_tokens_identical']   # native breaks exact bias ties its own way, so only ours must match
    assert same['FastGenerator == small_doge generate()'] is True and len(same) == 2 and len(r['rows']) == 9
    assert {row['implementation'] for row in r['rows']} == {'transformers native generate()', 'small_doge generate()', 'FastGenerator'}
    assert all(row['tokens_per_s'] > 0 and row['min'] <= row['tokens_per_s'] <= row['max'] for row in r['rows'])
    with pytest.raises(ConfigError, match='more than the model allows'): bench_decode(doge(), context=300, new_tokens=1, repeats=1)


@pytest.mark.slow
def test_compiled_generator_equals_eager():
    m = doge(seed=10)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(6))
    assert torch.equal(FastGenerator(m, compile=True).generate(ids, 20), FastGenerator(m).generate(ids, 20))


# ---------------------------------------------------------------- chat (moved here from test_evaluate with chat_generate/chat_repl)
@pytest.fixture(scope='module')
def tok():
    from small_doge.data import stdlib_api_docs
    from small_doge.tokenizer import train_tokenizer
    return train_tokenizer([f"{a['qualname']}{a['signature']}\n    {a['summary']}\n" for a in stdlib_api_docs()], vocab_size=384)

@pytest.fixture(scope='module')
def model(tok):
    seed_everything(0)
    return DogeForCausalLM(DogeConfig.from_preset('tiny', vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()

class Scripted(LogitsProcessor):
    "Force `reply(turn)` + `<|im_end|>` + tail; a new turn starts when the input is not the previous one plus a token."
    def __init__(self, tok, reply, tail=(), interrupt=None):
        self.tok, self.reply, self.tail, self.turn, self.last, self.interrupt = tok, reply, list(tail), 0, -1, interrupt
    def __call__(self, input_ids, scores):
        from small_doge.tokenizer import IM_END
        n = input_ids.shape[1]
        if n != self.last + 1: self.turn, self.start = self.turn + 1, n
        self.last = n
        if self.interrupt == (self.turn, n - self.start): raise KeyboardInterrupt
        script = encode(self.tok, self.reply(self.turn)) + [self.tok.convert_tokens_to_ids(IM_END)] + self.tail
        forced = torch.full_like(scores, -float('inf'))
        forced[:, script[min(n - self.start, len(script) - 1)]] = 0
        return forced

def test_chat_generate_returns_only_the_reply(model, tok):
    p = Scripted(tok, lambda t: 'Woof, `json.dumps`!', tail=encode(tok, 'junk'))
    msgs = [dict(role='system', content='Be brief.'), dict(role='user', content='Hi')]
    assert chat_generate(model, tok, msgs, logits_processor=p) == 'Woof, `json.dumps`!'
    out = chat_generate(FastGenerator(model), tok, msgs, max_new_tokens=5)   # unscripted: at most 5 tokens, no markup
    assert isinstance(out, str) and '<|im_' not in out and len(encode(tok, out)) <= 5
    with pytest.raises(DataError, match='at least one message'): chat_generate(model, tok, [])

def test_chat_generate_respects_model_positions(model, tok):
    n_pos = model.config.max_position_embeddings
    out = chat_generate(model, tok, [dict(role='user', content='hi')], max_new_tokens=10 * n_pos,
                        logits_processor=Scripted(tok, lambda t: 'x' * 2000))
    assert 0 < len(encode(tok, out)) < n_pos   # capped, not an error from running past the positions
    with pytest.raises(DataError, match='positions'): chat_generate(model, tok, [dict(role='user', content='word ' * n_pos)])

def test_chat_repl_with_fake_keyboard(model, tok):
    keys, screen = iter(['Hello', '  ', 'Again', '/reset', 'Fresh', '/exit', 'unread']), io.StringIO()
    h = chat_repl(model, tok, system='Be brief.', input_fn=lambda p: next(keys), out=screen,
                  logits_processor=Scripted(tok, lambda t: f'Woof {t}!'))
    assert [m['content'] for m in h] == ['Be brief.', 'Fresh', 'Woof 3!']
    text = screen.getvalue()
    assert 'doge> Woof 1!\n' in text and 'doge> Woof 2!\n' in text and '(history cleared)' in text and '<|im' not in text

def test_chat_repl_eof_and_no_stream(model, tok):
    keys = iter(['Hi'])
    def fake_input(prompt):
        try: return next(keys)
        except StopIteration: raise EOFError from None
    screen = io.StringIO()
    h = chat_repl(model, tok, input_fn=fake_input, out=screen, stream=False, logits_processor=Scripted(tok, lambda t: 'Bye'))
    assert h == [dict(role='user', content='Hi'), dict(role='assistant', content='Bye')]
    assert 'doge> Bye\n' in screen.getvalue()

@pytest.mark.parametrize('stream', [True, False])
def test_chat_repl_survives_ctrl_c_bad_bytes_and_huge_messages(model, tok, stream):
    keys = ['Hi', 'Tell me more', 'bad \udcff byte', 'word ' * 20_000, 'Still there?', '/exit']
    def fake_input(prompt):
        if keys[0] == 'Still there?' and not getattr(fake_input, 'pressed', False):   # Ctrl-C at the prompt: a hint, no exit
            fake_input.pressed = True; raise KeyboardInterrupt
        return keys.pop(0)
    screen = io.StringIO()
    h = chat_repl(model, tok, input_fn=fake_input, out=screen, stream=stream,
                  logits_processor=Scripted(tok, lambda t: 'Woof woof woof woof woof', interrupt=(2, 3)))
    text = screen.getvalue()
    assert [m['role'] for m in h] == ['user', 'assistant'] * 3
    assert h[3]['content'] and 'Woof woof woof woof woof'.startswith(h[3]['content']) and h[3]['content'] != 'Woof woof woof woof woof'
    assert h[4]['content'] == 'Still there?' and h[5]['content'] == 'Woof woof woof woof woof'
    assert '[stopped]' in text and 'not valid UTF-8' in text and 'message too long' in text and '/exit or Ctrl-D quits' in text

def test_fit_history_drops_oldest_turns(tok):
    h = [dict(role='system', content='s'), dict(role='user', content='a ' * 50), dict(role='assistant', content='b'),
         dict(role='user', content='c')]
    assert _fit_history(tok, h, 30) == [h[0], h[3]]
    assert _fit_history(tok, h, 10_000) == h
    assert _fit_history(tok, h[3:], 1) == h[3:]   # the last message always stays
