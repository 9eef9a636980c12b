"""`device_grid` on a mocked two-host TPU v4-16 (2x2x2 chips, a host per z plane): the
topology-aware layout of `mesh_utils` interleaves the hosts along the batch axes, and every
process must hold one block of the batch rows (it feeds, samples and reads back its own)."""

import dataclasses

import pytest

from jaxllm.sharding.mesh import device_grid


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    id: int
    coords: tuple
    process_index: int
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"
    slice_index: int = 0


def v4_16() -> list[FakeTpu]:
    chips = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
    return [FakeTpu(i, c, process_index=c[2]) for i, c in enumerate(chips)]


@pytest.mark.parametrize("shape", [(1, 8, 1), (8, 1, 1), (1, 4, 2), (2, 2, 2)])
def test_each_process_holds_one_block_of_the_batch(shape):
    grid = device_grid(shape, v4_16())
    shards = grid.reshape(shape[0] * shape[1], shape[2])  # batch shards in order × tensor
    owners = [{d.process_index for d in shard} for shard in shards]
    assert all(len(o) == 1 for o in owners)  # a tensor group stays on one host
    order = [o.pop() for o in owners]
    assert order == sorted(order) and set(order) == {0, 1}  # process 0's rows, then 1's
