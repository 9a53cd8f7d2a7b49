import os

import torch

# Tests run on 2 cores; keep intra-op threads bounded so multi-process tests do not oversubscribe.
torch.set_num_threads(int(os.environ.get("MEMO_TEST_THREADS", "2")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long end-to-end runs (deselect with -m 'not slow')")
