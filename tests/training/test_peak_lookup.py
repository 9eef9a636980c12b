"""published_peak: real device_kind strings (jax's, and torch's CUDA names) against the
vendors' dense bf16 datasheet figures, written out here by hand."""

from types import SimpleNamespace

import pytest

from jaxllm.training.peak import published_peak, published_peak_of

T = 1e12
CASES = {
    "NVIDIA H100 80GB HBM3": 989 * T,  # SXM: 989.4 dense (1,979 sparse)
    "NVIDIA H100 PCIe": 756 * T,  # 756 dense (1,513 sparse)
    "NVIDIA H100 NVL": 835 * T,  # 835 dense (1,671 sparse)
    "NVIDIA H200": 989 * T,
    "NVIDIA H200 NVL": 835 * T,
    "NVIDIA A100-SXM4-80GB": 312 * T,
    "NVIDIA A100-PCIE-40GB": 312 * T,
    "NVIDIA L4": 121 * T,
    "NVIDIA L40S": 362 * T,  # not the L4's 121
    "NVIDIA L40": 181 * T,
    "TPU v4": 275 * T,
    "TPU v5 lite": 197 * T,  # v5e
    "TPU v5": 459 * T,  # jax's name for v5p
    "TPU v5p": 459 * T,
    "TPU v6 lite": 918 * T,  # v6e
    "cpu": None,  # measured instead
    "NVIDIA GeForce RTX 4090": None,
}


@pytest.mark.parametrize("kind", CASES)
def test_published_peak_of_device_kinds(kind):
    assert published_peak(SimpleNamespace(device_kind=kind)) == CASES[kind]
    assert published_peak_of(kind.upper()) == CASES[kind]  # case does not matter
