"""The operator contract end to end: every learnable parameter of every operator exists after
``init_batch`` and moves under every method that learns it (BIRD, BIR-D, GDP), on the tiny prior.

The regression this guards: a mask created on the first forward call, after BIRD had built its
Adam optimiser, was never optimised (its largest change after 5 iterations was 0.0)."""

from __future__ import annotations

import hydra
import pytest
import torch

from bir.operators import (
    Compose,
    KernelMaskOperator,
    KernelMLPBlur,
    LearnableKernelBlur,
    LowLightOperator,
)
from tests.conftest import compose_config

OPERATORS = {
    "kernel_mask": lambda: KernelMaskOperator(kernel_size=3, init="rand", kernel_lr=1.0),
    "lowlight": lambda: LowLightOperator(),
    "learned_kernel": lambda: LearnableKernelBlur(kernel_size=3, init="gaussian"),
    "kernel_mlp": lambda: KernelMLPBlur(kernel_size=3, latent_dim=4, hidden=8),
    "compose": lambda: Compose(
        [KernelMaskOperator(kernel_size=3, use_mask=False), LowLightOperator()]
    ),
}
METHODS = {  # overrides that make each method learn the operator, in a few steps
    "bird": ["method=bird", "method.iterations=1", "method.delta_t=250"],
    "bir_d": ["method=bir_d", "method.steps=2", "method.dynamic_kernel=true"],
    "gdp": [
        "method=gdp",
        "method.steps=2",
        "method.dynamic_kernel=true",
        "method.guidance_scale=100.0",
    ],
}


@pytest.fixture(scope="module")
def prior():
    cfg = compose_config("restore", "prior=tiny")
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.prior)


def learnable(op) -> dict[str, torch.Tensor]:
    return {
        f"{g['name']}.{k}": p.detach().clone()
        for g in op.param_groups(0.01)
        for k, p in enumerate(g["params"])
    }


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("op_name", sorted(OPERATORS))
def test_every_learnable_parameter_moves(prior, method_name, op_name):
    cfg = compose_config("restore", *METHODS[method_name])
    op = OPERATORS[op_name]()
    start: dict[str, torch.Tensor] = {}
    init_batch = op.init_batch

    def recording_init_batch(shape, generators=None):
        init_batch(shape, generators)
        start.update(learnable(op))  # everything a method may learn exists now

    op.init_batch = recording_init_batch
    method = hydra.utils.instantiate(cfg.method, prior=prior, operator=op)
    y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False):
        method.predict_step({"lq": y, "name": ["img"], "index": torch.tensor([0])})
    end = learnable(op)
    assert start and set(start) == set(end)
    still = [name for name in start if torch.equal(start[name], end[name])]
    assert not still, f"{method_name} left {still} of {op_name} unchanged"
