"""Measure how long each lesson takes on a CPU and record it in .ci/lesson_times.json (the docs' lesson map shows it).

Each lesson runs alone under `nbdev_test --timing` (test sizes, IN_TEST=1, `#| slow` cells skipped), in its own
process on one thread (OMP_NUM_THREADS=1). Two numbers per lesson: `cpu`, the process's CPU seconds (user + system,
imports included), which is about what the lesson takes alone on one free core and moves little when other jobs share
the machine; and `wall`, the seconds nbdev_test reports, which does move with the load. The map shows `cpu`.

Usage: python .ci/lesson_times.py [nbs/NN_name.ipynb ...]   (default: every lesson; lessons not named keep their times)"""
import json, os, re, resource, subprocess, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import lesson_notebooks

TIMES = Path(__file__).parent/'lesson_times.json'

def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

def measure(nb):
    "{'cpu': s, 'wall': s, 'load': 1-min load average before} for one lesson, or None if it failed."
    load, before = os.getloadavg()[0], children_cpu()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}   # one thread: CPU time ~ time on a free core
    r = subprocess.run(['nbdev_test', '--path', str(nb), '--timing', '--n_workers', '0'], capture_output=True, text=True, env=env)
    cpu = children_cpu() - before
    m = re.search(rf'^{re.escape(nb.name)}: (\d+) secs$', r.stdout, re.M)
    if r.returncode or not m:
        print(f'{nb.name}: failed\n{r.stderr[-2000:]}', file=sys.stderr)
        return None
    return {'cpu': round(cpu, 1), 'wall': int(m.group(1)), 'load': round(load, 1)}

if __name__ == '__main__':
    nbs = [Path(a) for a in sys.argv[1:]] or [p for p in lesson_notebooks() if p.stem != 'index']
    rec = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    lessons = rec.get('lessons', {})
    for nb in nbs:
        t = measure(nb)
        print(f'{nb.stem}: {t}', flush=True)
        if t is not None: lessons[nb.stem] = t
    loads = [t['load'] for t in lessons.values()]
    rec = {'how': (f'CPU seconds of `nbdev_test` running the lesson alone, on one thread, in its own process (test sizes, '
                   f'`#| slow` cells skipped, imports included): about its wall time on one free core. Measured on a '
                   f'{os.cpu_count()}-core machine shared with other jobs (load average {min(loads):.0f} to '
                   f'{max(loads):.0f}); a full-size run in JupyterLab takes longer. '
                   f'Re-measure with `python .ci/lesson_times.py`.'),
           'lessons': dict(sorted(lessons.items()))}
    rows = ',\n'.join(f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in rec['lessons'].items())
    TIMES.write_text(f'{{\n "how": {json.dumps(rec["how"])},\n "lessons": {{\n{rows}\n }}\n}}\n')
