import os

import torch
from hypothesis import settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile("llmfn", deadline=None, max_examples=15, derandomize=True)
settings.load_profile("llmfn")
