"""Multi-process: 2-process CPU DDP (gloo, launched with torchrun) on a tiny Doge gives the same loss curve and the
same final weights as one process with the same global batch, to float tolerance."""
import json, os, socket, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = r'''
import json, os, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from small_doge.pretrain import pretrain
from small_doge.runs import load_recipe
recipe_path, out, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = pretrain(load_recipe(recipe_path, output_dir=out, per_device_train_batch_size=per_device))
if int(os.environ.get('RANK', '0')) == 0:
    import torch.distributed as dist
    losses = [(h['step'], h['loss']) for h in res['log_history'] if 'loss' in h]
    json.dump(dict(losses=losses, val_loss=res['val_loss'], tokens_per_step=res['tokens_per_step'],
                   world=int(os.environ.get('WORLD_SIZE', '1')),
                   backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else None),
              open(Path(out)/'test_result.json', 'w'))
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from small_doge.data import pystdlib_corpus
    from small_doge.tokenizer import save_tokenizer, train_tokenizer
    d = tmp_path_factory.mktemp('ddp')
    corpus = pystdlib_corpus(max_files=30, cache=d/'cache')
    corpus.save_to_disk(str(d/'corpus'))
    save_tokenizer(train_tokenizer(corpus['train'], vocab_size=512), d/'tok')
    (d/'tiny.yaml').write_text(f'''stage: pretrain
model: tiny
model_overrides: {{max_position_embeddings: 64, keep_window_size: 64}}
data: {d/'corpus'}
tokenizer: {d/'tok'}
block_size: 64
tokens_per_step: 512           # 8 blocks a step, whatever the number of processes
per_device_train_batch_size: 8
max_steps: 10
save_steps: null
logging_steps: 1
learning_rate: 1.0e-2
max_val_blocks: 8
disable_tqdm: true
seed: 5
''')
    (d/'train.py').write_text(SCRIPT)
    env = dict(os.environ, SMALL_DOGE_HOME=str(d/'home'), OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1',
               HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', PYTHONHASHSEED='0')
    env.pop('CUDA_VISIBLE_DEVICES', None)
    return dict(dir=d, env={**env, 'CUDA_VISIBLE_DEVICES': ''})


def _run(setup, out, nproc, per_device):
    s = setup
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--nnodes', '1',
                '--master_addr', '127.0.0.1', '--master_port', str(_free_port())] if nproc > 1 else [sys.executable]
    p = subprocess.run(launcher + [str(s['dir']/'train.py'), str(s['dir']/'tiny.yaml'), str(out), str(per_device)],
                       env=s['env'], capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((Path(out)/'test_result.json').read_text())


def test_two_process_ddp_matches_one_process(setup):
    one = _run(setup, setup['dir']/'one', 1, 8)         # 1 process x 8 blocks
    two = _run(setup, setup['dir']/'two', 2, 4)         # 2 processes x 4 blocks, same 8-block global batch
    assert (one['world'], two['world']) == (1, 2) and two['backend'] == 'gloo'
    assert one['tokens_per_step'] == two['tokens_per_step'] == 512
    assert [s for s, _ in one['losses']] == [s for s, _ in two['losses']] == list(range(1, 11))
    for (_, a), (_, b) in zip(one['losses'], two['losses']): assert abs(a - b) < 1e-4 * max(1, abs(a)), (one, two)
    assert abs(one['val_loss'] - two['val_loss']) < 1e-4
    wa, wb = (load_file(str(setup['dir']/n/'model'/'model.safetensors')) for n in ('one', 'two'))
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    # the loss really moved, so matching curves is not trivial
    assert one['losses'][-1][1] < one['losses'][0][1] - 0.5
