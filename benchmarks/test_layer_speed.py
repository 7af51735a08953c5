"""fwd, bwd and fwd+bwd of each variant at the main shape (rank 12, dropout 0 and 0.1)."""

import pytest
from conftest import DEVICE, DTYPE, SHAPE

from adalora_kernels import benchmarking as bm


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", bm.MODES)
@pytest.mark.parametrize("variant", bm.all_variants())
def test_layer(benchmark, variant, mode, dropout):
    case = bm.make_case(*SHAPE, 12, DTYPE, dropout, DEVICE, [variant])
    module = case.variants[variant]
    if isinstance(module, str):
        pytest.skip(f"{variant}: {module}")
    timed, setup = bm.step_fn(module, case, mode)
    benchmark.extra_info.update(case.row(mode, variant))
    if setup is None:
        benchmark.pedantic(timed, rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(timed, setup=setup, rounds=20, warmup_rounds=2)
