"""State comparison shared by the resume tests (test_train.py, test_reliability.py)."""

import torch


def assert_same(a, b, path: str) -> None:
    """Tensors bitwise equal (same dtype and shape), containers recursively, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), (
            f"{path} differs (max abs diff "
            f"{(a.double() - b.double()).abs().max().item() if a.numel() else 0})"
        )
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
