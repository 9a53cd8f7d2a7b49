import os

import torch

# Tests run on 2 cores; keep intra-op threads bounded so multi-process tests do not oversubscribe.
torch.set_num_threads(int(os.environ.get("MEMO_TEST_THREADS", "2")))
