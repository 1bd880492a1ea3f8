"""bir-bench quality makes every blurred observation with the forward model each method inverts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bir.bench_quality import BLUR_PADDING, method_operator, observe, tasks
from bir.operators import KernelMLPBlur, convolve_per_image

BLUR_TASKS = [t for t in tasks(7) if "blur" in t.op_spec["kind"]]


@pytest.mark.parametrize("task", BLUR_TASKS, ids=lambda t: t.name)
def test_methods_invert_the_model_that_made_the_observation(task):
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    task = dataclasses.replace(task, sigma=0.0)  # the forward model alone
    y, truth = observe(task, x, seed=3)
    psf = truth["kernel"]  # [B, 1, k, k], convolution PSF
    assert task.op_spec["padding"] == BLUR_PADDING and truth["operator"].padding == BLUR_PADDING
    for method in ("bird", "bir_d"):
        op = method_operator(method, task, truth, kernel_size=7)
        if not task.blind:
            assert op is truth["operator"]
            continue
        assert op.padding == BLUR_PADDING
        if isinstance(op, KernelMLPBlur):  # its blur with the true PSF is the observation
            ours = convolve_per_image(x, psf, op.padding)
        else:  # BIR-D / GDP: K * x + M with K = the true kernel (in the operator's direction), M = 0
            op.init_batch(x.shape)
            with torch.no_grad():
                k = psf.expand(-1, 3, -1, -1)
                op.kernel.copy_(k.flip(-1, -2) if op.correlate else k)
                if op.mask is not None:
                    op.mask.zero_()
            ours = op(x)
        torch.testing.assert_close(ours.clamp(0, 1), y, rtol=0, atol=1e-6)
