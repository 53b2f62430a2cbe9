"""Sweep: try many bad inputs on the `small-doge` command and count what happens to each.

    python tests/sweep_reliability.py [--workers 2] [--only SUBSTRING] [--keep]

It runs every row of `tests/test_reliability.py`'s table, then generated variants: each number a recipe takes, given
values no run can use (negative, zero where a count is needed, NaN, infinity, text, a list), for every training
command; bad arguments of `corpus`, `tokenizer`, `eval`, `run`; damaged and mistyped files. Each is classified:

- clear error: a non-zero exit and one line `small-doge <command>: error: ...` (no traceback)
- traceback: a Python traceback on stderr
- silent wrong result: exit 0 where an error was due, or a success whose result fails its check
- data lost: an input or an earlier output changed
- hang: no answer within the time limit
- unclear error: a non-zero exit without the one-line message (a crash, a signal)
- other message: a clear error, but not the one expected (counted with the clear errors, listed for review)

Exits non-zero if any traceback, silent wrong result, data loss, hang or unclear error was seen."""
import argparse, collections, json, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import small_doge  # noqa: F401  (sets up Triton's interpreter on a machine without a GPU)
from test_reliability import CASES, TINY, build_world, run_case  # noqa: E402

BAD_COUNTS = ['-5', '0', 'nan', 'inf', 'abc', '[1, 2]', '2.5']      # for fields that count something (>= 1)
BAD_NUMBERS = ['-5', 'nan', 'inf', '-inf', 'abc', '{{a: 1}}']         # for any number
SHARED_COUNTS = ['per_device_train_batch_size', 'per_device_eval_batch_size', 'gradient_accumulation_steps', 'logging_steps',
                 'eval_steps', 'save_steps', 'save_total_limit', 'num_threads']
SHARED_NUMBERS = ['seed', 'learning_rate', 'max_steps', 'num_train_epochs', 'warmup_ratio', 'weight_decay', 'adam_beta1',
                  'adam_beta2', 'adam_epsilon', 'max_grad_norm', 'dataloader_num_workers']
STAGE_FIELDS = dict(
    pretrain=dict(counts=['block_size', 'data_max_files', 'max_val_blocks', 'tokens_per_step', 'hub_validation_texts'],
                  numbers=['decay_ratio', 'min_lr_ratio', 'warmup_steps', 'decay_steps'],
                  other=[('tokenizer_vocab_size', '100'), ('decay', 'exp'), ('warmup_ratio', '0.95'), ('model', 'doge-9000'),
                         ('attn_backend', 'magic'), ('data', '/nonexistent/data.txt'), ('tokenizer', 'runs/nosuch-tok'),
                         ('stage', 'sft'), ('stage', '[1]'), ('model_overrides', '{{hidden_size: -3}}'), ('resume_from_checkpoint', '/nope')]),
    sft=dict(counts=['max_eval_examples', 'max_length', 'max_new_tokens', 'hub_test_examples'], numbers=['test_frac', 'min_lr_rate'],
             other=[('data_max_examples', '1'), ('test_frac', '1.5'), ('model_path', 'runs/nosuch'), ('data', 'nope.jsonl'),
                    ('lerning_rate', '1e-3')]),
    dpo=dict(counts=['max_eval_examples', 'max_length', 'self_play_max_new_tokens'], numbers=['beta', 'test_frac', 'min_lr_rate'],
             other=[('rejected', 'mine'), ('beta', '0'), ('model_path', ''), ('data', 'nope.jsonl')]),
    reason=dict(counts=['n_train', 'eval_samples', 'max_prompt_length', 'sft_batch_size', 'num_generations', 'max_completion_length'],
                numbers=['sft_learning_rate', 'temperature', 'beta'],
                other=[('min_operands', '1'), ('max_operands', '1'), ('n_test', '1'), ('accuracy_check', 'steps'),
                       ('per_device_train_batch_size', '6'), ('model_path', 'runs/nosuch')]),
)


def generated() -> list[dict]:
    "The table's variants: bad values of every recipe number for every training command, and bad command-line arguments."
    rows = []
    def bad(cmd, key, value, says=None, config=()):
        rows.append(dict(id=f'{cmd}-{key}={value}', argv=(cmd, *config, '--set', f'{key}={value}', '--output-dir', '{case}'), rc=2,
                         says=says))
    for cmd in STAGE_FIELDS:
        config = TINY if cmd == 'pretrain' else ('--set', 'model_path={model}')
        for key in SHARED_COUNTS:
            for v in BAD_COUNTS: bad(cmd, key, v, config=config)
        for key in SHARED_NUMBERS:
            for v in BAD_NUMBERS: bad(cmd, key, v, config=config)
    for cmd, f in STAGE_FIELDS.items():
        config = TINY if cmd == 'pretrain' else ('--set', 'model_path={model}')
        for key in f['counts']:
            for v in ('-5', '0', 'nan'): bad(cmd, key, v, config=config)
        for key in f['numbers']:
            for v in ('-5', 'nan', 'inf'): bad(cmd, key, v, config=config)
        for key, v in f['other']: bad(cmd, key, v, config=config)
    cli = [('corpus', '--out', '{case}', '--max-files', '0'), ('corpus', '--out', '{case}', '--max-files', 'x'),
           ('corpus', '--out', '{case}', '--files'), ('corpus', '--out', '{case}', '--files', 'nope.txt'),
           ('corpus', '--out', '{case}', '--files', '{latin1_yaml}'), ('corpus', '--out', '{case}', '--files', '{user_dir}/notes.md'),
           ('corpus', '--out', '{case}', '--files', '{corpus}'), ('corpus',),
           ('tokenizer', '--out', '{case}', '--vocab-size', '0'), ('tokenizer', '--out', '{case}', '--vocab-size', '100', '--corpus', '{corpus}'),
           ('tokenizer', '--out', '{case}', '--corpus', '{user_dir}'), ('tokenizer', '--out', '{case}', '--corpus', 'nope'),
           ('tokenizer', '--out', '{corpus}', '--corpus', '{corpus}'), ('tokenizer', '--out', '{model}', '--corpus', '{corpus}'),
           ('eval', '--model', '{case}'), ('eval', '--model', '{user_dir}'), ('eval', '--model', 'run:nosuch'),
           ('eval', '--model', '{corpus}'), ('eval', '--model', '{model}', '--max-files', '-1'), ('eval', '--model', '{model}', '--device', 'cuda:7'),
           ('eval',), ('run', '--preset', 'huge'), ('run', '--stages', 'nope', '--out', '{case}'),
           ('run', '--stages', 'dpo', '--out', '{case}'), ('run', '--stages', 'eval', '--out', '{case}'),
           ('run', '--out', '{user_dir}'), ('run', '--out', '{a_file_txt}'),
           ('pretrain', '--config', 'no-such-recipe'), ('pretrain', '--config', '{user_dir}'), ('pretrain', '--config', '{a_file_txt}'),
           ('pretrain', '--config', 'sft-tiny-cpu'), ('pretrain', '--set', 'oops'), ('pretrain', '--set', 'max_steps=[unclosed'),
           ('pretrain', *TINY, '--output-dir', '{user_dir}'), ('pretrain', *TINY, '--output-dir', '{a_file_txt}'),
           ('pretrain', *TINY, '--output-dir', '{a_file_txt}/run'), ('pretrain', *TINY, '--resume', '--output-dir', '{corpus}'),
           ('sft', '--set', 'model_path={model}', '--set', 'data={latin1_jsonl}', '--output-dir', '{case}'),
           ('sft', '--set', 'model_path={user_dir}', '--output-dir', '{case}'), ('sft', '--set', 'model_path={corrupt_corpus}', '--output-dir', '{case}'),
           ('dpo', '--set', 'model_path={model}', '--set', 'data={sft_strings_jsonl}', '--output-dir', '{case}'),
           ('reason', '--set', 'model_path={tok}', '--output-dir', '{case}'), ('nosuchcommand',)]
    rows += [dict(id=' '.join(a), argv=a, rc=2) for a in cli]
    keep = ['user_dir', 'corpus', 'model', 'tok', 'a_file_txt', 'corrupt_corpus', 'latin1_jsonl', 'latin1_yaml', 'run_finished']
    for r in rows: r.setdefault('keep', keep)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--workers', type=int, default=2, help='cases run at once (default 2)')
    ap.add_argument('--only', default=None, help='run only the cases whose id contains this')
    ap.add_argument('--keep', action='store_true', help='keep the temporary folder')
    a = ap.parse_args()
    rows = [r for r in CASES + generated() if a.only is None or a.only in r['id']]
    d = Path(tempfile.mkdtemp(prefix='small-doge-sweep-'))
    t0 = time.time()
    world = build_world(d/'world')
    print(f'fixture built in {time.time() - t0:.0f} s; {len(rows)} cases, {a.workers} at a time', flush=True)
    def one(i_row):
        i, row = i_row
        t = time.time()
        outcome, detail = run_case(world, row, d/f'case-{i}')
        return row, outcome, detail, time.time() - t
    results = []
    with ThreadPoolExecutor(a.workers) as pool:
        for row, outcome, detail, secs in pool.map(one, enumerate(rows)):
            results.append((row, outcome, detail))
            print(f'{outcome:20s} {secs:5.1f}s  {row["id"][:70]:70s}  {detail[:150]}', flush=True)
    counts = collections.Counter(o for _, o, _ in results)
    print(f'\n{len(results)} cases in {time.time() - t0:.0f} s:', json.dumps(dict(counts.most_common()), indent=1))
    if not a.keep: __import__('shutil').rmtree(d, ignore_errors=True)
    bad = {'traceback', 'silent wrong result', 'data lost', 'hang', 'unclear error', 'failed'}
    return 1 if bad & set(counts) else 0


if __name__ == '__main__': sys.exit(main())
