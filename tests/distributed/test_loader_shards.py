"""DeviceLoader sharding (issue 18): the ranks' slices of every global batch, augmentation,
views and sample indices included, put together are exactly the one-process batches; a batch size
the ranks cannot split evenly is refused with both numbers."""
from __future__ import annotations

import pytest
import torch

from nasprune.data import DeviceLoader, load_dataset


@pytest.fixture(scope="module")
def data():
    return load_dataset(None, size=16)[0].subset(range(100))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kw", [dict(shuffle=True, augment=True, drop_last=True),
                                dict(shuffle=True, augment=True, drop_last=True, views=2, with_index=True),
                                dict(shuffle=False, augment=False, drop_last=False)])
def test_rank_slices_make_the_one_process_batches(data, world, kw):
    batch = 12
    one = DeviceLoader(data, batch, device="cpu", seed=5, **kw)
    ranks = [DeviceLoader(data, batch, device="cpu", seed=5, rank=r, world_size=world, **kw) for r in range(world)]
    assert all(len(lo) == len(one) for lo in ranks) and ranks[1].local_batch_size == batch // world
    for _ in range(2):                                   # two epochs: the reshuffle stays in step
        for full, *parts in zip(one, *ranks):
            for i, item in enumerate(full):
                if isinstance(item, tuple):              # views
                    for v in range(len(item)):
                        assert torch.equal(item[v], torch.cat([p[i][v] for p in parts]))
                else:
                    assert torch.equal(item, torch.cat([p[i] for p in parts]))
    if not kw["drop_last"]:   # the short last batch (100 = 8 x 12 + 4) is split as tensor_split cuts it
        sizes = [len(list(lo)[-1][1]) for lo in ranks]
        assert sizes == {2: [2, 2], 3: [2, 1, 1]}[world]


def test_resumed_rank_continues_its_slices(data):
    a = DeviceLoader(data, 12, device="cpu", seed=1, shuffle=True, augment=True, rank=1, world_size=2)
    it = iter(a)
    next(it)
    b = DeviceLoader(data, 12, device="cpu", seed=9, shuffle=True, augment=True, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    for x, y in zip(it, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_batch_size_not_divisible_by_the_world_size_is_refused(data):
    with pytest.raises(ValueError, match=r"batch_size 10 .* 4 ranks"):
        DeviceLoader(data, 10, device="cpu", rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2 outside"):
        DeviceLoader(data, 10, device="cpu", rank=2, world_size=2)
