import os

import torch

# Triton kernels run on CPU tensors only through its interpreter, which Triton reads when a
# kernel is defined: switch it on before anything imports promptbake.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
