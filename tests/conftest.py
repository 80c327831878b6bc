import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # Tiny test models run faster on one thread; two threads fight over the 2 cores (and with each other).
    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def fashion_dir(tmp_path_factory):
    """A fake Fashion-MNIST: 80 training and 16 test images of 28x28 with labels 0..9."""
    import numpy as np
    from fixtures import idx_gz

    root = tmp_path_factory.mktemp('fmnist')
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 80), ('t10k', 16)):
        idx_gz(root / f'{prefix}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        idx_gz(root / f'{prefix}-labels-idx1-ubyte.gz', (np.arange(n) % 10).astype(np.uint8))
    return root
