"""Session-wide test settings."""

import torch

# The tests use tiny tensors, for which torch's intra-op threads cost more than they save (up to
# 10x slower when the 2 CI cores are busy): one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)
