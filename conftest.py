# Shared test settings. Hypothesis deadlines are off: a loaded 2-core CI machine makes timings noisy,
# and speed is measured by the benchmarks, never by tests.
from hypothesis import settings

settings.register_profile("cdc", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("cdc")
