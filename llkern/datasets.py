"""Datasets that ship inside packages, for accuracy runs without a network."""

from __future__ import annotations

import torch


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """scikit-learn's 8×8 handwritten digits, as ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 1, 8, 8)`` float32 scaled to [0, 1] then standardised with the training
    mean and std; labels are int64 in 0..9. The split is stratified and fixed by ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("llkern.datasets.load_digits needs scikit-learn: pip install scikit-learn") from error
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[train_idx], (x_test - mean) / std, y[test_idx]
