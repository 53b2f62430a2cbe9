"small_doge.data: corpus determinism, local-file errors, task sets, rewards and packing (properties with hypothesis)."
import ast

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import given, settings, strategies as st, HealthCheck

from small_doge.core import ConfigError, DataError
from small_doge.data import (ByteTokenizer, MissingDataError, accuracy_reward, arithmetic_trace, check_answer,
                             extract_answer, format_ok, format_reward, format_trace, hash_unit, instruction_dataset,
                             load_local, mqar_dataset, pack_dataset, packed_attention_mask, preference_dataset,
                             pystdlib_corpus, reasoning_dataset, stdlib_files)

# ---------------------------------------------------------------- pystdlib corpus
def test_corpus_deterministic_and_split_by_file():
    a = pystdlib_corpus(max_files=50, cache=False)
    b = pystdlib_corpus(max_files=50, cache=False)
    for split in ('train', 'validation'):
        assert a[split]['source'] == b[split]['source'] and a[split]['text'] == b[split]['text']
    assert not set(a['train']['source']) & set(a['validation']['source'])
    for src in a['validation']['source']: assert hash_unit(src) < 0.05
    for src in a['train']['source']: assert hash_unit(src) >= 0.05

def test_corpus_subsets_are_nested():
    small, big = pystdlib_corpus(max_files=20, cache=False), pystdlib_corpus(max_files=40, cache=False)
    assert set(small['train']['source']) <= set(big['train']['source'])

def test_full_corpus_size():
    c = pystdlib_corpus(cache=False)
    chars = sum(map(len, c['train']['text'])) + sum(map(len, c['validation']['text']))
    assert chars > 5_000_000 and len(set(c['train']['source'])) > 400
    assert {'source', 'docstrings', 'prose'} == set(c['train']['kind'])
    files = stdlib_files()
    assert not any(f.split('/')[0] in ('test', 'site-packages') or '/tests/' in f or 'idle_test' in f for f in files)

def test_corpus_cache_atomic(tmp_path, monkeypatch):
    c = pystdlib_corpus(max_files=10, cache=tmp_path)
    assert len([p for p in tmp_path.iterdir()]) == 1
    assert pystdlib_corpus(max_files=10, cache=tmp_path)['train']['text'] == c['train']['text']
    def boom(self, *a, **k): raise OSError('disk full')
    monkeypatch.setattr('datasets.DatasetDict.save_to_disk', boom)
    with pytest.raises(OSError, match='disk full'): pystdlib_corpus(max_files=11, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1          # no half-written cache entry, no temp dir left

def test_corpus_without_validation(tmp_path):
    c = pystdlib_corpus(max_files=10, valid_frac=0.0, cache=tmp_path)
    assert len(c['validation']) == 0 and len(c['train']) > 0 and c['validation'].column_names == ['text', 'source', 'kind']

def test_corpus_bad_args(tmp_path):
    with pytest.raises(ConfigError, match='unknown pystdlib kinds'): pystdlib_corpus(kinds=('code',), cache=False)
    with pytest.raises(DataError, match='not found'): pystdlib_corpus(root=tmp_path/'nope', cache=False)
    with pytest.raises(DataError, match='empty'): pystdlib_corpus(root=tmp_path, kinds=('source',), cache=False)

# ---------------------------------------------------------------- local files
@pytest.fixture
def files(tmp_path):
    (tmp_path/'ok.txt').write_text('hello\nworld\n')
    (tmp_path/'ok.jsonl').write_text('{"text": "a"}\n{"text": "b"}\n')
    Dataset.from_dict({'text': ['p']}).to_parquet(str(tmp_path/'ok.parquet'))
    return tmp_path

def test_load_local_formats(files):
    ds = load_local([files/'ok.txt', files/'ok.jsonl', files/'ok.parquet'])
    assert ds['text'] == ['hello\nworld\n', 'a', 'b', 'p'] and ds.column_names == ['text', 'source']
    assert load_local(files)['text'] == ['a', 'b', 'p', 'hello\nworld\n']     # directory: sorted by name
    assert load_local(files/'ok.jsonl', fmt='json')['text'] == ['a', 'b']

def test_load_local_cache_dir(files, tmp_path_factory):
    cache = tmp_path_factory.mktemp('cache')
    ds = load_local(files/'ok.jsonl', cache_dir=cache)
    assert ds['text'] == ['a', 'b'] and ds.cache_files and any(cache.iterdir())   # memory-mapped from cache_dir

@pytest.mark.parametrize('name,content,match', [
    ('latin.txt', 'café'.encode('latin-1'), 'latin.txt: not UTF-8'),
    ('bad.jsonl', b'{"text": "a"}\n{oops\n', 'bad.jsonl: not valid json'),
    ('notjson.jsonl', b'just some words\n', 'notjson.jsonl: not valid json'),
    ('bad.parquet', b'this is not parquet at all', 'bad.parquet: not valid parquet'),
    ('empty.txt', b'', 'empty.txt: empty'),
    ('blank.txt', b'   \n\n', 'blank.txt: no non-empty text'),
    ('col.jsonl', b'{"body": "a"}\n', "col.jsonl: no column 'text'"),
    ('num.jsonl', b'{"text": 3}\n', "num.jsonl: column 'text' holds"),
    ('data.csv', b'text\na\n', "data.csv: cannot tell the format"),
])
def test_load_local_bad_input(tmp_path, name, content, match):
    (tmp_path/name).write_bytes(content)
    with pytest.raises(DataError, match=match): load_local(tmp_path/name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]         # nothing written next to the input

def test_load_local_missing(tmp_path):
    for bad in (tmp_path/'nope.txt', [tmp_path/'nope.jsonl'], str(tmp_path/'*.parquet')):
        with pytest.raises(MissingDataError, match='nope|parquet') as e: load_local(bad)
        assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DataError)
    (tmp_path/'sub').mkdir()
    with pytest.raises(DataError, match='holds no'): load_local(tmp_path/'sub')
    with pytest.raises(ConfigError, match='unknown format'): load_local(tmp_path, fmt='xml')

texts = st.lists(st.text(st.characters(blacklist_categories=('Cs',)), min_size=1).filter(lambda t: t.strip()), min_size=1, max_size=5)

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=texts)
def test_load_local_jsonl_roundtrip(tmp_path_factory, docs):
    import json
    p = tmp_path_factory.mktemp('j')/'d.jsonl'
    p.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs), encoding='utf-8')
    assert load_local(p)['text'] == docs

# ---------------------------------------------------------------- task sets
def test_instruction_and_preference_sets():
    inst, pref = instruction_dataset(max_examples=300), preference_dataset(max_examples=300)
    train, test = set(inst['train']['qualname']), set(inst['test']['qualname'])
    assert train and test and not train & test
    assert set(pref['test']['qualname']) <= test and set(pref['train']['qualname']) <= train
    for m in inst['train']['messages'][:50]:
        assert [x['role'] for x in m] == ['user', 'assistant'] and '`' in m[0]['content'] and m[1]['content']
    for c, r in zip(pref['train']['chosen'], pref['train']['rejected']): assert c[0]['content'] != r[0]['content']
    assert instruction_dataset(max_examples=300)['train']['messages'] == inst['train']['messages']
    assert instruction_dataset(max_examples=300, seed=1)['train']['messages'] != inst['train']['messages']
    from trl.data_utils import is_conversational
    assert is_conversational(pref['train'][0]) and is_conversational(inst['train'][0])

def test_json_dumps_pair():
    inst = instruction_dataset()
    rows = [r for s in ('train', 'test') for r in inst[s] if r['qualname'] == 'json.dumps']
    assert rows and rows[0]['messages'][1]['content'].startswith('Serialize ``obj`` to a JSON formatted ``str``')

exprs = st.recursive(st.integers(0, 30).map(str),
                     lambda c: st.tuples(c, st.sampled_from('+-*'), c).map(lambda t: f'({t[0]} {t[1]} {t[2]})'), max_leaves=6)

@settings(max_examples=200, deadline=None)
@given(expr=exprs)
def test_trace_steps_keep_value(expr):
    steps = arithmetic_trace(expr)
    assert all(eval(s) == eval(expr) for s in steps) and steps[-1] == str(eval(expr))
    assert len(steps) == expr.count(' ') // 2 + 1                  # one operation per step
    t = format_trace(steps)
    assert format_ok(t) and check_answer(t, str(eval(expr))) and not check_answer(t, str(eval(expr) + 1))

def test_reasoning_dataset():
    d = reasoning_dataset(n_train=300, n_test=40, min_operands=2, max_operands=4, max_value=12, seed=3)
    assert (len(d['train']), len(d['test'])) == (300, 40)
    p_train = {p[0]['content'] for p in d['train']['prompt']}
    assert len(p_train) == 300 and not p_train & {p[0]['content'] for p in d['test']['prompt']}
    for row in d['train'].select(range(50)):
        expr = row['prompt'][0]['content'].removeprefix('Compute ')
        assert row['answer'] == str(eval(expr)) and row['messages'][1]['content'] == row['trace']
        consts = [n.value for n in ast.walk(ast.parse(expr)) if isinstance(n, ast.Constant)]
        assert 2 <= len(consts) <= 4 and all(0 <= c <= 12 for c in consts)
    assert reasoning_dataset(n_train=300, n_test=40, min_operands=2, max_operands=4, max_value=12, seed=3)['test']['answer'] == d['test']['answer']
    with pytest.raises(ConfigError): reasoning_dataset(min_operands=1)
    with pytest.raises(ConfigError, match='unknown operators'): reasoning_dataset(ops='+/')

def test_rewards():
    good = '<think>\n1 + 2\n= 3\n</think>\n<answer>3</answer>'
    assert extract_answer('<answer>1</answer> then <answer> 2 </answer>') == '2' and extract_answer('nothing') is None
    assert check_answer('<answer>-4</answer>', -4) and check_answer('<answer>1,000</answer>', '1000')
    assert not check_answer('<answer>x</answer>', '3') and check_answer('<answer>abc</answer>', 'abc')
    assert format_ok(good) and format_ok('  ' + good + '\n<|im_end|>') and format_ok([{'role': 'assistant', 'content': good}])
    for bad in ('<answer>3</answer>', '<think>\n1\n</think><answer>3</answer>', good + good,
                '<think>\n<think>\n</think>\n<answer>3</answer>', good.replace('<answer>3', '<answer>')):
        assert not format_ok(bad), bad
    comps = [good, 'The answer is 3', [{'role': 'assistant', 'content': good.replace('>3<', '>4<')}]]
    assert accuracy_reward(comps, answer=['3', '3', '3'], prompts=None) == [1.0, 0.0, 0.0]
    assert format_reward(comps, answer=['3'] * 3) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError): accuracy_reward([good], answer=[])

def test_mqar():
    d = mqar_dataset(n_train=50, n_test=5, num_kv_pairs=6, num_queries=3, vocab_size=40, seed=1)
    ids, labels = np.array(d['train']['input_ids']), np.array(d['train']['labels'])
    assert ids.shape == labels.shape == (50, 18)
    assert ((ids[:, 0:12:2] >= 1) & (ids[:, 0:12:2] < 20)).all() and (ids[:, 1:12:2] >= 20).all()
    for row_ids, row_lab in zip(ids, labels):
        kv = dict(zip(row_ids[0:12:2], row_ids[1:12:2]))
        assert len(kv) == 6
        pos = np.flatnonzero(row_lab != -100)
        assert len(pos) == 3 and all(row_lab[p] == kv[row_ids[p - 1]] == row_ids[p] for p in pos)
    assert mqar_dataset(n_train=50, n_test=5, num_kv_pairs=6, num_queries=3, vocab_size=40, seed=1)['train']['input_ids'] == d['train']['input_ids']
    with pytest.raises(ConfigError, match='vocab_size'): mqar_dataset(num_kv_pairs=40, vocab_size=64)

# ---------------------------------------------------------------- packing
bt = ByteTokenizer()

@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.text(max_size=40), min_size=1, max_size=8), block=st.integers(2, 17), keep=st.booleans())
def test_pack_properties(docs, block, keep):
    stream = [i for d in docs for i in list(d.encode()) + [256]]
    ds = Dataset.from_dict({'text': docs})
    if len(stream) < block and not keep:
        with pytest.raises(DataError, match='fewer than one block'): pack_dataset(ds, bt, block)
        return
    out = pack_dataset(ds, bt, block, drop_remainder=not keep, return_boundaries=True)
    flat = [i for b in out['input_ids'] for i in b]
    assert flat == (stream if keep else stream[:len(stream) // block * block])
    assert all(len(b) == block for b in out['input_ids'][:-1]) and len(out['input_ids'][-1]) <= block
    for ids, dids, pos in zip(out['input_ids'], out['document_ids'], out['position_ids']):
        assert dids[0] == 0 and pos[0] == 0 and all(b - a in (0, 1) for a, b in zip(dids, dids[1:]))
        for k in range(1, len(ids)):   # a new document starts right after an EOS, and positions restart there
            new = ids[k - 1] == 256
            assert (dids[k] == dids[k - 1] + 1) == new and (pos[k] == 0) == new and (new or pos[k] == pos[k - 1] + 1)
        m = packed_attention_mask(dids)
        assert m.shape == (len(ids), len(ids)) and m.diagonal().all() and not np.triu(m, 1).any()

def test_pack_truncate_and_tokenizers():
    ds = Dataset.from_dict({'text': ['abcdef', 'xy']})
    assert pack_dataset(ds, bt, 4, mode='truncate')['input_ids'] == [[97, 98, 99, 100], [120, 121, 256]]
    assert pack_dataset(ds, bt, 4, add_bos=True, bos_token_id=255)['input_ids'] == [[255, 97, 98, 99], [100, 101, 102, 256], [255, 120, 121, 256]]
    with pytest.raises(ConfigError, match='mode'): pack_dataset(ds, bt, 4, mode='pad')
    with pytest.raises(ConfigError, match='bos'): pack_dataset(ds, bt, 4, add_bos=True)

def test_packed_mask_matches_torch_reference():
    import torch
    dids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    ref = torch.ones(8, 8, dtype=torch.bool).tril() & (dids[:, None] == dids[None, :])
    assert (torch.from_numpy(packed_attention_mask(dids.numpy())) == ref).all()
