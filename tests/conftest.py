import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import of fusedloss.kernels), not at
# launch: without a GPU, set it before anything imports the kernels so that the triton backend runs
# under the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedloss  # noqa: E402

AVAILABLE = {name: info["available"] for name, info in fusedloss.backends().items()}

# Fused backends and the device of the tensors they run on here.
FUSED = {"cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu", "cuda": "cuda"}


def backend_params():
    """One pytest param per fused backend; unavailable ones are skipped with the reason."""
    out = []
    for name in FUSED:
        info = fusedloss.backends()[name]
        marks = [] if info["available"] else [pytest.mark.skip(reason=f"{name}: {info['why']}")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


@pytest.fixture
def device(backend):
    return FUSED[backend]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
