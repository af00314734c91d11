import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Must be set before
# any kernel is decorated, i.e. before lapo_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
