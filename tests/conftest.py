import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile("ci", max_examples=12, derandomize=True, **_common)
settings.register_profile(
    "soak", max_examples=int(os.environ.get("FXKD_SOAK_EXAMPLES", "400")), **_common
)
settings.load_profile("ci")
