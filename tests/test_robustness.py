"""Robustness evaluation: metrics against hand-worked values, dataset layouts on tiny generated folders,
generated-corruption determinism and caching, and attacks on a tiny trained model."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from simoe_vision.robustness import (
    ALEXNET_ERRORS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    CorruptedArrayDataset,
    LogitAccumulator,
    PixelSpaceModel,
    adversarial_accuracy,
    build_corruptions,
    corrupt_image,
    corrupt_images,
    corruption_error,
    evaluate_corruptions,
    evaluate_loader,
    evaluate_logits,
    imagenet_ar_classes,
    imagenet_ar_dataset,
    imagenet_c_dataset,
    imagenet_c_transform,
    imagenet_synsets,
    mean_corruption_error,
    prepare_images,
    validate_imagenet_c,
)
from simoe_vision.robustness import generated as generated_module

# ---------------------------------------------------------------------------------------------------------------------
# clean metrics


def _logits_from_probs(probs):
    return torch.tensor(probs).log()  # softmax(log p) = p exactly when rows sum to 1


def test_evaluate_logits_hand_worked():
    # probs                 target  pred  conf  correct  -log p[target]
    # [.70, .20, .10]       0       0     .70   yes      -ln .70 = 0.356675
    # [.30, .65, .05]       2       1     .65   no       -ln .05 = 2.995732
    # [.20, .35, .45]       1       2     .45   no       -ln .35 = 1.049822
    # top-1 = 1/3; top-5 clips to top-3 = all; NLL = 4.402229 / 3 = 1.467410.
    # ECE (15 bins of width 1/15): the confidences fall in 3 different bins
    #   -> (|.70 - 1| + |.65 - 0| + |.45 - 0|) / 3 = 1.4 / 3.
    logits = _logits_from_probs([[.7, .2, .1], [.3, .65, .05], [.2, .35, .45]])
    out = evaluate_logits(logits, torch.tensor([0, 2, 1]))
    assert out['top1'] == pytest.approx(100 / 3)
    assert out['top5'] == pytest.approx(100.0)
    assert out['nll'] == pytest.approx(1.467410, abs=1e-5)
    assert out['ece'] == pytest.approx(1.4 / 3, abs=1e-5)
    assert out['num_samples'] == 3


def test_ece_bins_not_per_sample():
    # confidences .70 (correct) and .72 (wrong) share the bin (0.667, 0.733]: bin accuracy .5, mean confidence .71,
    # ECE = 2/2 * |.71 - .5| = .21 (a per-sample average would give (.30 + .72) / 2 = .51).
    logits = _logits_from_probs([[.7, .2, .1], [.72, .18, .1]])
    assert evaluate_logits(logits, torch.tensor([0, 1]))['ece'] == pytest.approx(0.21, abs=1e-5)


def test_top5_counts_rank_five_not_six():
    # 7 classes, logits 6..0 -> class 4 is ranked 3rd (inside top 5) for target 2, class 5 ranks 6th (outside).
    logits = torch.arange(7.0).flip(0).repeat(2, 1)
    out = evaluate_logits(logits, torch.tensor([4, 5]))
    assert out['top1'] == 0.0 and out['top5'] == 50.0


def test_accumulator_batches_equal_one_shot():
    logits, targets = torch.randn(10, 4), torch.randint(0, 4, (10,))
    acc = LogitAccumulator()
    acc.update(logits[:3], targets[:3])
    acc.update(logits[3:], targets[3:])
    whole = evaluate_logits(logits, targets)
    for key, value in acc.compute().items():
        assert value == pytest.approx(whole[key], abs=1e-6)


def test_accumulator_errors():
    with pytest.raises(ValueError, match='no samples'):
        LogitAccumulator().compute()
    with pytest.raises(ValueError, match=r'targets must lie in \[0, 3\).*class_indices'):
        evaluate_logits(torch.zeros(1, 3), torch.tensor([5]))
    acc = LogitAccumulator()
    acc.update(torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match='4 classes, earlier batches had 3'):
        acc.update(torch.zeros(1, 4), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-C scores


def test_corruption_lists_match_the_package():
    from imagecorruptions import get_corruption_names
    assert list(CORRUPTIONS) == get_corruption_names('common')
    assert list(EXTRA_CORRUPTIONS) == get_corruption_names('validation')
    assert set(ALEXNET_ERRORS) == set(CORRUPTIONS)
    # spot-check the by-name pairing (a positional pairing bug would move these)
    assert ALEXNET_ERRORS['brightness'] == 0.564592 and ALEXNET_ERRORS['impulse_noise'] == 0.922640
    assert ALEXNET_ERRORS['jpeg_compression'] == 0.606500 and ALEXNET_ERRORS['glass_blur'] == 0.826268


def test_mce_is_100_at_alexnet_errors():
    errors = {c: {s: ALEXNET_ERRORS[c] for s in SEVERITIES} for c in CORRUPTIONS}
    out = mean_corruption_error(errors)
    assert out['mce'] == pytest.approx(100.0)
    assert all(ce == pytest.approx(1.0) for ce in out['ce'].values())


def test_relative_ce_is_100_against_itself():
    gen = torch.Generator().manual_seed(0)
    errors = {c: {s: float(torch.rand(1, generator=gen)) for s in SEVERITIES} for c in CORRUPTIONS}
    assert mean_corruption_error(errors, reference=errors)['mce'] == pytest.approx(100.0)


def test_ce_hand_worked():
    # fog: errors .1 .2 .3 .4 .5 -> mean .3; reference table all .6 -> CE .5
    # snow: errors all .6 -> mean .6; reference all .8 -> CE .75
    # mCE = 100 * (.5 + .75) / 2 = 62.5; mean corruption accuracy = 100 * (1 - (.3 + .6) / 2) = 55.
    errors = {'fog': dict(zip(SEVERITIES, [.1, .2, .3, .4, .5], strict=True)), 'snow': {s: .6 for s in SEVERITIES}}
    reference = {'fog': {s: .6 for s in SEVERITIES}, 'snow': {s: .8 for s in SEVERITIES}}
    out = mean_corruption_error(errors, reference=reference, corruptions=('fog', 'snow'))
    assert out['ce'] == pytest.approx({'fog': .5, 'snow': .75})
    assert out['mce'] == pytest.approx(62.5)
    assert out['mean_error'] == pytest.approx({'fog': .3, 'snow': .6})
    assert out['mean_corruption_accuracy'] == pytest.approx(55.0)
    # against AlexNet: brightness error .282296 at every severity is half of AlexNet's .564592 -> CE .5, mCE 50.
    assert corruption_error([.282296] * 5, ALEXNET_ERRORS['brightness']) == pytest.approx(0.5)
    bright = mean_corruption_error({'brightness': {s: .282296 for s in SEVERITIES}}, corruptions=('brightness',))
    assert bright['mce'] == pytest.approx(50.0)


def test_unnormalised_ce_is_mean_error():
    # no reference: CE_c = mean error -> fog .3, snow .6; mCE = 100 * (.3 + .6) / 2 = 45.
    errors = {'fog': dict(zip(SEVERITIES, [.1, .2, .3, .4, .5], strict=True)), 'snow': {s: .6 for s in SEVERITIES}}
    out = mean_corruption_error(errors, reference=None, corruptions=('fog', 'snow'))
    assert out['ce'] == pytest.approx({'fog': .3, 'snow': .6}) and out['mce'] == pytest.approx(45.0)


def test_mce_errors_are_actionable():
    full = {c: {s: .5 for s in SEVERITIES} for c in CORRUPTIONS}
    partial = dict(full)
    partial['fog'] = {1: .5, 2: .5}
    del partial['snow']
    with pytest.raises(ValueError, match=r'(?s)snow: missing.*fog: severities \[3, 4, 5\] missing'):
        mean_corruption_error(partial)
    with pytest.raises(ValueError, match='not percentages'):
        mean_corruption_error({**full, 'fog': {s: 50.0 for s in SEVERITIES}})
    with pytest.raises(ValueError, match='no errors for speckle_noise.*reference results table'):
        mean_corruption_error({'speckle_noise': {s: .5 for s in SEVERITIES}}, corruptions=('speckle_noise',))


# ---------------------------------------------------------------------------------------------------------------------
# folder fixtures with real wnids

def _encode_index(index: int, size: int = 8) -> Image.Image:
    """An RGB image carrying a 1000-way class index in pixel (0, 0): red = index // 256, green = index % 256."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = divmod(index, 256)
    return Image.fromarray(pixels)


def _write_class_folders(root, wnids, size: int = 8) -> None:
    in1k = {w: i for i, w in enumerate(imagenet_synsets())}
    for wnid in wnids:
        os.makedirs(os.path.join(root, wnid), exist_ok=True)
        _encode_index(in1k[wnid], size).save(os.path.join(root, wnid, f'{wnid}_0.png'))


class _DecodeIndexModel(nn.Module):
    """Fake classifier: one-hot 1000-way logits at the index encoded in the image (shifted by ``offset``)."""

    def __init__(self, offset: int = 0):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        index = (x[:, 0, 0, 0] * 255).round().long() * 256 + (x[:, 1, 0, 0] * 255).round().long()
        return nn.functional.one_hot((index + self.offset) % 1000, 1000).float()


@pytest.mark.parametrize('variant', ['a', 'r'])
def test_imagenet_ar_logit_slice_lines_up_with_labels(tmp_path, variant):
    synsets, indices = imagenet_ar_classes(variant)
    assert len(synsets) == len(indices) == 200
    _write_class_folders(tmp_path, synsets)
    dataset, class_indices = imagenet_ar_dataset(str(tmp_path), variant, transform=transforms.ToTensor())
    assert len(dataset) == 200
    loader = DataLoader(dataset, batch_size=64)
    assert evaluate_loader(_DecodeIndexModel(), loader, class_indices=class_indices)['top1'] == 100.0
    assert evaluate_loader(_DecodeIndexModel(offset=1), loader, class_indices=class_indices)['top1'] < 100.0


def test_imagenet_ar_folder_mismatch_lists_names(tmp_path):
    synsets, _ = imagenet_ar_classes('a')
    _write_class_folders(tmp_path, synsets[2:])
    os.makedirs(tmp_path / 'n99999999')
    with pytest.raises(ValueError) as info:
        imagenet_ar_dataset(str(tmp_path), 'a')
    message = str(info.value)
    assert 'unexpected (1): n99999999' in message
    assert f'missing (2): {synsets[0]}, {synsets[1]}' in message
    with pytest.raises(ValueError, match="unknown ImageNet variant 'x'"):
        imagenet_ar_classes('x')


def test_imagenet_c_layout_lists_every_problem(tmp_path):
    wnids = imagenet_synsets()[:2]
    for c in CORRUPTIONS:
        for s in SEVERITIES:
            _write_class_folders(tmp_path / c / str(s), wnids)
    assert validate_imagenet_c(str(tmp_path)) == list(wnids)
    import shutil
    shutil.rmtree(tmp_path / 'fog')
    shutil.rmtree(tmp_path / 'snow' / '3')
    shutil.rmtree(tmp_path / 'pixelate' / '2' / wnids[0])
    shutil.rmtree(tmp_path / 'pixelate' / '2' / wnids[1])
    shutil.rmtree(tmp_path / 'contrast' / '5' / wnids[1])
    with pytest.raises(FileNotFoundError) as info:
        validate_imagenet_c(str(tmp_path))
    message = str(info.value)
    assert '4 problems' in message
    for expected in ['fog/ (the whole corruption)', 'snow/3/', 'pixelate/2/ has no wnid folders',
                     f"contrast/5/ class folders differ from gaussian_noise/1/: missing ['{wnids[1]}']"]:
        assert expected in message


def test_imagenet_c_dataset_targets_are_1000_way(tmp_path):
    in1k = imagenet_synsets()
    wnids = (in1k[3], in1k[997])  # a subset on disk must keep the 1000-way indices, not renumber 0, 1
    _write_class_folders(tmp_path / 'fog' / '2', wnids)
    dataset = imagenet_c_dataset(str(tmp_path), 'fog', 2, transform=transforms.ToTensor())
    assert sorted(t for _, t in dataset.samples) == [3, 997]
    loader = DataLoader(dataset, batch_size=2)
    assert evaluate_loader(_DecodeIndexModel(), loader)['top1'] == 100.0
    with pytest.raises(FileNotFoundError, match='validate_imagenet_c'):
        imagenet_c_dataset(str(tmp_path), 'fog', 3)
    with pytest.raises(ValueError, match='severity must be one of'):
        imagenet_c_dataset(str(tmp_path), 'fog', 6)


def test_evaluate_corruptions_end_to_end(tmp_path):
    # two images per cell; in fog/5 the image of class A carries class B's index, so the decoding model errs on it:
    # fog errors [0, 0, 0, 0, .5] -> mean .1; snow all 0 -> unnormalised mCE = 100 * (.1 + 0) / 2 = 5.
    in1k = imagenet_synsets()
    wnids = (in1k[10], in1k[20])
    for c in ('fog', 'snow'):
        for s in SEVERITIES:
            _write_class_folders(tmp_path / c / str(s), wnids)
    _encode_index(20).save(tmp_path / 'fog' / '5' / wnids[0] / f'{wnids[0]}_0.png')
    out = evaluate_corruptions(
        _DecodeIndexModel(), lambda c, s: imagenet_c_dataset(str(tmp_path), c, s, transforms.ToTensor()),
        corruptions=('fog', 'snow'), reference=None, progress=False)
    assert out['errors']['fog'] == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.5}
    assert out['mce'] == pytest.approx(5.0)
    assert out['cells']['fog'][5]['top1'] == 50.0 and out['cells']['snow'][1]['num_samples'] == 2


def test_imagenet_c_transform_crops_without_resizing():
    pixels = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    tf = imagenet_c_transform({'input_size': (3, 8, 8), 'mean': (0, 0, 0), 'std': (1, 1, 1)})
    out = tf(Image.fromarray(pixels))
    # center crop 8 of 12 keeps rows/cols 2..9 with the original values (a resize would interpolate them)
    assert torch.equal((out * 255).round().byte(), torch.from_numpy(pixels[2:10, 2:10]).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------------------------------
# generated corruptions

def _gray_images(n: int = 3, size: int = 16) -> np.ndarray:
    gen = np.random.default_rng(1)
    return gen.integers(0, 256, (n, size, size), dtype=np.uint8)


def test_contrast_on_grayscale_hand_worked():
    # half 0, half 255 -> mean .5; severity 1 keeps 0.4 of the contrast: (0 - .5) * .4 + .5 = .3 -> 76.5 -> uint8 76,
    # (1 - .5) * .4 + .5 = .7 -> 178.5 -> 178; luma of equal channels is exact, so the gray image keeps those values.
    image = np.zeros((16, 16), np.uint8)
    image[:, 8:] = 255
    out = corrupt_image(image, 'contrast', 1, seed=0)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert set(out[:, :8].ravel()) == {76} and set(out[:, 8:].ravel()) == {178}


def test_every_corruption_and_severity_on_28px_grayscale():
    image = np.zeros((28, 28), np.uint8)
    image[5:21, 7:19] = 200  # a garment-like blob on a black background, as in Fashion-MNIST; odd edges so that
    image[9:17, 11:15] = 90  # pixelate's box down/up-sampling cannot land on them exactly
    for c in CORRUPTIONS:
        for s in SEVERITIES:
            out = corrupt_images(image[None], c, s, seed=0)
            assert out.shape == (1, 28, 28) and out.dtype == np.uint8, (c, s)
            assert not np.array_equal(out[0], image), f'{c} severity {s} left the image unchanged'


def test_generated_is_deterministic_across_builds_and_orders(tmp_path):
    images = _gray_images()
    cells = (['gaussian_noise', 'glass_blur', 'impulse_noise'], [1, 4])
    first = build_corruptions(images, str(tmp_path / 'a'), *cells, seed=3, progress=False)
    np.random.seed(123)
    np.random.rand(7)  # disturb the global RNG: the build must not depend on it
    state = np.random.get_state()
    second = build_corruptions(images, str(tmp_path / 'b'), cells[0][::-1], cells[1][::-1], seed=3, chunk_size=1,
                               progress=False)
    assert np.array_equal(np.random.get_state()[1], state[1])  # and must restore it
    for c in cells[0]:
        for s in cells[1]:
            with open(first.path(c, s), 'rb') as fa, open(second.path(c, s), 'rb') as fb:
                assert fa.read() == fb.read(), (c, s)
    assert not np.array_equal(first.load('gaussian_noise', 1), first.load('gaussian_noise', 4))
    other_seed = corrupt_images(images, 'gaussian_noise', 1, seed=4)
    assert not np.array_equal(other_seed, first.load('gaussian_noise', 1))
    # image i of a chunk starting at 1 is image 1 + i of the full array
    assert np.array_equal(corrupt_images(images[1:], 'glass_blur', 4, seed=3, start_index=1),
                          first.load('glass_blur', 4)[1:])


def test_generated_cache_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    calls = []
    real = generated_module.corrupt_image

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(generated_module, 'corrupt_image', counting)
    images = _gray_images(n=2)
    cells = (['shot_noise', 'pixelate'], [2, 5])
    root = str(tmp_path / 'cache')
    cache = build_corruptions(images, root, *cells, progress=False)
    assert len(calls) == 8 and len(cache.built) == 4 and not cache.reused
    mtime = os.path.getmtime(cache.path('shot_noise', 2))

    calls.clear()
    again = build_corruptions(images, root, *cells, progress=False)
    assert calls == [] and again.built == [] and len(again.reused) == 4
    assert os.path.getmtime(again.path('shot_noise', 2)) == mtime

    # a truncated cell file is rebuilt, the rest reused
    with open(cache.path('pixelate', 5), 'r+b') as f:
        f.truncate(100)
    partial = build_corruptions(images, root, *cells, progress=False)
    assert partial.built == ['pixelate/5'] and len(calls) == 2
    assert np.array_equal(partial.load('pixelate', 5), corrupt_images(images, 'pixelate', 5))

    # new source images (or a different seed, package version...) invalidate everything
    calls.clear()
    changed = build_corruptions(images[::-1].copy(), root, *cells, progress=False)
    assert len(changed.built) == 4 and len(calls) == 8

    # an unreadable manifest is not trusted
    with open(os.path.join(root, 'manifest.json'), 'w') as f:
        f.write('{not json')
    assert len(build_corruptions(images, root, *cells, progress=False).built) == 4


def test_generated_workers_match_in_process(tmp_path):
    images = _gray_images(n=5)
    pooled = build_corruptions(images, str(tmp_path), ['gaussian_noise'], [2], chunk_size=2, num_workers=2,
                               progress=False)
    assert np.array_equal(pooled.load('gaussian_noise', 2), corrupt_images(images, 'gaussian_noise', 2))


def test_prepare_images_then_corrupt_rgb(tmp_path):
    in1k = imagenet_synsets()
    _write_class_folders(tmp_path / 'val', in1k[:2], size=20)
    from torchvision.datasets import ImageFolder
    images, targets = prepare_images(ImageFolder(str(tmp_path / 'val')), size=16)
    # resize 20 -> round(16 * 256 / 224) = 18, then center-crop 16
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and targets.tolist() == [0, 1]
    out = corrupt_images(images, 'gaussian_noise', 3)
    assert out.shape == images.shape and not np.array_equal(out, images)


def test_generated_input_errors(tmp_path):
    with pytest.raises(ValueError, match='at least 16x16'):
        corrupt_images(np.zeros((1, 8, 8), np.uint8), 'fog', 1)
    with pytest.raises(ValueError, match='uint8'):
        corrupt_images(np.zeros((1, 16, 16), np.float32), 'fog', 1)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        build_corruptions(_gray_images(), str(tmp_path), ['rain'], progress=False)
    cache = build_corruptions(_gray_images(), str(tmp_path), ['contrast'], [1], progress=False)
    with pytest.raises(KeyError, match='fog/1 was not built or verified'):
        cache.load('fog', 1)


def test_corrupted_array_dataset(tmp_path):
    images = _gray_images(n=2)
    cache = build_corruptions(images, str(tmp_path), ['contrast'], [3], progress=False)
    dataset = cache.dataset('contrast', 3, targets=[4, 7])
    image, target = dataset[1]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and target == 7
    assert torch.equal((image[0] * 255).round().byte(), torch.from_numpy(np.array(cache.load('contrast', 3)[1])))
    rgb = CorruptedArrayDataset(np.zeros((1, 16, 16, 3), np.uint8), [0], transform=transforms.ToTensor())
    assert rgb[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match='2 images but 1 targets'):
        CorruptedArrayDataset(images, [0])


# ---------------------------------------------------------------------------------------------------------------------
# adversarial

MEAN, STD = (0.5,), (0.25,)


def _tiny_trained_model():
    """A 1-channel 8x8 two-class problem (dark vs bright images) and a linear model trained for a few steps."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    pixels = (0.35 + 0.3 * labels.float()).view(-1, 1, 1, 1) + 0.1 * torch.randn(64, 1, 8, 8, generator=gen)
    pixels = pixels.clamp(0, 1)
    inputs = (pixels - MEAN[0]) / STD[0]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        opt.step()
    return model, DataLoader(TensorDataset(inputs, labels), batch_size=16)


def test_attacks_lower_accuracy_and_are_seeded():
    model, loader = _tiny_trained_model()
    model.train()
    clean = evaluate_loader(model, loader)['top1']
    assert clean > 90.0
    fgsm0 = adversarial_accuracy(model, loader, MEAN, STD, attack='fgsm', eps=0)
    assert fgsm0['adv_top1'] == fgsm0['clean_top1'] == clean
    for attack in ('fgsm', 'pgd'):
        out = adversarial_accuracy(model, loader, MEAN, STD, attack=attack, eps=32, steps=5)
        # eps 32/255 moves every pixel by .125 toward the other class: the .3 gap between class means closes
        assert out['adv_top1'] < out['clean_top1'] == clean, attack
    a = adversarial_accuracy(model, loader, MEAN, STD, attack='pgd', eps=8, steps=3, seed=1)
    b = adversarial_accuracy(model, loader, MEAN, STD, attack='pgd', eps=8, steps=3, seed=1)
    assert a == b
    assert model.training  # mode restored
    assert adversarial_accuracy(model, loader, MEAN, STD, eps=8, steps=2, max_samples=5)['num_samples'] == 5


def test_pixel_space_model_round_trip_and_channel_errors():
    wrapped = PixelSpaceModel(nn.Identity(), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    pixels = torch.rand(2, 3, 4, 4)
    # normalise then undo: (x - m) / s * s + m = x
    assert torch.allclose(wrapped.to_pixels(wrapped.normalize(pixels)), pixels, atol=1e-6)
    with pytest.raises(ValueError, match='3 channels'):
        wrapped.to_pixels(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match='std must be'):
        PixelSpaceModel(nn.Identity(), mean=0.5, std=0.0)
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        adversarial_accuracy(nn.Identity(), [], MEAN, STD, attack='cw')
    assert math.isclose(float(PixelSpaceModel(nn.Identity(), 0.5, 0.25)(torch.ones(1, 1, 1, 1))), 2.0)


class _MeanThreshold(torch.nn.Module):
    """Ten classes (AutoAttack's DLR loss needs >= 4): class 0 when the image mean is above 0.5 (logit 20 * mean
    against 10 for class 1 and less for the others)."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        rest = 10.0 - 0.1 * torch.arange(9, dtype=x.dtype)
        return torch.cat([20 * m[:, None], rest.expand(len(m), 9)], dim=-1)


def test_autoattack_flips_exactly_the_images_within_eps():
    """Means 0.55 and 0.9, both class 0; eps 16/255 = 0.063 lowers a mean by at most that: only the first flips."""
    images = torch.stack([torch.full((1, 2, 2), 0.55), torch.full((1, 2, 2), 0.9)])
    loader = [(images, torch.zeros(2, dtype=torch.long))]
    result = adversarial_accuracy(_MeanThreshold(), loader, 0.0, 1.0, attack='autoattack', eps=16.0)
    assert result['clean_top1'] == 100.0 and result['adv_top1'] == 50.0 and result['attack'] == 'autoattack'
    capped = adversarial_accuracy(_MeanThreshold(), loader, 0.0, 1.0, attack='autoattack', eps=16.0, max_samples=1)
    assert capped['num_samples'] == 1 and capped['adv_top1'] == 0.0


def test_autoattack_runs_only_at_its_own_radii():
    """run_adversarial: FGSM at every eps, AutoAttack only at ``autoattack_eps`` (eps 16 flips the 0.55 image)."""
    from simoe_vision.evaluation.runner import EvalSettings, run_adversarial
    images = torch.stack([torch.full((1, 2, 2), 0.55), torch.full((1, 2, 2), 0.9)])
    dataset = TensorDataset(images, torch.zeros(2, dtype=torch.long))
    settings = EvalSettings(device=torch.device('cpu'), progress=False)
    results = run_adversarial(_MeanThreshold(), dataset, {'mean': 0.0, 'std': 1.0}, ['fgsm', 'autoattack'],
                              [1.0, 16.0], 10, None, settings, autoattack_eps=[16.0])
    assert [(r['attack'], r['eps']) for r in results] == [('fgsm', 1.0), ('fgsm', 16.0), ('autoattack', 16.0)]
    assert results[-1]['adv_top1'] == 50.0 and results[-1]['steps'] is None
