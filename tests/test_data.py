"""Data package: idx parsing, dataset discovery and its errors, robust image folders, transforms, loaders."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import idx_bytes
from PIL import Image

from simoe_vision.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGEFOLDER_LAYOUT,
    CorruptImageError,
    DatasetNotFoundError,
    FashionMNIST,
    IdxFormatError,
    RobustImageFolder,
    build_dataset,
    build_loader,
    collate_skip_bad,
    eval_transforms,
    find_fashion_mnist,
    fixed_subset,
    read_idx,
    split_train_val,
    train_transforms,
)
from simoe_vision.data import fashion_mnist as fm

NAMES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + '.gz')
        with gzip.open(path, 'wb') as f:
            f.write(idx_bytes(array))
    else:
        path.write_bytes(idx_bytes(array))
    return path


def make_fashion(directory: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (('train', n_train), ('test', n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / NAMES[split][0], images, compress)
        write_idx(directory / NAMES[split][1], labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Point the Debian fallback at an empty folder so discovery tests do not depend on this machine."""
    monkeypatch.setattr(fm, 'DEBIAN_DIR', tmp_path / 'no-debian-here')


# ---------------------------------------------------------------- idx files and Fashion-MNIST


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    path = write_idx(tmp_path / 'x-idx3-ubyte', images, compress)
    out = read_idx(path, ndim=3)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)
    out[0, 0, 0] = 7  # a writable copy, not a view of the file bytes
    labels = np.array([9, 0, 3], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / 'y-idx1-ubyte', labels, compress)), labels)


@pytest.mark.parametrize('layout', ['flat', 'torchvision', 'raw-uncompressed'])
def test_find_fashion_mnist_layouts(tmp_path, no_debian, layout):
    root = tmp_path / 'data'
    target = {'flat': root, 'torchvision': root / 'FashionMNIST' / 'raw', 'raw-uncompressed': root}[layout]
    arrays = make_fashion(target, compress=layout != 'raw-uncompressed')
    assert find_fashion_mnist(root) == target
    ds = FashionMNIST(root, split='test')
    images, labels = arrays['test']
    assert ds.images.shape == (5, 28, 28) and ds.images.dtype == np.uint8
    assert ds.targets.dtype == np.int64
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.targets, labels)
    assert len(ds.classes) == 10 and ds.classes[9] == 'Ankle boot'


def test_fashion_mnist_getitem_applies_transform(tmp_path, no_debian):
    arrays = make_fashion(tmp_path)
    ds = FashionMNIST(tmp_path, split='train', transform=lambda im: im.astype(np.int32) + 1)
    image, target = ds[3]
    np.testing.assert_array_equal(image, arrays['train'][0][3].astype(np.int32) + 1)
    assert target == 3 and isinstance(target, int)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        FashionMNIST(tmp_path, split='val')


def test_not_found_message_lists_files_places_and_fixes(tmp_path, no_debian):
    make_fashion(tmp_path / 'partial')
    (tmp_path / 'partial' / 't10k-labels-idx1-ubyte.gz').unlink()  # 3 of 4 files is not a dataset
    with pytest.raises(DatasetNotFoundError) as info:
        find_fashion_mnist(tmp_path / 'partial')
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
        assert name in message
    for place in (tmp_path / 'partial', tmp_path / 'partial' / 'FashionMNIST' / 'raw'):
        assert str(place) in message
    assert str(fm.DEBIAN_DIR) not in message  # an explicit --data-dir is never swapped for another copy
    assert 'apt-get install dataset-fashion-mnist' in message and '--data-dir DIR' in message
    with pytest.raises(DatasetNotFoundError, match='no-debian-here'):
        FashionMNIST(None)


def test_malformed_idx_errors_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    cases = {
        'truncated-data': (good[:-10], 'header says shape \\(4, 28, 28\\) = 3136 bytes of data, file has 3126'),
        'bad-magic': (b'\x00\x00\x0d\x03' + good[4:], 'bad idx magic number 0x00000d03'),
        'short': (good[:3], 'too short for an idx header'),
        'short-header': (good[:10], 'header truncated'),
    }
    for name, (data, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(IdxFormatError, match=pattern) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    path = tmp_path / 'cut.gz'
    path.write_bytes(gzip.compress(good)[:40])  # a gzip stream cut short
    with pytest.raises(IdxFormatError, match='truncated or not gzip data') as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(IdxFormatError, match='has 3 dimensions, expected 1'):
        read_idx(write_idx(tmp_path / 'labels', np.zeros((1, 2, 2), np.uint8)), ndim=1)


def test_fashion_mnist_mismatched_files(tmp_path, no_debian):
    make_fashion(tmp_path)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.zeros(4, np.uint8))  # 5 images, 4 labels
    with pytest.raises(IdxFormatError, match='has 5 images but .*t10k-labels-idx1-ubyte.gz has 4 labels'):
        FashionMNIST(tmp_path, split='test')
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(IdxFormatError, match='label 10 out of range 0..9'):
        FashionMNIST(tmp_path, split='test')


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(),
                    reason=f"Debian's dataset-fashion-mnist is not installed ({fm.DEBIAN_DIR} missing); "
                           'install it with `apt-get install dataset-fashion-mnist`')
def test_debian_package_is_found():
    assert find_fashion_mnist(None) == fm.DEBIAN_DIR
    test = FashionMNIST(None, split='test')
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(test.targets, minlength=10).tolist() == [1000] * 10


# ---------------------------------------------------------------- image folders


def make_folder(root: Path) -> Path:
    """train/ with 3 good images in 2 classes + a corrupt JPEG + a zero-byte JPEG; val/ with 2 good images."""
    rng = np.random.default_rng(0)
    for split, files in (('train', ('a/1.png', 'a/2.jpg', 'b/3.JPEG')), ('val', ('a/4.JPEG', 'b/5.png'))):
        for name in files:
            path = root / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    jpeg = (root / 'train' / 'b' / '3.JPEG').read_bytes()
    (root / 'train' / 'b' / 'corrupt.JPEG').write_bytes(jpeg[:len(jpeg) // 3])  # truncated JPEG
    (root / 'train' / 'a' / 'empty.JPEG').write_bytes(b'')
    return root


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path)
    ds = build_dataset('imagefolder', root, 'train', train_transforms(16, 3, 0.5, 0.5))
    assert len(ds) == 5 and ds.classes == ['a', 'b']
    loader = build_loader(ds, batch_size=5, train=False)
    with pytest.warns(RuntimeWarning, match='skipping unreadable image') as record:
        images, targets, skipped = next(iter(loader))
    assert skipped == 2 and images.shape == (3, 3, 16, 16) and targets.tolist() == [0, 0, 1]
    assert ds.num_bad == 2
    warned = ' '.join(str(w.message) for w in record)
    assert 'empty.JPEG' in warned and 'corrupt.JPEG' in warned


def test_corrupt_image_strict_mode_names_file(tmp_path):
    root = make_folder(tmp_path)
    ds = build_dataset('imagefolder', root, 'train', None, strict=True)
    bad = [i for i, (path, _) in enumerate(ds.samples) if path.endswith('corrupt.JPEG')][0]
    with pytest.raises(CorruptImageError, match='cannot decode image .*corrupt.JPEG: '):  # the hint is the caller's
        ds[bad]


def test_collate_skip_bad_all_bad_batch():
    images, targets, skipped = collate_skip_bad([None, None])
    assert images.shape[0] == 0 and targets.shape == (0,) and targets.dtype == torch.int64 and skipped == 2
    images, targets, skipped = collate_skip_bad([(torch.ones(2), 1), None, (torch.zeros(2), 0)])
    assert images.tolist() == [[1, 1], [0, 0]] and targets.tolist() == [1, 0] and skipped == 1


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset('imagefolder', tmp_path / 'nowhere', 'train')
    assert str(tmp_path / 'nowhere') in str(info.value) and IMAGEFOLDER_LAYOUT in str(info.value)
    (tmp_path / 'train').mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset('imagefolder', tmp_path, 'val')
    assert f'{tmp_path / "val"} is missing' in str(info.value) and IMAGEFOLDER_LAYOUT in str(info.value)
    (tmp_path / 'train' / 'n01440764').mkdir()  # a class folder with no images
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset('imagefolder', tmp_path, 'train')
    assert str(tmp_path / 'train') in str(info.value) and IMAGEFOLDER_LAYOUT in str(info.value)
    with pytest.raises(DatasetNotFoundError, match='does not exist'):
        RobustImageFolder(tmp_path / 'missing')
    with pytest.raises(ValueError, match='needs a data_dir'):
        build_dataset('imagefolder', None, 'train')
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        build_dataset('cifar', tmp_path, 'train')


# ---------------------------------------------------------------- transforms


def test_train_transforms_shapes_channels_dtype():
    gray = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    out = train_transforms(32, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)(gray)
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    rgb_out = train_transforms(32, 3, 0.5, 0.5, color_jitter=0.4)(gray)  # grayscale repeated for an RGB model
    assert rgb_out.shape == (3, 32, 32)
    assert torch.equal(rgb_out[0], rgb_out[1]) and torch.equal(rgb_out[1], rgb_out[2])
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    assert train_transforms(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(big).shape == (3, 32, 32)
    assert train_transforms(32, 1, 0.5, 0.5)(np.asarray(big)).shape == (1, 32, 32)  # RGB -> luma
    assert train_transforms(32, 1, 0.5, 0.5)(gray[:, :, None]).shape == (1, 32, 32)  # HxWx1


def test_train_transforms_reseed_is_deterministic():
    t = train_transforms(32, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    t.reseed(0)
    first = [t(image) for _ in range(4)]
    t.reseed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, [t(image) for _ in range(4)], strict=True))
    assert not all(torch.equal(first[0], x) for x in first[1:])  # the crop/flip does vary


def test_train_transforms_crop_padding():
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    config = {'input_size': (1, 28, 28), 'mean': FASHION_MNIST_MEAN, 'std': FASHION_MNIST_STD, 'crop_pct': 1.0}
    plain = eval_transforms(config)(image)
    no_crop = train_transforms(28, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, hflip=0.0, crop_padding=0)
    assert all(torch.equal(no_crop(image), plain) for _ in range(4))  # 0: no crop, only normalisation
    shifted = train_transforms(28, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, hflip=0.0, crop_padding=2)
    shifted.reseed(0)
    outs = [shifted(image) for _ in range(8)]
    assert not all(torch.equal(o, plain) for o in outs)
    for out in outs:  # each is the image shifted by at most 2 px: some 24x24 window of it is unchanged
        assert any(torch.equal(out[0, 2 + dy:26 + dy, 2 + dx:26 + dx], plain[0, 2:26, 2:26])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_eval_transforms_pad_and_normalise():
    # Fashion-MNIST: a white 28x28 image is centre-padded with 2 black pixels to 32x32, then normalised:
    # white: (1 - 0.2860) / 0.3530 = 0.714 / 0.353 = 2.022663; black border: -0.2860 / 0.3530 = -0.810198.
    config = {'input_size': (1, 32, 32), 'mean': FASHION_MNIST_MEAN, 'std': FASHION_MNIST_STD,
              'interpolation': 'bicubic', 'crop_pct': 1.0}
    out = eval_transforms(config)(np.full((28, 28), 255, np.uint8))
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    expected = torch.full((32, 32), -0.2860 / 0.3530)
    expected[2:30, 2:30] = (1 - 0.2860) / 0.3530
    torch.testing.assert_close(out[0], expected)
    assert eval_transforms({**config, 'input_size': (3, 32, 32)})(Image.new('L', (28, 28))).shape == (3, 32, 32)


def test_eval_transforms_crop_pct():
    # 256x256, a 16-px white frame around black. crop_pct 0.875 at 224: resize to floor(224 / 0.875) = 256
    # (no change), center crop 224 cuts 16 px per side = the whole frame, so every value is (0 - 0.5) / 0.5 = -1.
    image = np.full((256, 256, 3), 255, np.uint8)
    image[16:240, 16:240] = 0
    config = {'input_size': (3, 224, 224), 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
              'interpolation': 'bilinear', 'crop_pct': 0.875, 'crop_mode': 'center'}
    out = eval_transforms(config)(image)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, torch.full((3, 224, 224), -1.0))
    assert eval_transforms({**config, 'crop_pct': 1.0})(image).max() > 0  # resized, the frame stays in view
    assert eval_transforms(config)(np.zeros((300, 400, 3), np.uint8)).shape == (3, 224, 224)
    # A 28-px image for a 224-px model is resized, not padded (padding is for <= 64-px inputs): no black border,
    # every value of a white image is (1 - 0.5) / 0.5 = 1.
    torch.testing.assert_close(eval_transforms(config)(np.full((28, 28), 255, np.uint8)), torch.ones(3, 224, 224))
    assert train_transforms(224, 3, 0.5, 0.5)(np.full((28, 28), 255, np.uint8)).min() == 1.0


def test_transform_errors():
    with pytest.raises(ValueError, match='needs RGB output'):
        train_transforms(32, 1, 0.5, 0.5, color_jitter=0.4)
    with pytest.raises(ValueError, match='mean has 2 values but in_chans=3'):
        train_transforms(32, 3, (0.5, 0.5), 0.5)
    with pytest.raises(ValueError, match='expected a uint8 image'):
        train_transforms(32, 1, 0.5, 0.5)(np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError, match='resolve_data_config'):
        eval_transforms({'input_size': (1, 32, 32)})
    with pytest.raises(ValueError, match="unknown crop_mode 'zoom'"):
        eval_transforms({'input_size': (1, 32, 32), 'mean': 0.5, 'std': 0.5, 'crop_mode': 'zoom'})


# ---------------------------------------------------------------- subsets, splits, loaders


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i


def test_fixed_subset_is_seeded_and_fixed():
    ds = Items(100)
    a, b, c = fixed_subset(ds, 10, seed=0), fixed_subset(ds, 10, seed=0), fixed_subset(ds, 10, seed=1)
    assert a.indices == b.indices and a.indices != c.indices
    assert len(a) == 10 and a.indices == sorted(set(a.indices))
    assert fixed_subset(ds, 1000).indices == list(range(100))
    with pytest.raises(ValueError, match='must be positive'):
        fixed_subset(ds, 0)


def test_split_train_val_disjoint_and_deterministic():
    train, val = split_train_val(50, 10, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(50))
    again_train, again_val = split_train_val(50, 10, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not np.array_equal(val, split_train_val(50, 10, seed=4)[1])
    assert len(split_train_val(50, 0.2)[1]) == 10  # round(0.2 * 50) = 10
    with pytest.raises(ValueError, match='non-empty'):
        split_train_val(50, 50)


def test_build_dataset_holdout(tmp_path, no_debian):
    make_fashion(tmp_path)
    train = build_dataset('fashion_mnist', tmp_path, 'train', val_size=4, split_seed=0)
    val = build_dataset('fashion_mnist', tmp_path, 'val', val_size=4, split_seed=0)
    assert len(train) == 8 and len(val) == 4 and not set(train.indices) & set(val.indices)
    assert len(build_dataset('fashion_mnist', tmp_path, 'train')) == 12
    assert len(build_dataset('fashion_mnist', tmp_path, 'val')) == 5  # no holdout: the test split
    assert len(build_dataset('fashion_mnist', tmp_path, 'test', val_size=4)) == 5
    tt = train_transforms(32, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    loader = build_loader(build_dataset('fashion_mnist', tmp_path, 'train', tt, val_size=4), 3, train=True)
    shapes = [(images.shape, targets.dtype, skipped) for images, targets, skipped in loader]
    assert shapes == [((3, 1, 32, 32), torch.int64, 0)] * 2  # 8 items, batch 3, last partial batch dropped
    root = make_folder(tmp_path / 'folders')
    assert len(build_dataset('imagefolder', root, 'test')) == 2  # <root>/val


@pytest.mark.parametrize('train', [True, False])
def test_distributed_loader_covers_disjoint_halves(train):
    ds = Items(10)
    seen = []
    for rank in (0, 1):
        loader = build_loader(ds, batch_size=2, train=train, distributed=True, seed=0, drop_last=False,
                              num_replicas=2, rank=rank)
        loader.sampler.set_epoch(1)
        targets = [t for _, batch, skipped in loader for t in batch.tolist()]
        assert len(targets) == 5
        seen.append(set(targets))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))


def test_loader_shuffle_is_seeded():
    ds = Items(20)

    def order(seed):
        return [t for _, batch, _ in build_loader(ds, 4, train=True, seed=seed) for t in batch.tolist()]

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(0)) == list(range(20))
    assert [t for _, b, _ in build_loader(ds, 3, train=False) for t in b.tolist()] == list(range(20))


def test_workers_draw_different_augmentations():
    # Without seed_worker's reseed both forked workers would copy one albumentations state and item 0 (worker 0)
    # would equal item 1 (worker 1). Seeded, so the outcome is fixed.
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)

    class Same(torch.utils.data.Dataset):
        transform = train_transforms(32, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.transform(image), i

    batches = list(build_loader(Same(), 1, train=False, workers=2, seed=0))
    assert not torch.equal(batches[0][0], batches[1][0])
