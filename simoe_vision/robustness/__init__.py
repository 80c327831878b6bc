"""Robustness evaluation: clean metrics, ImageNet-C (mCE), generated corruptions, ImageNet-A/R, L-inf attacks."""
from .adversarial import ATTACKS, PixelSpaceModel, adversarial_accuracy, make_attack
from .clean import LogitAccumulator, evaluate_loader, evaluate_logits, predict
from .generated import (
    MIN_IMAGE_SIZE,
    CorruptedArrayDataset,
    CorruptionCache,
    build_corruptions,
    corrupt_image,
    corrupt_images,
    image_seed,
    prepare_images,
)
from .imagenet_ar import (
    IMAGENET_AR_VARIANTS,
    IMAGENET_CLASSES,
    WnidImageFolder,
    check_class_folders,
    imagenet_ar_classes,
    imagenet_ar_dataset,
    imagenet_model_problem,
    imagenet_synsets,
    read_timm_info,
    slice_logits,
)
from .imagenet_c import (
    ALEXNET_ERRORS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    corruption_error,
    evaluate_corruptions,
    imagenet_c_dataset,
    imagenet_c_transform,
    mean_corruption_error,
    validate_imagenet_c,
)

__all__ = [
    'ALEXNET_ERRORS', 'ATTACKS', 'CORRUPTIONS', 'CorruptedArrayDataset', 'CorruptionCache', 'EXTRA_CORRUPTIONS',
    'IMAGENET_AR_VARIANTS', 'IMAGENET_CLASSES', 'LogitAccumulator', 'MIN_IMAGE_SIZE', 'PixelSpaceModel', 'SEVERITIES',
    'WnidImageFolder', 'adversarial_accuracy', 'build_corruptions', 'check_class_folders', 'corrupt_image',
    'corrupt_images', 'corruption_error', 'evaluate_corruptions', 'evaluate_loader', 'evaluate_logits', 'image_seed',
    'imagenet_ar_classes', 'imagenet_ar_dataset', 'imagenet_c_dataset', 'imagenet_c_transform',
    'imagenet_model_problem', 'imagenet_synsets', 'make_attack', 'mean_corruption_error', 'predict', 'prepare_images',
    'read_timm_info', 'slice_logits', 'validate_imagenet_c',
]
