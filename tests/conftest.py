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
    """A fake Fashion-MNIST (80 training, 16 test images), shared by the session's tests."""
    from fixtures import fake_fashion_mnist

    return fake_fashion_mnist(tmp_path_factory.mktemp('fmnist'))
