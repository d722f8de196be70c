"""The resumable training loader (issue 19): order, shards, position in checkpoints."""

import pytest
import torch

from dti_sprites.datamodules.resumable import (
    ResumableDataLoader,
    ResumableSampler,
    evaluation_loader,
    training_loader,
)

N, BATCH = 22, 4  # 6 batches per epoch on one process, the last one of 2


def loader(seed=0, replicas=1, rank=0, batch=BATCH) -> ResumableDataLoader:
    sampler = ResumableSampler(list(range(N)), num_replicas=replicas, rank=rank, seed=seed)
    return ResumableDataLoader(list(range(N)), batch_size=batch, sampler=sampler)


def epoch(dl, e) -> list[list[int]]:
    dl.sampler.set_epoch(e)
    return [b.tolist() for b in dl]


def test_order_is_fixed_by_seed_and_epoch_and_shards_split_it():
    a, b = loader(), loader()
    assert epoch(a, 0) == epoch(b, 0)
    assert epoch(a, 1) != epoch(a, 0)  # reshuffled every epoch
    assert epoch(loader(seed=1), 0) != epoch(loader(), 0)
    assert sorted(i for batch in epoch(a, 3) for i in batch) == list(range(N))
    shards = [epoch(loader(replicas=2, rank=r), 2) for r in (0, 1)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(shards[0]) == len(shards[1]) == 3  # 11 images each
    assert sorted(seen) == list(range(N))


def test_a_loader_restored_mid_epoch_yields_the_rest_of_the_epoch():
    dl = loader()
    dl.sampler.set_epoch(2)
    whole = epoch(loader(), 2)
    it = iter(dl)
    first = [next(it).tolist() for _ in range(4)]
    state = dl.state_dict()
    assert (state["epoch"], state["batches"]) == (2, 4)
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == 6  # the whole epoch: Lightning counts the epoch by it
    rest = epoch(resumed, 2)  # Lightning sets the epoch again before the first batch
    assert first + rest == whole
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batches"] == 0
    # The next epoch is whole again, and as without the resume.
    assert epoch(resumed, 3) == epoch(loader(), 3)


def test_a_state_from_an_ended_epoch_starts_the_next_one_whole():
    dl = loader()
    dl.load_state_dict({"epoch": 1, "batches": 3})  # e.g. an epoch cut by limit_train_batches
    assert epoch(dl, 2) == epoch(loader(), 2)


def test_each_process_resumes_its_own_shard():
    for rank in (0, 1):
        dl = loader(replicas=2, rank=rank)
        whole = epoch(loader(replicas=2, rank=rank), 5)
        dl.sampler.set_epoch(5)
        it = iter(dl)
        next(it)
        resumed = loader(replicas=2, rank=rank)
        resumed.load_state_dict(dl.state_dict())
        assert epoch(resumed, 5) == whole[1:]


def test_a_resume_with_another_batch_size_warns():
    dl = loader(batch=2)
    with pytest.warns(UserWarning, match="batch_size: 4 -> 2"):
        dl.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 4})


def test_loaders_leave_the_global_random_state_alone():
    dataset = [torch.zeros(1) for _ in range(N)]
    before = torch.get_rng_state()
    for dl in (training_loader(dataset, BATCH, 0, 0, None), evaluation_loader(dataset, BATCH, 0)):
        for _ in range(2):
            list(dl)
    assert torch.equal(torch.get_rng_state(), before)
