"""Data order: a function of (seed, epoch, batch size) only; rank slices partition each batch."""
import torch

from launcher import data as D


def test_global_batches_partition_the_epoch_and_depend_on_seed_and_epoch():
    s = D.GlobalBatchSampler(50, seed=1)
    batches = [s.global_batch(0, k, 16) for k in range(4)]
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert not torch.equal(s.global_batch(1, 0, 16), batches[0])
    assert torch.equal(D.GlobalBatchSampler(50, seed=1).global_batch(0, 2, 16), batches[2])
    assert not torch.equal(D.GlobalBatchSampler(50, seed=2).global_batch(0, 0, 16), batches[0])


def test_rank_slices_cover_the_batch_for_any_world_size():
    for size in (1, 7, 16, 33):
        for world in (1, 2, 3, 8):
            got = []
            for r in range(world):
                lo, hi = D.rank_bounds(size, r, world)
                chunks = D.micro_batches(lo, hi, 3)
                assert chunks, "every rank takes part, even with no samples"
                got += [i for a, b in chunks for i in range(a, b)]
            assert got == list(range(size))


def test_augmentation_is_keyed_and_sliceable():
    aug = D.Augment(pad=1, flip=True)
    o1, f1 = D.augment_params(0, 2, 5, 10, aug)
    o2, f2 = D.augment_params(0, 2, 5, 10, aug)
    assert torch.equal(o1, o2) and torch.equal(f1, f2)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = D.apply_augment(x, torch.tensor([[1, 0], [1, 2]]), torch.tensor([False, True]), pad=1)
    assert torch.equal(out[0], x[0])                                  # offset (1, 1) = no shift
    expect = torch.nn.functional.pad(x[1], (1, 1, 1, 1))[:, 0:4, 2:6].flip(-1)
    assert torch.equal(out[1], expect)


def test_digits_ships_with_the_package_and_has_a_fixed_split():
    ds = D.load(D.Data(dataset="digits"), torch.device("cpu"), torch.float32)
    assert (len(ds.train), len(ds.test)) == D.SIZES["digits"] and ds.shape == (1, 8, 8)
    again = D.load(D.Data(dataset="digits"), torch.device("cpu"), torch.float32)
    assert torch.equal(ds.train.labels, again.train.labels)
