"""Resume: a pretraining run killed with SIGKILL (after a checkpoint, or in the middle of writing one) and resumed
from its last complete checkpoint ends with the same loss curve and the same weights, bit for bit, as a run that
was never interrupted. Also: a failing save keeps the previous checkpoint, and foreign checkpoints are refused."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from small_doge.core import CheckpointError, DataError
from small_doge.pretrain import pretrain
from small_doge.runs import last_checkpoint, list_checkpoints, load_recipe

SCRIPT = r'''
import json, sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from transformers import TrainerCallback
from small_doge.pretrain import pretrain
from small_doge.runs import load_recipe
recipe_path, out, mode = sys.argv[1:4]

class PauseAfterSave(TrainerCallback):
    "Signal the test once checkpoint-8 is complete, then wait to be killed."
    def on_save(self, args, state, control, **kw):
        if mode == 'pause-after-save' and state.global_step == 8:
            Path(out + '.paused').write_text('1'); time.sleep(600)

if mode == 'pause-in-save':        # die while checkpoint-8 is half-written (weights there, optimiser not yet)
    from small_doge.doge import DogeForCausalLM
    orig, calls = DogeForCausalLM.save_pretrained, []
    def slow_save(self, *a, **k):
        calls.append(1); r = orig(self, *a, **k)
        if len(calls) == 2: Path(out + '.paused').write_text('1'); time.sleep(600)
        return r
    DogeForCausalLM.save_pretrained = slow_save

res = pretrain(load_recipe(recipe_path, output_dir=out, resume_from_checkpoint=(mode == 'resume')),
               callbacks=[PauseAfterSave()])
losses = [(h['step'], h['loss']) for h in res['log_history'] if 'loss' in h]
json.dump(dict(losses=losses, val_loss=res['val_loss'], resumed_from=res['resumed_from']),
          open(Path(out)/'test_result.json', 'w'))
'''


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A saved corpus, a tokenizer and a tiny recipe (12 steps, checkpoints every 4) shared by the tests."
    from small_doge.data import pystdlib_corpus
    from small_doge.tokenizer import save_tokenizer, train_tokenizer
    d = tmp_path_factory.mktemp('resume')
    corpus = pystdlib_corpus(max_files=30, cache=d/'cache')
    corpus.save_to_disk(str(d/'corpus'))
    save_tokenizer(train_tokenizer(corpus['train'], vocab_size=512), d/'tok')
    recipe = d/'tiny.yaml'
    recipe.write_text(f'''stage: pretrain
model: tiny
model_overrides: {{max_position_embeddings: 64, keep_window_size: 64}}
data: {d/'corpus'}
tokenizer: {d/'tok'}
block_size: 64
per_device_train_batch_size: 4
max_steps: 12
save_steps: 4
save_total_limit: null
logging_steps: 1
learning_rate: 1.0e-2
max_val_blocks: 8
disable_tqdm: true
seed: 3
''')
    (d/'train.py').write_text(SCRIPT)
    env = dict(os.environ, SMALL_DOGE_HOME=str(d/'home'), OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1',
               HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', PYTHONHASHSEED='0')
    return dict(dir=d, recipe=recipe, script=d/'train.py', env=env)


def _run(s, out, mode, timeout=300):
    p = subprocess.run([sys.executable, str(s['script']), str(s['recipe']), str(out), mode], env=s['env'],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((Path(out)/'test_result.json').read_text())


def _run_and_kill(s, out, mode, timeout=300):
    "Start a run, wait until it reports the pause point, then SIGKILL it."
    p = subprocess.Popen([sys.executable, str(s['script']), str(s['recipe']), str(out), mode], env=s['env'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not Path(str(out) + '.paused').exists():
        if p.poll() is not None: raise AssertionError(f'run ended before the pause point: {p.stderr.read()[-3000:]}')
        if time.time() - t0 > timeout: p.kill(); raise AssertionError('timed out waiting for the pause point')
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


@pytest.fixture(scope='module')
def reference(setup):
    return _run(setup, setup['dir']/'ref', 'plain')


def _weights(out): return load_file(str(Path(out)/'model'/'model.safetensors'))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa: assert torch.equal(wa[k], wb[k]), k


def test_killed_after_checkpoint_resumes_bit_for_bit(setup, reference):
    out = setup['dir']/'killed'
    _run_and_kill(setup, out, 'pause-after-save')
    assert [p.name for p in list_checkpoints(out)] == ['checkpoint-4', 'checkpoint-8']
    assert not (out/'model').exists()
    res = _run(setup, out, 'resume')
    assert res['resumed_from'].endswith('checkpoint-8')
    assert res['losses'] == reference['losses']                    # the whole curve, bit for bit
    assert len(res['losses']) == 12 and res['val_loss'] == reference['val_loss']
    _same_weights(out, setup['dir']/'ref')


def test_killed_while_writing_a_checkpoint(setup, reference):
    "The half-written checkpoint-8 never appears under its real name; the resume starts from checkpoint-4."
    out = setup['dir']/'killed-in-save'
    _run_and_kill(setup, out, 'pause-in-save')
    assert [p.name for p in list_checkpoints(out)] == ['checkpoint-4']
    assert not (out/'checkpoint-8').exists() and (out/'.staging-checkpoint-8').exists()
    assert last_checkpoint(out).name == 'checkpoint-4'
    res = _run(setup, out, 'resume')
    assert res['resumed_from'].endswith('checkpoint-4')
    assert res['losses'] == reference['losses']
    _same_weights(out, setup['dir']/'ref')
    assert not (out/'.staging-checkpoint-8').exists()              # cleaned up by the next save of step 8


def test_failed_save_keeps_previous_checkpoint(setup, monkeypatch):
    "Out of disk while saving: one CheckpointError naming the intact previous checkpoint; nothing half-written."
    from small_doge.doge import DogeForCausalLM
    orig, calls = DogeForCausalLM.save_pretrained, []
    def full_disk(self, *a, **k):
        calls.append(1)
        if len(calls) == 2: raise OSError(28, 'No space left on device')
        return orig(self, *a, **k)
    monkeypatch.setattr(DogeForCausalLM, 'save_pretrained', full_disk)
    out = setup['dir']/'disk'
    torch.set_num_threads(1)
    with pytest.raises(CheckpointError, match='No space left on device.*checkpoint-4 is intact'):
        pretrain(load_recipe(setup['recipe'], output_dir=str(out), max_steps=8))
    assert [p.name for p in list_checkpoints(out)] == ['checkpoint-4']
    assert not [p for p in out.iterdir() if p.name.startswith('.')]
    monkeypatch.setattr(DogeForCausalLM, 'save_pretrained', orig)
    assert DogeForCausalLM.from_pretrained(out/'checkpoint-4').num_parameters() > 0


def test_checkpoint_from_another_architecture(setup, reference):
    ck = setup['dir']/'ref'/'checkpoint-4'
    other = load_recipe(setup['recipe'], output_dir=str(setup['dir']/'other'), resume_from_checkpoint=str(ck))
    other.model_overrides = {**other.model_overrides, 'hidden_size': 128}
    with pytest.raises(CheckpointError, match='another architecture: hidden_size=64 there, 128 in this recipe'):
        pretrain(other)
    cfg = json.loads((ck/'config.json').read_text())
    fake = setup['dir']/'llama-ckpt'; fake.mkdir()
    (fake/'config.json').write_text(json.dumps({**cfg, 'model_type': 'llama'}))
    (fake/'trainer_state.json').write_text('{}')
    for f in ('optimizer.pt', 'scheduler.pt'): (fake/f).write_bytes(b'')   # complete, apart from being a llama
    with pytest.raises(CheckpointError, match="'llama' model, not Doge"):
        pretrain(load_recipe(setup['recipe'], output_dir=str(setup['dir']/'other'), resume_from_checkpoint=str(fake)))
    with pytest.raises(CheckpointError, match='not a complete checkpoint'):
        pretrain(load_recipe(setup['recipe'], output_dir=str(setup['dir']/'other'), resume_from_checkpoint=str(setup['dir'])))


def test_missing_data(setup, tmp_path):
    with pytest.raises(DataError, match='pretraining data not found'):
        pretrain(load_recipe(setup['recipe'], output_dir=str(tmp_path), data=str(tmp_path/'missing.txt')))
    with pytest.raises(Exception, match='no tokenizer at'):
        pretrain(load_recipe(setup['recipe'], output_dir=str(tmp_path), tokenizer=str(tmp_path/'no-tok')))
