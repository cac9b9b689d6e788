import os
os.environ.setdefault("MPLBACKEND", "Agg")
import torch
# Without a GPU, Triton kernels (`ipot(..., triton=True)`) run in Triton's interpreter, so their tests run on any machine;
# the switch must be set before Triton is first imported.
if not torch.cuda.is_available(): os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
