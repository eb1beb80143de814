"""BatchLoader: a pure function of (seed, step), resumable, split across processes, epoch-exact;
eval_batches: every example once, padding rows fully masked."""

import numpy as np
import pytest

from rlhf_jax.data import lm_datasets, tokenizer as tok_lib
from rlhf_jax.data.loader import BatchLoader, eval_batches
from rlhf_jax.tasks import builtin_text


def make_source(n, width=5):
    """Records carry their own index in "id" so batches can be traced back to examples."""
    return [
        {"id": np.array(i, np.int32), "tokens": np.full(width, i + 1, np.int32), "loss_mask": np.ones(width, np.int32)}
        for i in range(n)
    ]


def reference_indices(n, batch, seed, step, shuffle=True):
    """The documented scheme, written as a plain loop."""
    out = []
    for i in range(batch):
        epoch, pos = divmod(step * batch + i, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        out.append(int(perm[pos]))
    return out


@pytest.mark.parametrize("n,batch,shuffle", [(10, 4, True), (7, 3, True), (5, 8, True), (9, 3, False)])
def test_batches_follow_the_documented_scheme(n, batch, shuffle):
    loader = BatchLoader(make_source(n), batch, seed=3, shuffle=shuffle, process_index=0, process_count=1)
    for step in range(12):
        assert loader.get_batch(step)["id"].tolist() == reference_indices(n, batch, 3, step, shuffle)


def test_same_seed_same_batches_other_seed_other_batches():
    src = make_source(50)
    a, b, c = (BatchLoader(src, 8, seed=s, process_index=0, process_count=1) for s in (0, 0, 1))
    assert all(np.array_equal(a.get_batch(s)["id"], b.get_batch(s)["id"]) for s in range(20))
    assert any(not np.array_equal(a.get_batch(s)["id"], c.get_batch(s)["id"]) for s in range(20))


def test_resume_at_step_k_equals_uninterrupted_run():
    src = make_source(23)
    full = [b["id"].tolist() for _, b in BatchLoader(src, 4, seed=7, process_index=0, process_count=1).iterate(0, 15)]
    resumed = BatchLoader(src, 4, seed=7, process_index=0, process_count=1)  # fresh object: no carried state
    steps_and_ids = [(s, b["id"].tolist()) for s, b in resumed.iterate(9, 6)]
    assert steps_and_ids == list(zip(range(9, 15), full[9:]))


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(count):
    src = make_source(13)
    whole = BatchLoader(src, 8, seed=1, process_index=0, process_count=1)
    parts = [BatchLoader(src, 8, seed=1, process_index=p, process_count=count) for p in range(count)]
    for step in range(10):  # crosses several epoch boundaries
        local = [p.get_batch(step) for p in parts]
        assert all(len(b["id"]) == 8 // count for b in local)
        for key in ("id", "tokens"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole.get_batch(step)[key])


def test_each_epoch_covers_every_example_exactly_once():
    n, batch = 12, 4
    loader = BatchLoader(make_source(n), batch, seed=5, process_index=0, process_count=1)
    stream = np.concatenate([loader.get_batch(s)["id"] for s in range(3 * n // batch)])
    epochs = stream.reshape(3, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert loader.steps_per_epoch == n / batch


def test_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        BatchLoader([], 4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        BatchLoader(make_source(4), 3, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index=2"):
        BatchLoader(make_source(4), 4, seed=0, process_index=2, process_count=2)


def test_prefetch_reraises_source_errors():
    class Broken(list):
        def __getitem__(self, i):
            if i == 3:
                raise KeyError("record 3 is unreadable")
            return list.__getitem__(self, i)

    loader = BatchLoader(Broken(make_source(6)), 2, seed=0, shuffle=False, process_index=0, process_count=1)
    with pytest.raises(KeyError, match="record 3"):
        list(loader.iterate(0, 3))


@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_cover_each_example_once_with_masked_padding(count):
    n, batch = 11, 4
    per_process = [
        list(eval_batches(make_source(n), batch, process_index=p, process_count=count)) for p in range(count)
    ]
    assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == 3  # same count on every process
    rows = {
        k: np.concatenate([np.concatenate([b[k] for b in step]) for step in zip(*per_process)])
        for k in ("id", "tokens", "loss_mask")
    }
    real = rows["loss_mask"].any(axis=1)
    assert rows["id"][real].tolist() == list(range(n))  # in order, once each
    assert real.sum() == n and len(real) == 12
    assert not rows["tokens"][~real].any()  # padding rows are all zeros
    assert len(list(eval_batches(make_source(n), batch, max_batches=2, process_index=0, process_count=1))) == 2


def test_arrayrecord_source_batches_equal_in_memory_batches(tmp_path):
    corpus = builtin_text.write_builtin_corpus(str(tmp_path / "c.txt"), num_chars=6000)
    tok = tok_lib.train_tokenizer(corpus, str(tmp_path / "t.model"), vocab_size=350)
    source = lm_datasets.build_text_dataset(corpus, tok.path, 8, str(tmp_path / "d"))["train"]
    in_memory = [source[i] for i in range(len(source))]
    a = BatchLoader(source, 6, seed=2, process_index=0, process_count=1)
    b = BatchLoader(in_memory, 6, seed=2, process_index=0, process_count=1)
    for (_, x), (_, y) in zip(a.iterate(0, 2 * len(source) // 6), b.iterate(0, 2 * len(source) // 6)):
        for k in ("tokens", "input_mask", "loss_mask"):
            np.testing.assert_array_equal(x[k], y[k])
