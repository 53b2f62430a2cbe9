"""Reliability: bad input and faults, tried as a user would: the `small-doge` command in a subprocess, in temp folders.
Each case must end as its row says: for bad input, one line `small-doge <command>: error: ...` on stderr (no traceback)
and a non-zero exit; and the inputs and earlier outputs it names in `keep` must be byte-identical afterwards.

`CASES` is a table: add a row to add a case. A row has the command line (`{name}` placeholders are the fixture's
files and folders, `{case}` a fresh folder of the case's own), the exit status (`rc`), a phrase of the message
(`says`), the paths that must not change (`keep`), and optionally a `setup(world, case)` run first and a
`check(world, case, result)` run after. Rows for other commands (chat and generate, the model API) go in the same
table. Longer scenarios (a real full disk, SIGINT, a pipeline killed with SIGKILL) are the functions after it.
`python tests/sweep_reliability.py` runs this table and many generated variants, and counts the outcomes."""
import hashlib, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
from safetensors.torch import load_file

TINY_RECIPE = '''stage: pretrain
model: tiny
model_overrides: {{max_position_embeddings: 64, keep_window_size: 64}}
data: {corpus}
tokenizer: {tok}
block_size: 64
per_device_train_batch_size: 4
max_steps: 4
save_steps: 2
save_total_limit: null
logging_steps: 1
learning_rate: 1.0e-2
max_val_blocks: 4
disable_tqdm: true
num_threads: 1
seed: 3
'''


# ------------------------------------------------------------------ the fixture: inputs and earlier outputs

def build_world(d: Path) -> dict:
    "The files the cases use, built once in folder `d`: corpora, a tokenizer, a model, a finished run, bad files."
    from small_doge.data import check_answer  # noqa: F401  (imports datasets before the first case times anything)
    from small_doge.pipeline import build_corpus, build_tokenizer
    d.mkdir(parents=True, exist_ok=True)
    w = dict(dir=d, home=d/'home')
    build_corpus(d/'corpus', max_files=20)
    build_tokenizer(d/'tok', vocab_size=400, corpus=d/'corpus')
    w.update(corpus=d/'corpus', tok=d/'tok')
    shutil.copytree(d/'corpus', d/'corrupt_corpus')
    arrow = next((d/'corrupt_corpus'/'train').glob('*.arrow'))
    arrow.write_bytes(arrow.read_bytes()[:arrow.stat().st_size // 2])
    w['corrupt_corpus'] = d/'corrupt_corpus'
    src = (Path(json.__file__).parent/'decoder.py').read_text()
    (d/'good.txt').write_text(src)                                   # one real file: one document of ~400 lines
    (d/'tiny.txt').write_text('just one line\n')
    (d/'latin1.jsonl').write_bytes('{"text": "caf\xe9 au lait"}\n'.encode('latin-1'))
    (d/'sft_strings.jsonl').write_text('{"messages": "hello there"}\n' * 20)
    (d/'dpo_strings.jsonl').write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n' * 20)
    (d/'latin1.yaml').write_bytes('stage: pretrain\nname: caf\xe9\n'.encode('latin-1'))
    (d/'tiny.yaml').write_text(TINY_RECIPE.format(corpus=d/'corpus', tok=d/'tok'))
    (d/'user_dir').mkdir()
    for name, text in [('a.txt', 'my first notes\n' * 50), ('b.txt', 'my second notes\n' * 50), ('notes.md', '# mine\n')]:
        (d/'user_dir'/name).write_text(text)
    (d/'a_file.txt').write_text('a file, not a folder\n')
    (d/'runs').mkdir()                                                # so that `runs/nosuch` is a local-path typo
    for k in ('good.txt', 'tiny.txt', 'latin1.jsonl', 'sft_strings.jsonl', 'dpo_strings.jsonl', 'latin1.yaml', 'tiny.yaml',
              'user_dir', 'a_file.txt'):
        w[k.replace('.', '_')] = d/k
    # a model: a random tiny Doge saved with the tokenizer (what a training stage leaves behind)
    from small_doge.doge import DogeConfig, DogeForCausalLM
    from small_doge.tokenizer import load_tokenizer
    tok = load_tokenizer(d/'tok')
    cfg = DogeConfig.from_preset('tiny', vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    DogeForCausalLM(cfg).save_pretrained(d/'model'); tok.save_pretrained(d/'model')
    w['model'] = d/'model'
    # a finished run of the tiny recipe: checkpoint-2, checkpoint-4, model/, results.json, recipe.yaml
    r = small_doge('pretrain', '--config', d/'tiny.yaml', '--output-dir', d/'run_finished', world=w)
    assert r.returncode == 0, r.stderr[-3000:]
    w['run_finished'] = d/'run_finished'
    return w


def small_doge(*args, world, timeout=300, env=None, cwd=None):
    "Run `python -m small_doge.cli ARGS` as a user would: offline, in the fixture's folder, with its own home."
    e = dict(os.environ, SMALL_DOGE_HOME=str(world['home']), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
             TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    e.update(env or {})
    return subprocess.run([sys.executable, '-m', 'small_doge.cli', *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=cwd or world['dir'])


def tree_hash(path) -> str:
    "sha256 over the names and bytes of everything under `path` (a file or a folder); '-' if it does not exist."
    p, h = Path(path), hashlib.sha256()
    if not p.exists(): return '-'
    for f in sorted([p] if p.is_file() else p.rglob('*')):
        h.update(str(f.relative_to(p.parent)).encode())
        if f.is_file(): h.update(f.read_bytes())
    return h.hexdigest()


def error_line(stderr: str) -> str:
    "The last non-empty line of stderr (where the CLI's one-line error goes)."
    lines = [l for l in stderr.splitlines() if l.strip()]
    return lines[-1] if lines else ''


# ------------------------------------------------------------------ setups and checks used by the rows

def copy_run(world, case, drop=()):
    "The finished run copied to the case's folder, without the entries in `drop`."
    shutil.copytree(world['run_finished'], case, ignore=shutil.ignore_patterns(*drop) if drop else None)

def no_optimizer(world, case):
    "A run stopped after checkpoint-2 whose checkpoint lost its optimizer state."
    copy_run(world, case, drop=('model', 'results.json', 'checkpoint-4'))
    (case/'checkpoint-2'/'optimizer.pt').unlink()

def hold_lock(world, case):
    "Another process holding the run folder's lock (a second writer's view of the first)."
    case.mkdir()
    code = (f'import time; from small_doge.runs import lock_run_dir; l = lock_run_dir({str(case)!r}, "a test holder"); '
            f'open({str(case/"LOCKED")!r}, "w").close(); time.sleep(300)')
    p = subprocess.Popen([sys.executable, '-c', code])
    while not (case/'LOCKED').exists():
        assert p.poll() is None, 'the lock holder died'
        time.sleep(0.05)
    return p

def results_of(case) -> dict: return json.loads((Path(case)/'results.json').read_text())

def weights(path) -> bytes: return (Path(path)/'model.safetensors').read_bytes()

def check_nothing_to_do(world, case, r):
    assert 'nothing to do' in r.stderr and results_of(case)['steps'] == 4

def check_finished_from_last_checkpoint(world, case, r):
    "Killed while saving the final model: finished from checkpoint-4, no step past max_steps, the weights unchanged."
    res = results_of(case)
    assert res['steps'] == 4 and res['resumed_from'].endswith('checkpoint-4'), res
    assert sorted(p.name for p in case.glob('checkpoint-*')) == ['checkpoint-2', 'checkpoint-4']
    assert weights(case/'model') == weights(world['run_finished']/'model')

def check_overwritten(world, case, r):
    "--overwrite: the old run's checkpoints are gone, not mixed with the new run's."
    assert sorted(p.name for p in case.glob('checkpoint-*')) == ['checkpoint-2']
    assert results_of(case)['steps'] == 2 and 'max_steps: 2' in (case/'recipe.yaml').read_text()

def check_one_file_corpus(world, case, r):
    summary = json.loads(r.stdout)
    assert summary['train']['rows'] > 10 and summary['validation']['rows'] >= 1, summary

def check_trained_on_one_file(world, case, r):
    assert results_of(case)['steps'] == 4 and results_of(case)['val_loss'] > 0

def check_reset_optimizer(world, case, r):
    res = results_of(case)
    assert res['steps'] == 4 and res['resumed_from'].endswith('checkpoint-2'), res


# ------------------------------------------------------------------ the table

TINY = ('--config', '{tiny_yaml}')
CASES = [
    # output folders are never destroyed
    dict(id='corpus-out-holds-the-inputs', argv=('corpus', '--out', '{user_dir}', '--files', '{user_dir}/a.txt', '{user_dir}/b.txt'),
         rc=2, says='lies inside the output folder', keep=['user_dir']),
    dict(id='corpus-out-is-a-users-folder', argv=('corpus', '--out', '{user_dir}', '--max-files', '5'),
         rc=2, says='does not hold a corpus written by small-doge (it holds a.txt, b.txt, notes.md)', keep=['user_dir']),
    dict(id='corpus-overwrite-still-keeps-inputs', argv=('corpus', '--out', '{user_dir}', '--overwrite', '--files', '{user_dir}/a.txt'),
         rc=2, says='lies inside the output folder', keep=['user_dir']),
    dict(id='tokenizer-out-is-a-run-folder', argv=('tokenizer', '--out', '{run_finished}', '--corpus', '{corpus}', '--vocab-size', '400'),
         rc=2, says='does not hold a tokenizer written by small-doge', keep=['run_finished', 'corpus']),
    dict(id='corpus-out-is-a-file', argv=('corpus', '--out', '{a_file_txt}', '--max-files', '5'), rc=2, says='is a file', keep=['a_file_txt']),
    # run folders: one owner, nothing mixed
    dict(id='fresh-run-into-a-run-folder', argv=('pretrain', *TINY, '--output-dir', '{case}'), setup=copy_run,
         rc=2, says='already holds a run', keep=['case']),
    dict(id='resume-with-another-learning-rate', argv=('pretrain', *TINY, '--output-dir', '{case}', '--resume', '--set', 'learning_rate=0.5'),
         setup=lambda w, c: copy_run(w, c, drop=('model', 'results.json')), rc=2,
         says='was started with other settings (learning_rate 0.01 then, 0.5 now)', keep=['case']),
    dict(id='second-writer', argv=('pretrain', *TINY, '--output-dir', '{case}'), setup=hold_lock,
         rc=2, says='is in use by a test holder', keep=['case']),
    dict(id='overwrite-removes-stale-checkpoints', argv=('pretrain', *TINY, '--output-dir', '{case}', '--overwrite', '--set', 'max_steps=2'),
         setup=copy_run, rc=0, check=check_overwritten),
    # resume: exact or refused
    dict(id='resume-a-finished-run', argv=('pretrain', *TINY, '--output-dir', '{case}', '--resume'), setup=copy_run,
         rc=0, check=check_nothing_to_do, keep=['case']),
    dict(id='resume-killed-in-final-save', argv=('pretrain', *TINY, '--output-dir', '{case}', '--resume'),
         setup=lambda w, c: copy_run(w, c, drop=('model', 'results.json')), rc=0, check=check_finished_from_last_checkpoint),
    dict(id='resume-without-optimizer-state', argv=('pretrain', *TINY, '--output-dir', '{case}', '--resume'), setup=no_optimizer,
         rc=2, says='holds no optimizer state', keep=['case']),
    dict(id='resume-with-reset-optimizer', argv=('pretrain', *TINY, '--output-dir', '{case}', '--resume', '--reset-optimizer'),
         setup=no_optimizer, rc=0, check=check_reset_optimizer),
    dict(id='run-stages-without-earlier-stages', argv=('run', '--stages', 'sft', '--out', '{case}'), rc=2,
         says="stage 'sft' needs 'pretrain', which is not finished"),
    # one clear message: files
    dict(id='corpus-from-one-file', argv=('corpus', '--out', '{case}', '--files', '{good_txt}'), rc=0, check=check_one_file_corpus,
         keep=['good_txt']),
    dict(id='pretrain-on-one-file', argv=('pretrain', *TINY, '--output-dir', '{case}', '--set', 'data={good_txt}'), rc=0,
         check=check_trained_on_one_file, keep=['good_txt']),
    dict(id='corpus-from-one-line', argv=('corpus', '--out', '{case}', '--files', '{tiny_txt}'), rc=2, says='too little to hold some out'),
    dict(id='latin1-jsonl', argv=('corpus', '--out', '{case}', '--files', '{latin1_jsonl}'), rc=2, says='latin1.jsonl: not UTF-8',
         keep=['latin1_jsonl']),
    dict(id='corrupt-saved-corpus', argv=('tokenizer', '--corpus', '{corrupt_corpus}', '--out', '{case}', '--vocab-size', '400'),
         rc=2, says='not a readable saved corpus', keep=['corrupt_corpus']),
    dict(id='sft-messages-as-strings', argv=('sft', '--set', 'model_path={model}', '--set', 'data={sft_strings_jsonl}', '--output-dir', '{case}'),
         rc=2, says="'messages' must be a list of messages", keep=['sft_strings_jsonl', 'model']),
    dict(id='dpo-fields-as-strings', argv=('dpo', '--set', 'model_path={model}', '--set', 'data={dpo_strings_jsonl}', '--output-dir', '{case}'),
         rc=2, says="'prompt' must be a list of messages", keep=['dpo_strings_jsonl', 'model']),
    dict(id='non-utf8-config', argv=('pretrain', '--config', '{latin1_yaml}'), rc=2, says='not UTF-8 text'),
    # one clear message: values (checked before torch is imported)
    dict(id='negative-learning-rate', argv=('pretrain', *TINY, '--set', 'learning_rate=-1', '--output-dir', '{case}'), rc=2,
         says='learning_rate must be > 0, got -1'),
    dict(id='nan-learning-rate', argv=('pretrain', *TINY, '--set', 'learning_rate=nan', '--output-dir', '{case}'), rc=2,
         says='learning_rate must be a finite number'),
    dict(id='batch-size-0', argv=('pretrain', *TINY, '--set', 'per_device_train_batch_size=0', '--output-dir', '{case}'), rc=2,
         says='per_device_train_batch_size must be >= 1'),
    dict(id='num-threads-negative', argv=('pretrain', *TINY, '--set', 'num_threads=-2', '--output-dir', '{case}'), rc=2,
         says='num_threads must be >= 1 or null'),
    dict(id='set-stage', argv=('pretrain', *TINY, '--set', 'stage=sft', '--output-dir', '{case}'), rc=2, says='the stage cannot be overridden'),
    dict(id='max-steps-0', argv=('pretrain', *TINY, '--set', 'max_steps=0', '--output-dir', '{case}'), rc=2,
         says='max_steps must be >= 1 or -1'),
    dict(id='data-max-files-negative', argv=('pretrain', '--set', 'data_max_files=-3', '--output-dir', '{case}'), rc=2,
         says='data_max_files must be >= 1 or null'),
    dict(id='max-files-negative', argv=('corpus', '--out', '{case}', '--max-files', '-3'), rc=2, says='must be a positive integer, got -3'),
    dict(id='eval-device-bogus', argv=('eval', '--model', '{model}', '--device', 'bogus'), rc=2, says="unknown device 'bogus'"),
    dict(id='eval-n-examples-negative', argv=('eval', '--model', '{model}', '--n-examples', '-5'), rc=2, says='must be a positive integer, got -5'),
    dict(id='eval-model-path-typo', argv=('eval', '--model', 'runs/nosuch', '--no-speed'), env=dict(HF_HUB_OFFLINE='0'), rc=2,
         says='model not found: no such file or folder: runs/nosuch', says_not='hub'),
    # chat/generate (issue 12) and model API (issue 11) cases: add rows here
]
if not __import__('torch').cuda.is_available():
    CASES.append(dict(id='eval-device-cuda-without-cuda', argv=('eval', '--model', '{model}', '--device', 'cuda'), rc=2,
                      says="device 'cuda': CUDA is not available"))


def run_case(world, row, case: Path):
    "Run one row: setup, the command, and what it must leave. Returns (outcome, detail) for the sweep; asserts nothing."
    fill = lambda a: str(a).format(case=case, **{k: v for k, v in world.items() if isinstance(v, Path)})
    keep = {k: case if k == 'case' else world[k] for k in row.get('keep', ())}
    helper = row['setup'](world, case) if row.get('setup') else None
    try:
        before = {k: tree_hash(p) for k, p in keep.items()}
        try: r = small_doge(*map(fill, row['argv']), world=world, env=row.get('env'), timeout=row.get('timeout', 300))
        except subprocess.TimeoutExpired: return 'hang', 'timed out'
    finally:
        if helper is not None: helper.kill(); helper.wait()
    changed = [k for k, p in keep.items() if tree_hash(p) != before[k]]
    line = error_line(r.stderr)
    if changed: return 'data lost', f'changed: {changed}; {line}'
    if 'Traceback' in r.stderr: return 'traceback', line
    if row['rc'] == 0:
        if r.returncode != 0: return 'failed', line
        try: row.get('check', lambda *a: None)(world, case, r)
        except AssertionError as e: return 'silent wrong result', str(e)[:300]
        return 'ok', ''
    if r.returncode == 0: return 'silent wrong result', 'exit 0'
    cmd = next(a for a in row['argv'] if not a.startswith('-'))
    if r.returncode < 0 or not line.startswith((f'small-doge {cmd}: error:', 'small-doge: error:')): return 'unclear error', line
    if row.get('says') and row['says'] not in line: return 'other message', line
    if row.get('says_not') and row['says_not'] in line: return 'other message', line
    return 'clear error', line


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp('reliability'))


@pytest.mark.parametrize('row', CASES, ids=[r['id'] for r in CASES])
def test_case(world, row, tmp_path):
    outcome, detail = run_case(world, row, tmp_path/'case')
    assert outcome == ('ok' if row['rc'] == 0 else 'clear error'), f'{outcome}: {detail}'


def test_debug_shows_the_traceback(world, tmp_path):
    r = small_doge('--debug', 'pretrain', '--config', world['tiny_yaml'], '--set', 'learning_rate=-1', world=world)
    assert r.returncode != 0 and 'Traceback' in r.stderr and 'learning_rate must be > 0' in r.stderr


def test_bad_values_answer_before_torch_is_imported(world, tmp_path):
    "A bad value in a recipe is refused before the stage's module (and torch) is imported: well under a second's work."
    code = ('import sys; from small_doge.cli import main; rc = main(["pretrain", "--set", "learning_rate=-1"]); '
            'print(rc, "torch" in sys.modules)')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=world['dir'])
    assert r.stdout.split() == ['2', 'False'], (r.stdout, r.stderr)


# ------------------------------------------------------------------ scenarios: a real full disk, a read-only folder

def mount_tmpfs(path: Path, size: int, readonly=False) -> bool:
    "Mount a tmpfs of `size` bytes at `path` (root only); False where the platform does not allow it."
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0: return False
    opts = f'size={max(size, 4096)}' + (',ro' if readonly else '')
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(path)], capture_output=True).returncode == 0

def umount(path): subprocess.run(['umount', '-l', str(path)], capture_output=True)

def folder_size(p) -> int: return sum(f.stat().st_size for f in Path(p).rglob('*') if f.is_file())


def test_disk_full_during_a_checkpoint(world, tmp_path):
    """A disk that fills up while checkpoint-4 is written (torch.save raises RuntimeError there, not OSError): one clear
    error naming the intact checkpoint-2, no staging folder left filling the disk. A tmpfs sized to hold one checkpoint,
    the final model and half a checkpoint (so the check before training passes); without root, a failing writer."""
    ck, model = folder_size(world['run_finished']/'checkpoint-2'), folder_size(world['run_finished']/'model')
    disk = tmp_path/'disk'
    if mount_tmpfs(disk, ck + model + ck // 2):
        try:
            r = small_doge('pretrain', '--config', world['tiny_yaml'], '--output-dir', disk/'run', '--set', 'max_steps=6', world=world)
            left = sorted(p.name for p in (disk/'run').iterdir())
            ck2 = load_file(disk/'run'/'checkpoint-2'/'model.safetensors')
        finally: umount(disk)
    else:   # simulated: torch.save fails as on a full disk
        code = ('import sys, torch; from unittest import mock; from small_doge.cli import main\n'
                'real = torch.save; calls = []\n'
                'def save(*a, **k):\n    calls.append(1)\n'
                '    if len(calls) > 3: raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")\n'
                '    return real(*a, **k)\n'
                f'with mock.patch("torch.save", save): sys.exit(main(["pretrain", "--config", {str(world["tiny_yaml"])!r}, '
                f'"--output-dir", {str(disk/"run")!r}, "--set", "max_steps=6"]))')
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=world['dir'])
        left = sorted(p.name for p in (disk/'run').iterdir())
        ck2 = load_file(disk/'run'/'checkpoint-2'/'model.safetensors')
    line = error_line(r.stderr)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert line.startswith('small-doge pretrain: error: could not write checkpoint-4') and 'checkpoint-2 is intact' in line, line
    assert left == ['checkpoint-2', 'recipe.yaml'], left          # no .staging-checkpoint-4, no .lock
    assert ck2.keys() == load_file(world['run_finished']/'checkpoint-2'/'model.safetensors').keys()   # intact: it loads


def test_too_little_disk_and_read_only_are_refused_before_training(world, tmp_path):
    small, ro = tmp_path/'small', tmp_path/'ro'
    if not mount_tmpfs(small, 64 * 1024): pytest.skip('cannot mount a tmpfs here (not root)')
    try:
        r = small_doge('pretrain', '--config', world['tiny_yaml'], '--output-dir', small/'run', world=world)
        assert r.returncode == 2 and 'not enough free disk' in error_line(r.stderr), r.stderr[-2000:]
        assert 'Traceback' not in r.stderr and not (small/'run').exists()
    finally: umount(small)
    assert mount_tmpfs(ro, 1 << 20, readonly=True)
    try:
        r = small_doge('pretrain', '--config', world['tiny_yaml'], '--output-dir', ro/'run', world=world)
        assert r.returncode == 2 and 'cannot write to' in error_line(r.stderr) and 'Read-only' in r.stderr, r.stderr[-2000:]
        r = small_doge('corpus', '--out', ro/'corpus', '--max-files', '5', world=world)
        assert r.returncode == 2 and 'cannot write to' in error_line(r.stderr), r.stderr[-2000:]
    finally: umount(ro)


# ------------------------------------------------------------------ scenarios: signals

def wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None: raise AssertionError(f'ended before {path.name} appeared: {proc.stderr.read()[-3000:]}')
        if time.time() - t0 > timeout: proc.kill(); raise AssertionError(f'no {path.name} after {timeout} s')
        time.sleep(0.05)


def test_ctrl_c_then_resume(world, tmp_path):
    "Ctrl-C while training: one line, exit 130, the checkpoints intact and the folder unlocked; --resume finishes the run."
    out = tmp_path/'run'
    args = ['pretrain', '--config', world['tiny_yaml'], '--output-dir', out, '--set', 'max_steps=60', '--set', 'save_steps=4',
            '--set', 'per_device_train_batch_size=32', '--set', 'save_total_limit=2']
    env = dict(os.environ, SMALL_DOGE_HOME=str(world['home']), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, '-m', 'small_doge.cli', *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=world['dir'])
    wait_for(out/'checkpoint-4', p)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and error_line(err) == 'small-doge pretrain: interrupted' and 'Traceback' not in err, err[-2000:]
    assert not (out/'.lock').exists() and not (out/'model').exists()
    r = small_doge(*args, '--resume', world=world)
    assert r.returncode == 0, r.stderr[-3000:]
    res = results_of(out)
    assert res['steps'] == 60 and res['resumed_from'] is not None and int(res['resumed_from'].rsplit('-', 1)[1]) >= 4


PIPELINE_SCRIPT = r'''
import sys, time
from small_doge.pipeline import Preset, run_pipeline
out, slow = sys.argv[1], sys.argv[2] == 'slow'
if slow:   # the first run trains slowly, so that the test can kill it in the middle of pretraining
    from small_doge.pretrain import WSDTrainer
    step = WSDTrainer.training_step
    WSDTrainer.training_step = lambda self, *a, **k: (time.sleep(0.3), step(self, *a, **k))[1]
mini = Preset('mini', max_files=20, vocab_size=400, recipes=dict(pretrain='pretrain-tiny-cpu'),
              overrides=dict(pretrain=dict(model_overrides=dict(max_position_embeddings=64, keep_window_size=64), block_size=64,
                                           per_device_train_batch_size=4, max_steps=24, save_steps=4, save_total_limit=None,
                                           eval_steps=None, max_val_blocks=4, logging_steps=1, disable_tqdm=True, num_threads=1)),
              stages=('corpus', 'tokenizer', 'pretrain'))
print(run_pipeline(mini, out_dir=out))
'''


def test_pipeline_resumes_a_killed_pretrain_stage(world, tmp_path):
    "`small-doge run` killed (SIGKILL) in the middle of pretraining and run again: finished stages reused, pretraining resumed."
    script, out = tmp_path/'pipeline.py', tmp_path/'run'
    script.write_text(PIPELINE_SCRIPT)
    env = dict(os.environ, SMALL_DOGE_HOME=str(world['home']), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, str(script), str(out), 'slow'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    wait_for(out/'pretrain'/'checkpoint-8', p)
    p.send_signal(signal.SIGKILL); p.wait()
    corpus = tree_hash(out/'corpus')
    r = subprocess.run([sys.executable, str(script), str(out), 'fast'], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '[corpus] reused from' in r.stdout and '[tokenizer] reused from' in r.stdout, r.stdout
    res = results_of(out/'pretrain')
    assert res['steps'] == 24 and int(res['resumed_from'].rsplit('-', 1)[1]) >= 8, res
    assert [h['step'] for h in res['log_history'] if 'loss' in h] == list(range(1, 25))   # one curve, no restart at step 0
    assert tree_hash(out/'corpus') == corpus
