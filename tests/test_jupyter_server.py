"""A lesson run the way JupyterLab runs it: a kernel behind a Jupyter server (token, 127.0.0.1, a free port), driven
through the server's REST and websocket API cell by cell, then shut down with no kernel process left behind."""
import json, os, secrets, signal, socket, subprocess, sys, time, urllib.error, urllib.request, uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'.ci'))
from nbtools import directives, read_nb

LESSON = ROOT/'nbs/03_rmsnorm.ipynb'
SKIP_FLAGS = {'notest', 'slow', 'cuda'}   # settings.ini's tst_flags: cells nbdev_test skips too

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def lesson_cells(nb_path):
    "The code cells nbdev_test would run: not flagged slow/cuda/notest, not `eval: false`."
    out = []
    for c in read_nb(nb_path).cells:
        if c.cell_type != 'code' or not c.source.strip(): continue
        ds = [d.split() for d in directives(c.source) if d]
        if any(d[0] in SKIP_FLAGS for d in ds) or any(d[:2] == ['eval:', 'false'] for d in ds): continue
        out.append(c.source)
    return out

class Server:
    "`jupyter server` in its own process group, with throwaway config/runtime folders and IN_TEST set."
    def __init__(self, tmp):
        self.port, self.token, self.runtime = free_port(), secrets.token_hex(16), tmp/'runtime'
        env = {**os.environ, 'IN_TEST': '1', 'JUPYTER_RUNTIME_DIR': str(self.runtime),
               'JUPYTER_CONFIG_DIR': str(tmp/'config'), 'JUPYTER_DATA_DIR': str(tmp/'data'), 'PYTHONUNBUFFERED': '1'}
        self.log = open(tmp/'server.log', 'w')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'jupyter_server', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={self.port}',
             '--ServerApp.port_retries=0', f'--IdentityProvider.token={self.token}', '--ServerApp.open_browser=False',
             f'--ServerApp.root_dir={ROOT/"nbs"}', '--ServerApp.allow_remote_access=False', '--ServerApp.allow_root=True'],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f'http://127.0.0.1:{self.port}'

    def api(self, method, path, body=None, token=True):
        req = urllib.request.Request(self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={'Content-Type': 'application/json',
                                              **({'Authorization': f'token {self.token}'} if token else {})})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, json.loads(data) if data else None

    def wait_ready(self, timeout=90):
        end = time.time() + timeout
        while time.time() < end:
            assert self.proc.poll() is None, f'jupyter server exited: {self.proc.returncode}'
            try: return self.api('GET', '/api/status')
            except (urllib.error.URLError, ConnectionError): time.sleep(0.3)
        raise TimeoutError('jupyter server did not answer')

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

class Kernel:
    "The kernel's channels over the server's websocket (Jupyter messaging protocol 5.3, JSON frames)."
    def __init__(self, server, kernel_id):
        import websocket   # websocket-client, a jupyter_server dependency
        self.ws = websocket.create_connection(f'ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels',
                                              header=[f'Authorization: token {server.token}'], timeout=120)
        self.session = uuid.uuid4().hex

    def execute(self, code, timeout=300):
        "Run one cell: (reply status, outputs, errors) once the kernel is idle again."
        msg_id = uuid.uuid4().hex
        self.ws.settimeout(timeout)
        self.ws.send(json.dumps({
            'header': {'msg_id': msg_id, 'username': 'test', 'session': self.session, 'msg_type': 'execute_request',
                       'version': '5.3', 'date': ''},
            'parent_header': {}, 'metadata': {}, 'channel': 'shell', 'buffers': [],
            'content': {'code': code, 'silent': False, 'store_history': True, 'user_expressions': {},
                        'allow_stdin': False, 'stop_on_error': True}}))
        reply, idle, outputs, errors, end = None, False, [], [], time.time() + timeout
        while not (reply and idle):
            assert time.time() < end, f'cell did not finish in {timeout} s:\n{code[:300]}'
            msg = json.loads(self.ws.recv())
            if msg.get('parent_header', {}).get('msg_id') != msg_id: continue
            kind = msg['msg_type']
            if kind == 'execute_reply': reply = msg['content']
            elif kind == 'status' and msg['content']['execution_state'] == 'idle': idle = True
            elif kind == 'error': errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
            elif kind in ('stream', 'execute_result', 'display_data'): outputs.append(msg['content'])
        if reply['status'] != 'ok': errors.append(f"{reply.get('ename')}: {reply.get('evalue')}")
        return reply['status'], outputs, errors

    def close(self): self.ws.close()

def alive(pid):
    try: return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False

def test_lesson_runs_in_a_kernel_behind_jupyter_server(tmp_path):
    server = Server(tmp_path)
    kernel_pids = []
    try:
        status, info = server.wait_ready()
        assert status == 200 and 'started' in info
        with pytest.raises(urllib.error.HTTPError) as no_token:   # the token is what lets a client in
            server.api('GET', '/api/kernels', token=False)
        assert no_token.value.code == 403

        status, k = server.api('POST', '/api/kernels', {'name': 'python3', 'path': ''})
        assert status == 201 and k['execution_state'] in ('starting', 'idle')
        kernel = Kernel(server, k['id'])
        status, outputs, errors = kernel.execute('import os; print(os.getpid(), os.environ.get("IN_TEST"), os.getcwd())')
        assert status == 'ok' and not errors, errors
        pid, in_test, cwd = next(o['text'] for o in outputs if o.get('name') == 'stdout').split()
        kernel_pids.append(int(pid))
        assert in_test == '1' and Path(cwd) == ROOT/'nbs'     # as nbdev_test runs a lesson: test sizes, from nbs/
        assert psutil.Process(int(pid)).ppid() == server.proc.pid

        cells = lesson_cells(LESSON)
        assert len(cells) >= 10
        shown = 0
        for i, code in enumerate(cells):
            status, outputs, errors = kernel.execute(code)
            assert status == 'ok' and not errors, f'{LESSON.name} cell {i} failed: {errors}\n{code}'
            shown += bool(outputs)
        assert shown >= 3   # the lesson shows values, not only asserts
        kernel.close()

        status, _ = server.api('DELETE', f'/api/kernels/{k["id"]}')
        assert status == 204
        assert server.api('GET', '/api/kernels')[1] == []
        children = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
        server.api('POST', '/api/shutdown')
        assert server.proc.wait(timeout=60) == 0
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(p) for p in kernel_pids + children): time.sleep(0.2)
        assert not [p for p in kernel_pids + children if alive(p)], 'processes left behind after shutdown'
        runtime = str(server.runtime)
        orphans = [p.pid for p in psutil.process_iter(['cmdline']) if any(runtime in a for a in (p.info['cmdline'] or []))]
        assert not orphans, f'kernel processes still running: {orphans}'
    finally:
        server.kill()
