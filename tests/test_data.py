"""Data loading: CIFAR-10 through the ImageFolder path, the embedded digits, determinism, sharding and bad data."""
from __future__ import annotations

import logging
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amap.data import (
    DataBundle,
    DataConfig,
    DataWarning,
    DigitsDataset,
    ImageFolderDataset,
    balanced_subset,
    build_eval_loader,
    build_loaders,
    build_transform,
    shard_indices,
)
from amap.errors import ConfigError, DataError

CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def _cfg(data, **kw) -> DataConfig:
    base = dict(data=str(data), batch_size=16, num_workers=0, train_subset=200, val_subset=100)
    base.update(kw)
    return DataConfig(**base)


def _epoch(bundle: DataBundle, epoch: int, *, skip: int = 0, limit: int | None = None):
    bundle.train_sampler.set_epoch(epoch, skip=skip)
    out = []
    for i, (x, y) in enumerate(bundle.train_loader):
        if limit is not None and i >= limit:
            break
        out.append((x, y))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _make_folder(root: Path, layout: dict[str, dict[str, int]], size: int = 12) -> Path:
    """``layout = {split: {class: n_images}}`` of small random PNGs."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f'{i}.png')
    return root


# ----------------------------------------------------------------------------------------------------------- CIFAR-10
def test_cifar_loading_and_test_fallback(cifar10, caplog):
    with caplog.at_level(logging.INFO, logger='amap.data'):
        b = build_loaders(_cfg(cifar10))
    assert b.class_names == CIFAR_CLASSES and b.num_classes == 10
    assert b.eval_split == 'test' and 'evaluating on' in caplog.text and 'test' in caplog.text
    assert (b.train_size, b.val_size) == (200, 100)
    assert b.steps_per_epoch == len(b.train_loader) == 200 // 16
    assert b.mean == pytest.approx((0.485, 0.456, 0.406)) and b.std == pytest.approx((0.229, 0.224, 0.225))
    x, y = _epoch(b, 0, limit=1)[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.3  # normalised, not 0..255 or 0..1 constant
    xs, ys = zip(*b.val_loader)
    assert sum(len(v) for v in ys) == 100 and xs[0].shape[1:] == (3, 32, 32)
    assert xs[0].shape[0] == 32  # eval batch defaults to 2 * batch_size


def test_eval_loader_falls_back_to_test(cifar10, caplog):
    with caplog.at_level(logging.INFO, logger='amap.data'):
        loader, n = build_eval_loader(str(cifar10), img_size=32, batch_size=25, num_workers=0, subset=50)
    assert n == 10 and len(loader.dataset) == 50
    assert 'no val/ folder' in caplog.text
    labels = torch.cat([y for _, y in loader])
    assert sorted(Counter(labels.tolist()).values()) == [5] * 10  # balanced val subset
    # the test split really is CIFAR's test set (10000 images), not the training set
    assert len(build_eval_loader(str(cifar10), img_size=32, batch_size=8, num_workers=0)[0].dataset) == 10000


def test_subset_is_deterministic_and_balanced(cifar10):
    ds = ImageFolderDataset(Path(cifar10) / 'train')
    a = balanced_subset(ds.targets, 103)
    assert a == balanced_subset(ds.targets, 103) and len(set(a)) == 103
    counts = Counter(ds.targets[i] for i in a)
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1
    assert balanced_subset(ds.targets, 103, seed=1) != a
    b1, b2 = build_loaders(_cfg(cifar10)), build_loaders(_cfg(cifar10, batch_size=8))
    assert b1.train_loader.dataset.dataset.indices == b2.train_loader.dataset.dataset.indices


def test_same_seed_and_epoch_give_identical_batches(cifar10):
    cfg = _cfg(cifar10, augment='strong')  # pad-crop, flip, RandAugment and random erasing all draw randomness
    a = _epoch(build_loaders(cfg, seed=3), 1)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    b = _epoch(build_loaders(cfg, seed=3), 1)
    assert _same(a, b)
    # loading in the main process leaves the caller's RNG streams untouched
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    # the global RNG does not leak into the augmentations
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    assert _same(a, _epoch(build_loaders(cfg, seed=3), 1))
    # a different epoch or seed reshuffles and re-augments
    bundle = build_loaders(cfg, seed=3)
    c = _epoch(bundle, 2)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    assert not _same(a, _epoch(build_loaders(cfg, seed=4), 1))
    assert len(c) == len(a)


def test_augmentations_do_not_depend_on_num_workers(cifar10):
    cfg = _cfg(cifar10, augment='strong', train_subset=96)
    main = _epoch(build_loaders(cfg, seed=7), 4)
    workers = build_loaders(_cfg(cifar10, augment='strong', train_subset=96, num_workers=2), seed=7)
    assert _same(main, _epoch(workers, 4))
    assert _same(main, _epoch(workers, 4))  # persistent workers, second pass of the same epoch
    assert not _same(main, _epoch(workers, 5))


def test_resume_skip_yields_the_remaining_batches(cifar10):
    b = build_loaders(_cfg(cifar10, augment='strong'), seed=1)
    full = _epoch(b, 3)
    rest = _epoch(b, 3, skip=5 * b.train_loader.batch_size)
    assert len(rest) == len(full) - 5 and _same(full[5:], rest)
    assert _same(full, _epoch(b, 3))  # the skip applied to one pass only
    assert b.steps_per_epoch == len(full)


def test_mixup_output_shapes(cifar10):
    b = build_loaders(_cfg(cifar10, mixup=0.8, cutmix=1.0, label_smoothing=0.1, train_subset=15, batch_size=32))
    assert b.mixup_fn is not None and b.train_loader.batch_size == 14  # clamped to the subset, made even
    x, y = _epoch(b, 0)[0]
    xm, ym = b.mixup_fn(x, y)
    assert xm.shape == (14, 3, 32, 32) and ym.shape == (14, 10)
    assert torch.allclose(ym.sum(1), torch.ones(14)) and float(ym.min()) >= 0.1 / 10 - 1e-6
    assert build_loaders(_cfg(cifar10)).mixup_fn is None


def test_large_image_transforms():
    img = Image.fromarray(np.zeros((120, 100, 3), dtype=np.uint8))
    train = build_transform(img_size=96, is_training=True, augment='basic')
    assert type(train.transforms[0]).__name__ == 'RandomResizedCropAndInterpolation'
    assert train(img).shape == (3, 96, 96)
    ev = build_transform(img_size=96, is_training=False)
    assert ev.transforms[0].size == int(96 / 0.875) and ev(img).shape == (3, 96, 96)
    small = build_transform(img_size=32, is_training=True, augment='basic')
    assert [type(t).__name__ for t in small.transforms[:3]] == ['Resize', 'RandomCrop', 'RandomHorizontalFlip']
    assert small.transforms[1].padding == 4


# ----------------------------------------------------------------------------------------------------------- digits
def test_digits_default():
    b = build_loaders(DataConfig(batch_size=64, num_workers=0, img_size=24))
    assert b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert (b.train_size, b.val_size) == (1437, 360) and b.eval_split == 'val'
    x, y = _epoch(b, 0, limit=1)[0]
    assert x.shape == (64, 3, 24, 24) and 0 <= int(y.min()) and int(y.max()) <= 9
    mean, std = torch.tensor(b.mean).view(1, 3, 1, 1), torch.tensor(b.std).view(1, 3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    tr, va = DigitsDataset('train'), DigitsDataset('val')
    assert not set(tr.source_indices) & set(va.source_indices)
    assert len(set(tr.source_indices) | set(va.source_indices)) == 1797
    val_counts = Counter(va.targets)
    assert min(val_counts.values()) >= 35 and max(val_counts.values()) <= 37  # stratified 20 %
    img, label = tr[0]
    assert img.size == (32, 32) and img.mode == 'RGB'
    a = np.asarray(img)
    assert np.array_equal(a[..., 0], a[..., 1]) and a.max() > 100
    loader, n = build_eval_loader('digits', img_size=16, batch_size=100, num_workers=0)
    assert n == 10 and len(loader.dataset) == 360 and next(iter(loader))[0].shape == (100, 3, 16, 16)


# ----------------------------------------------------------------------------------------------------------- sharding
def test_eval_sharding_covers_every_sample_once(cifar10):
    full, _ = build_eval_loader(str(cifar10), img_size=32, batch_size=16, num_workers=0, subset=101)
    want = torch.cat([y for _, y in full])
    got = {}
    for rank in range(2):
        loader, _ = build_eval_loader(str(cifar10), img_size=32, batch_size=16, num_workers=0, subset=101, rank=rank,
                                      world_size=2)
        idx = list(loader.sampler)
        ys = torch.cat([y for _, y in loader])
        assert len(ys) == len(idx)
        got.update({i: int(v) for i, v in zip(idx, ys)})
        assert len(idx) == (51 if rank == 0 else 50)
    assert sorted(got) == list(range(101))  # each sample exactly once, no padding
    assert [got[i] for i in range(101)] == want.tolist()
    assert shard_indices(5, rank=1, world_size=3) == [1, 4]
    with pytest.raises(ConfigError):
        shard_indices(5, rank=3, world_size=3)


def test_distributed_needs_an_initialised_group():
    with pytest.raises(ConfigError, match='torchrun'):
        build_loaders(DataConfig(num_workers=0), distributed=True)


def test_train_sampler_shards_across_ranks():
    from amap.data import EpochSampler
    ds = list(range(10))
    parts = []
    for rank in range(2):
        s = EpochSampler(ds, num_replicas=2, rank=rank, seed=5)
        s.set_epoch(2)
        parts.append([i for _, i in s])
    assert sorted(parts[0] + parts[1]) == list(range(10))


# ----------------------------------------------------------------------------------------------------------- errors
def test_missing_folder_mentions_digits(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(DataError, match="digits") as e:
        build_loaders(_cfg(missing))
    assert str(missing) in str(e.value) and '\n' not in str(e.value)
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(DataError, match='not a folder'):
        build_eval_loader(str(tmp_path / 'file.txt'), img_size=32, batch_size=4, num_workers=0)


def test_missing_splits(tmp_path):
    root = _make_folder(tmp_path / 'd', {'val': {'a': 2}})
    with pytest.raises(DataError, match=r'train/'):
        build_loaders(_cfg(root))
    root2 = _make_folder(tmp_path / 'e', {'train': {'a': 2}})
    with pytest.raises(DataError, match=r'val/ or .*test/ not found'):
        build_eval_loader(str(root2), img_size=32, batch_size=4, num_workers=0)
    (tmp_path / 'f' / 'train').mkdir(parents=True)
    with pytest.raises(DataError, match='no class folders'):
        build_loaders(_cfg(tmp_path / 'f'))


def test_val_preferred_over_test_and_class_indices_follow_train(tmp_path):
    root = _make_folder(tmp_path, {'train': {'a': 4, 'b': 4, 'c': 4}, 'val': {'c': 2}, 'test': {'a': 3}})
    loader, n = build_eval_loader(str(root), img_size=16, batch_size=8, num_workers=0)
    assert n == 3 and len(loader.dataset) == 2
    assert torch.cat([y for _, y in loader]).tolist() == [2, 2]  # 'c' keeps its training index
    b = build_loaders(_cfg(root, img_size=16, train_subset=None, val_subset=None, batch_size=4))
    assert b.eval_split == 'val' and b.class_names == ['a', 'b', 'c']
    _make_folder(tmp_path, {'val': {'zebra': 1}})
    with pytest.raises(DataError, match='zebra'):
        build_eval_loader(str(root), img_size=16, batch_size=8, num_workers=0)


def test_empty_class_folder_is_named(tmp_path):
    root = _make_folder(tmp_path, {'train': {'a': 2, 'b': 2}, 'val': {'a': 1}})
    (root / 'train' / 'empty').mkdir()
    with pytest.raises(DataError, match=r'class folder .*empty has no images'):
        build_loaders(_cfg(root))
    (root / 'train' / 'empty' / 'notes.txt').write_text('only text')
    with pytest.raises(DataError, match=r'empty has no images'):
        build_loaders(_cfg(root))


def test_non_image_files_are_skipped_with_one_counted_warning(tmp_path):
    root = _make_folder(tmp_path, {'train': {'a': 3, 'b': 3}})
    (root / 'train' / 'a' / 'readme.txt').write_text('x')
    (root / 'train' / 'b' / 'labels.csv').write_text('x')
    (root / 'train' / 'b' / '.DS_Store').write_bytes(b'\0')  # hidden: ignored silently
    (root / 'train' / 'b' / '.thumbs').mkdir()
    Image.new('RGB', (4, 4)).save(root / 'train' / 'b' / '.thumbs' / 't.png')  # hidden folder: not read
    (root / 'train' / 'a' / 'sub').mkdir()
    Image.new('RGB', (4, 4)).save(root / 'train' / 'a' / 'sub' / 'nested.PNG')  # nested, upper-case extension: read
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        ds = ImageFolderDataset(root / 'train')
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1 and 'skipped 2 non-image file(s)' in msgs[0] and str(root / 'train') in msgs[0]
    assert len(ds) == 7 and ds.num_skipped == 2
    assert [Path(p).name for p, _ in ds.samples][:4] == ['0.png', '1.png', '2.png', 'nested.PNG']


def test_corrupt_image_is_replaced_with_a_named_warning(tmp_path):
    root = _make_folder(tmp_path, {'train': {'a': 3, 'b': 3}, 'val': {'a': 1}}, size=32)
    Image.open(root / 'train' / 'a' / '0.png').save(root / 'train' / 'a' / 'x.jpg', quality=95)
    jpg = (root / 'train' / 'a' / 'x.jpg').read_bytes()
    (root / 'train' / 'a' / 'x.jpg').write_bytes(jpg[: len(jpg) // 2])  # truncated JPEG
    (root / 'train' / 'b' / 'garbage.jpg').write_bytes(b'definitely not a jpeg')
    ds = ImageFolderDataset(root / 'train', transform=build_transform(img_size=32, is_training=False))
    paths = [p for p, _ in ds.samples]
    bad = paths.index(str(root / 'train' / 'a' / 'x.jpg'))
    with pytest.warns(DataWarning, match=r'unreadable image .*x\.jpg'):
        x, y = ds[bad]
    assert x.shape == (3, 32, 32) and ds.num_corrupt == 1
    assert torch.equal(x, ds[(bad + 1) % len(ds)][0])  # replaced by the next sample, deterministically
    with pytest.warns(DataWarning, match='garbage.jpg'):
        ds[paths.index(str(root / 'train' / 'b' / 'garbage.jpg'))]
    # a whole run over the data survives the corrupt files
    b = build_loaders(_cfg(root, train_subset=None, val_subset=None, batch_size=4), seed=0)
    with pytest.warns(DataWarning):
        assert sum(len(y) for _, y in _epoch(b, 0)) == 8


def test_all_corrupt_images_raise(tmp_path):
    d = tmp_path / 'train' / 'a'
    d.mkdir(parents=True)
    for i in range(20):
        (d / f'{i}.jpg').write_bytes(b'broken')
    ds = ImageFolderDataset(tmp_path / 'train')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(DataError, match=r'unreadable images in a row starting at .*0\.jpg'):
            ds[0]


@pytest.mark.parametrize('field,value', [
    ('augment', 'heavy'), ('batch_size', 0), ('label_smoothing', 1.0), ('interpolation', 'cubic'),
    ('randaugment', 'm9'), ('mixup', -1.0),
])
def test_invalid_config(field, value):
    with pytest.raises(ConfigError, match=field):
        build_loaders(DataConfig(num_workers=0, **{field: value}))


def test_randaugment_survives_full_magnitude():
    # timm maps posterize at magnitude 10 to 0 bits, which Pillow >= 11 rejects; a long run must not crash on it
    tf = build_transform(img_size=32, is_training=True, augment='strong', randaugment='rand-m10-n4-inc1-mstd0')
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for i in range(200):
        random.seed(i), np.random.seed(i), torch.manual_seed(i)
        assert tf(img).shape == (3, 32, 32)
