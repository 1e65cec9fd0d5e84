# Shared test settings. Hypothesis deadlines are off: a loaded 2-core CI machine makes timings noisy,
# and speed is measured by the benchmarks, never by tests.
import torch
from hypothesis import settings

# The tests multiply many small tensors: one intra-op thread avoids OpenMP overhead and, on a busy 2-core
# runner, thread contention (measured here: 14 s instead of 71 s for the sampler and training checks).
# Scripts the tests launch as subprocesses keep torch's default.
torch.set_num_threads(1)

settings.register_profile("cdc", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("cdc")
