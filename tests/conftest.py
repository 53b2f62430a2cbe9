"pytest setup: `slow` tests run only with --runslow (or SMALL_DOGE_SLOW=1); every test runs offline."
import os
import pytest

import small_doge   # first: on a machine without a GPU it chooses Triton's interpreter before anything imports triton

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='also run tests marked slow')

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a minute; run with --runslow')

def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow') or os.environ.get('SMALL_DOGE_SLOW'): return
    skip = pytest.mark.skip(reason='slow: run with --runslow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)
