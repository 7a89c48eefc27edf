"""Data order: a function of (seed, epoch, batch size) only; rank slices partition each batch;
augmentation a function of (seed, epoch, sample index), the same per sample and per batch."""

import os

import pytest
import torch
import torch.nn.functional as F

from launcher import data as D
from launcher.data import order as O


def test_global_batches_partition_the_epoch_and_depend_on_seed_and_epoch():
    s = O.GlobalBatchSampler(50, seed=1)
    batches = [s.global_batch(0, k, 16) for k in range(4)]
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert not torch.equal(s.global_batch(1, 0, 16), batches[0])
    assert torch.equal(O.GlobalBatchSampler(50, seed=1).global_batch(0, 2, 16), batches[2])
    assert not torch.equal(O.GlobalBatchSampler(50, seed=2).global_batch(0, 0, 16), batches[0])


def test_rank_slices_cover_the_batch_for_any_world_size():
    for size in (1, 7, 16, 33):
        for world in (1, 2, 3, 8):
            got = []
            for r in range(world):
                lo, hi = O.rank_bounds(size, r, world)
                assert hi - lo in (size // world, -(-size // world))   # floor or ceil of size / world
                chunks = O.micro_batches(lo, hi, 3)
                assert chunks, "every rank takes part, even with no samples"
                got += [i for a, b in chunks for i in range(a, b)]
            assert got == list(range(size))


def test_augmentation_is_keyed_per_sample_and_sliceable():
    aug = O.Augment(pad=1, flip=True, rotate=15.0)
    p1 = O.augment_params(0, 2, [5, 9, 3], aug)
    assert torch.equal(p1, O.augment_params(0, 2, [5, 9, 3], aug))
    assert torch.equal(p1[1], O.augment_params(0, 2, [9], aug)[0])       # per sample, whatever the batch
    assert not torch.equal(p1, O.augment_params(0, 3, [5, 9, 3], aug))   # another epoch
    assert not torch.equal(p1, O.augment_params(1, 2, [5, 9, 3], aug))   # another seed
    many = O.augment_params(0, 0, range(20000), aug)
    assert set(many[:, 0].tolist()) == {0.0, 1.0, 2.0} and set(many[:, 2].tolist()) == {0.0, 1.0}
    assert many[:, 3].abs().max() <= 15.0 and abs(float(many[:, 3].mean())) < 0.2
    assert abs(float(many[:, 2].mean()) - 0.5) < 0.02                    # a fair coin


def test_crop_and_flip_are_torchvision_s_pad_slice_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    params = torch.tensor([[1, 1, 0, 0.0], [0, 2, 1, 0.0]], dtype=torch.float64)
    out = O.apply_augment(x, params, O.Augment(pad=1, flip=True, fill=(-7.0,)))
    assert torch.equal(out[0], x[0])                                  # offset (1, 1) = no shift
    expect = F.pad(x[1], (1, 1, 1, 1), value=-7.0)[:, 0:4, 2:6].flip(-1)
    assert torch.equal(out[1], expect)


def test_rotation_is_torchvision_s_pixel_for_pixel():
    """The reference: torchvision's rotate (RandomRotation's kernel), nearest pixel, fill 0."""
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for angle in (15.0, -7.3, 90.0, 3.0):
        params = torch.tensor([[0, 0, 0, angle]] * 2, dtype=torch.float64)
        ours = O.apply_augment(x, params, O.Augment(pad=0, flip=False, rotate=15.0, fill=(0.0, 0.0, 0.0)))
        assert torch.equal(ours, TF.rotate(x, angle, interpolation=TF.InterpolationMode.NEAREST, fill=0.0))


def test_the_paper_s_cifar100_recipes_rotate_by_15_degrees():
    import yaml
    from helpers import ROOT
    recipes = [yaml.safe_load(p.read_text()) for p in (ROOT / "recipes" / "paper").glob("*-increasing.yaml")]
    assert recipes and all(r["data"]["dataset"] == "cifar100" and r["data"]["rotation"] == 15.0 for r in recipes)


def test_rotation_turns_the_image_about_its_centre_and_fills_the_corners():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 6:] = 1.0                                              # a bar from the centre to the right
    params = torch.tensor([[0, 0, 0, 90.0]], dtype=torch.float64)
    out = O.apply_augment(x, params, O.Augment(pad=0, flip=False, rotate=90.0, fill=(0.0,)))
    turned = out[0, 0]
    assert torch.equal(turned, torch.rot90(x[0, 0], 1)) or torch.equal(turned, torch.rot90(x[0, 0], -1))
    filled = O.apply_augment(torch.ones(1, 1, 8, 8), torch.tensor([[0, 0, 0, 45.0]], dtype=torch.float64),
                             O.Augment(pad=0, flip=False, rotate=45.0, fill=(-3.0,)))
    assert filled[0, 0, 0, 0] == -3.0 and filled[0, 0, 4, 4] == 1.0      # a corner uncovered, the centre kept


def test_a_batch_and_its_samples_one_by_one_get_the_same_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    aug = O.Augment(pad=2, flip=True, rotate=15.0, fill=(0.1, 0.2, 0.3))
    params = O.augment_params(4, 1, range(6), aug)
    whole = O.apply_augment(x, params, aug)
    for i in range(6):
        assert torch.equal(whole[i:i + 1], O.apply_augment(x[i:i + 1], params[i:i + 1], aug))
        assert torch.equal(whole[i], O.apply_augment_one(x[i], params[i], aug))     # a worker's per-sample path


def test_a_sample_s_seed_is_the_keyed_hash():
    import numpy as np
    for seed, epoch, index in ((0, 0, 0), (3, 5, 123456), (2 ** 40, 7, 9)):
        assert O.sample_seed(seed, epoch, index) == int(O.keyed_bits(seed, "sample", epoch, [index], 1)[0, 0] >> np.uint64(1))


def test_digits_ships_with_the_package_and_has_a_fixed_split():
    ds = D.load(D.Data(dataset="digits"), torch.device("cpu"), torch.float32)
    assert (len(ds.train), len(ds.test)) == D.SIZES["digits"] and ds.shape == (1, 8, 8)
    again = D.load(D.Data(dataset="digits"), torch.device("cpu"), torch.float32)
    assert torch.equal(ds.train.labels, again.train.labels)


def _parent_and_threads(pid: int) -> tuple[int, int]:
    status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return int(status["PPid"]), int(status["Threads"])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_streamed_workers_come_from_a_single_threaded_fork_server_not_from_the_rank():
    """A rank runs gloo's threads, and a fork of it can leave the child waiting forever for a lock one of
    them held (CPython gh-112275: a resumed run hung at its first evaluation, 1 in 6 kill-and-resumes):
    both loaders' workers (training batches, evaluation shards) are forked by a server with one thread,
    still read the samples in order, and end cleanly when closed."""
    from types import SimpleNamespace
    from launcher.data.streamed import StreamedBatches, StreamedSplit
    ds = torch.utils.data.TensorDataset(torch.arange(12.0).view(12, 1), torch.arange(12))
    split = StreamedSplit(ds, torch.device("cpu"), torch.float32, workers=2)
    read = list(split.shard(2, 12, 4))
    assert [(a, b) for a, b, _, _ in read] == [(2, 6), (6, 10), (10, 12)]
    assert torch.equal(torch.cat([x for _, _, x, _ in read]), ds.tensors[0][2:])
    batches = StreamedBatches(split, seed=0, augment=None, comm=SimpleNamespace(rank=0, world=1), seeded=False)
    stage = SimpleNamespace(batch=4, micro_batch=2, steps=3)
    batches.start_epoch(0, 1, stage)
    size, micro = batches.step(0, 1, stage)
    order = O.GlobalBatchSampler(12, 0).permutation(0)
    assert size == 4 and torch.equal(torch.cat([y for _, y in micro]), order[4:8])
    workers = []
    for loader in (split._loader, batches.loader):
        workers += loader._iterator._workers
        parents = {_parent_and_threads(w.pid)[0] for w in loader._iterator._workers}
        assert len(parents) == 1 and os.getpid() not in parents
        assert _parent_and_threads(parents.pop())[1] == 1
    # closed, the workers get their stop message and exit 0 (left to the garbage collector, their queues
    # were finalised first: each join timed out and torch terminated them, exit -15)
    del loader
    split.close()
    batches.close()
    for w in workers:
        w.join(timeout=20)
    assert [w.exitcode for w in workers] == [0] * 4
