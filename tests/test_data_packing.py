"""Packing loader and bucketing collate: coverage, seeded order, rank sharding, exact resume,
document-local attention, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.data.packing import BucketBatchSampler, PackedLoader, document_fields, pad_collate
from lmforge.model.masks import AttentionPattern

EOT = 60_000


def shards() -> list[np.ndarray]:
    stream = np.arange(1, 2001, dtype=np.int64)  # every window's content is unique
    stream[::37] = EOT
    return [
        stream[:700].astype(np.uint16),
        stream[700:1500].astype(np.uint16),
        stream[1500:].astype(np.uint16),
    ]


def test_one_epoch_covers_every_window_once_across_shard_boundaries():
    arrays = shards()
    flat = np.concatenate(arrays)
    loader = PackedLoader(arrays, block_size=16, micro_batch_size=4, seed=3)
    seen = []
    for _ in range(loader.steps_per_epoch()):
        (b,) = loader.next_step()
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        for row_x, row_y in zip(b["input_ids"], b["labels"]):
            seen.append(tuple(row_x.tolist()) + (int(row_y[-1]),))
    expected = {tuple(flat[w * 16 : w * 16 + 17].tolist()) for w in range(loader.n_windows)}
    assert len(seen) == len(set(seen)) == loader.steps_per_epoch() * 4
    assert (
        set(seen) <= expected and len(expected) - len(seen) < 4
    )  # only the epoch's tail is dropped


def test_shuffle_depends_on_seed_and_epoch():
    a = PackedLoader(shards(), 16, 4, seed=1).next_step()[0]["input_ids"]
    b = PackedLoader(shards(), 16, 4, seed=1).next_step()[0]["input_ids"]
    c = PackedLoader(shards(), 16, 4, seed=2).next_step()[0]["input_ids"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ranks_get_disjoint_rows_that_together_equal_one_process():
    single = PackedLoader(shards(), 16, micro_batch_size=4, seed=0)
    ranks = [
        PackedLoader(shards(), 16, micro_batch_size=2, seed=0, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(5):
        (full,) = single.next_step()
        parts = [r.next_step()[0]["input_ids"] for r in ranks]
        assert sorted(map(tuple, full["input_ids"].tolist())) == sorted(
            map(tuple, torch.cat(parts).tolist())
        )
        assert not set(map(tuple, parts[0].tolist())) & set(map(tuple, parts[1].tolist()))


def test_state_dict_resumes_exactly_mid_epoch_and_across_epochs():
    ref = PackedLoader(shards(), 16, 4, seed=5)
    expected = [ref.next_step(2) for _ in range(20)]  # 124 windows, 8 a step: crosses an epoch
    assert ref.epoch >= 1
    a = PackedLoader(shards(), 16, 4, seed=5)
    for _ in range(7):
        a.next_step(2)
    state = a.state_dict()
    b = PackedLoader(shards(), 16, 4, seed=5)
    b.load_state_dict(state)
    for step in expected[7:]:
        got = b.next_step(2)
        assert all(torch.equal(g["input_ids"], e["input_ids"]) for g, e in zip(got, step))
    with pytest.raises(LmforgeError, match="cannot resume the data loader"):
        PackedLoader(shards(), 8, 4, seed=5).load_state_dict(state)


def test_document_masks_keep_attention_inside_documents():
    x = torch.tensor([[5, 6, EOT, 7, 8, EOT, 9]])
    m = document_fields(x, EOT)
    assert m["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert m["document_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    att = AttentionPattern(documents=m["document_ids"]).dense(7, 7, "cpu")[0, 0]
    assert att.shape == (7, 7) and att.dtype == torch.bool
    assert att[4].tolist() == [False, False, True, True, True, False, False]  # EOT starts it
    assert att[1].tolist() == [True, True] + [False] * 5
    loader = PackedLoader(shards(), 16, 2, within_document=True, eot_id=EOT)
    b = loader.next_step()[0]
    assert b["document_ids"].shape == (2, 16) and b["position_ids"].shape == (2, 16)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(LmforgeError, match="data too short"):
        PackedLoader([np.arange(10, dtype=np.uint16)], block_size=16, micro_batch_size=1)


def test_pad_collate_pads_right_with_masked_labels():
    batch = pad_collate(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4], "labels": [-100]}],
        pad_id=0,
        pad_to_multiple_of=4,
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100], [-100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_bucket_sampler_groups_similar_lengths_covers_all_and_resumes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=1000)
    sampler = BucketBatchSampler(lengths, batch_size=10, seed=1, bucket_factor=20)
    batches = sampler.batches(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_padded = sum(
        10 * lengths[rng.permutation(1000)[i : i + 10]].max() for i in range(0, 1000, 10)
    )
    assert padded < 0.7 * random_padded
    it = iter(sampler)
    first = [next(it) for _ in range(130)]  # into the second epoch
    resumed = BucketBatchSampler(lengths, batch_size=10, seed=1, bucket_factor=20)
    resumed.load_state_dict(
        BucketBatchSampler(lengths, 10, 1, 20).state_dict() | {"epoch": 1, "position": 20}
    )
    assert next(iter(resumed)) == first[120]
    ranks = [
        BucketBatchSampler(lengths, 10, seed=1, rank=r, world_size=3).batches(0) for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1
