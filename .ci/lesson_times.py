"""Measure how long each lesson takes on this machine's CPU and record it in .ci/lesson_times.json (the docs' lesson map
shows it). Each lesson runs alone under `nbdev_test --timing` (test sizes, IN_TEST=1, `#| slow` cells skipped).

Usage: python .ci/lesson_times.py [nbs/NN_name.ipynb ...]   (default: every lesson; lessons not named keep their time)"""
import json, os, re, subprocess, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import lesson_notebooks

TIMES = Path(__file__).parent/'lesson_times.json'

def measure(nb):
    "Seconds nbdev_test reports for one lesson, or None if it failed."
    r = subprocess.run(['nbdev_test', '--path', str(nb), '--timing', '--n_workers', '0'], capture_output=True, text=True)
    m = re.search(rf'^{re.escape(nb.name)}: (\d+) secs$', r.stdout, re.M)
    if r.returncode or not m:
        print(f'{nb.name}: failed\n{r.stderr[-2000:]}', file=sys.stderr)
        return None
    return int(m.group(1))

if __name__ == '__main__':
    nbs = [Path(a) for a in sys.argv[1:]] or [p for p in lesson_notebooks() if p.stem != 'index']
    rec = json.loads(TIMES.read_text()) if TIMES.exists() else {'seconds': {}}
    load = os.getloadavg()[0]
    for nb in nbs:
        secs = measure(nb)
        print(f'{nb.stem}: {secs} s', flush=True)
        if secs is not None: rec['seconds'][nb.stem] = secs
    rec['seconds'] = dict(sorted(rec['seconds'].items()))
    rec['how'] = (f'seconds for `nbdev_test --timing`, one lesson at a time (test sizes, `#| slow` cells skipped), on '
                  f'{os.cpu_count()} CPU cores shared with other jobs (load average {load:.1f} when measured); a reader\'s '
                  'full-size run in JupyterLab takes longer. Re-measure with `python .ci/lesson_times.py`.')
    TIMES.write_text(json.dumps(rec, indent=1) + '\n')
