"""The trainer service's tests run training jobs and the deployer's transformers probes in this process, some of
them while vLLM engines are under load: one torch thread, as in tests/training (its fixture says why)."""

from tests.training.conftest import one_torch_thread  # noqa: F401  (autouse: registered here for this package)
