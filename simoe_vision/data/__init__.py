"""Data: Fashion-MNIST (embedded default) and ImageNet-style folders, albumentations transforms, loaders."""
from .fashion_mnist import (
    DEBIAN_DIR,
    FASHION_MNIST_CLASSES,
    DatasetNotFoundError,
    FashionMNIST,
    IdxFormatError,
    find_fashion_mnist,
    read_idx,
)
from .folders import (
    IMAGEFOLDER_LAYOUT,
    ClassFoldersMismatchError,
    CorruptImageError,
    RobustImageFolder,
    check_split_classes,
    class_folders,
    collate_skip_bad,
    imagefolder_split,
)
from .loaders import DATASETS, build_dataset, build_loader, fixed_subset, seed_worker, split_train_val
from .transforms import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    SMALL_INPUT_MAX,
    ImageTransform,
    eval_transforms,
    to_uint8_array,
    train_transforms,
)

__all__ = [
    'ClassFoldersMismatchError', 'CorruptImageError', 'DATASETS', 'DEBIAN_DIR', 'DatasetNotFoundError',
    'FASHION_MNIST_CLASSES', 'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD', 'FashionMNIST', 'IMAGEFOLDER_LAYOUT',
    'IdxFormatError', 'ImageTransform', 'RobustImageFolder', 'SMALL_INPUT_MAX', 'build_dataset', 'build_loader',
    'check_split_classes', 'class_folders', 'collate_skip_bad', 'eval_transforms', 'find_fashion_mnist',
    'fixed_subset', 'imagefolder_split', 'read_idx', 'seed_worker', 'split_train_val', 'to_uint8_array',
    'train_transforms',
]
