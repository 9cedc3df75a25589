"""RandomCropFlip / random_crop_flip / crop_flip against a per-sample loop, their randomness, and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llkern.data import (
    RandomCropFlip,
    black_fill,
    crop_flip,
    random_crop_flip,
    sample_crop_flip,
)
from llkern.data.images import CIFAR10_MEAN, CIFAR10_STD

from .conftest import DEVICES


def reference(x, offsets, flips, padding, fill=None, padding_mode="constant"):
    """The obvious per-sample version: pad one image, slice its crop, flip it."""
    out = []
    _, channels, height, width = x.shape
    for i in range(x.shape[0]):
        image = x[i : i + 1]
        if padding_mode == "reflect":
            padded = F.pad(image, (padding,) * 4, mode="reflect")[0]
        elif fill is None:
            padded = F.pad(image, (padding,) * 4)[0]
        else:
            padded = torch.tensor(fill, dtype=x.dtype, device=x.device).view(channels, 1, 1)
            padded = padded.expand(channels, height + 2 * padding, width + 2 * padding).clone()
            padded[:, padding : padding + height, padding : padding + width] = image[0]
        top, left = offsets[i].tolist()
        crop = padded[:, top : top + height, left : left + width]
        if flips is not None and bool(flips[i]):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out) if out else torch.empty_like(x)


def random_offsets(batch, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 * padding + 1, (batch, 2), generator=g), torch.rand(batch, generator=g) < 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (7, 3, 5, 5), (5, 2, 5, 9), (3, 1, 32, 7), (0, 3, 8, 8)])
@pytest.mark.parametrize("padding_mode", ["constant", "reflect"])
@pytest.mark.parametrize("padding", [0, 1, 4])
def test_matches_per_sample_loop(device, shape, padding_mode, padding):
    if padding_mode == "reflect" and padding >= min(shape[-2:]):
        pytest.skip("reflect needs padding < H, W")
    x = torch.randn(shape, device=device)
    offsets, flips = random_offsets(shape[0], padding)
    want = reference(x, offsets, flips, padding, padding_mode=padding_mode)
    got = crop_flip(x, offsets, flips, padding=padding, padding_mode=padding_mode)
    assert got.shape == x.shape and got.device == x.device
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Without flips: crops only.
    torch.testing.assert_close(crop_flip(x, offsets, None, padding=padding, padding_mode=padding_mode),
                               reference(x, offsets, None, padding, padding_mode=padding_mode), rtol=0, atol=0)


def test_every_corner_and_flip_combination():
    """All (2p+1)² offsets, each with and without flip, on one distinctive image."""
    p, size = 2, 5
    x = torch.arange(2 * size * size, dtype=torch.float32).view(1, 2, size, size) + 1
    tops, lefts = torch.meshgrid(torch.arange(2 * p + 1), torch.arange(2 * p + 1), indexing="ij")
    offsets = torch.stack([tops.flatten(), lefts.flatten()], 1).repeat(2, 1)
    flips = torch.arange(len(offsets)) >= len(offsets) // 2
    batch = x.expand(len(offsets), -1, -1, -1)
    for padding_mode in ("constant", "reflect"):
        torch.testing.assert_close(crop_flip(batch, offsets, flips, padding=p, padding_mode=padding_mode),
                                   reference(batch, offsets, flips, p, padding_mode=padding_mode), rtol=0, atol=0)
    # The centre offset without flip is the image itself; with flip, its mirror.
    assert torch.equal(crop_flip(x, torch.tensor([[p, p]]), padding=p), x)
    assert torch.equal(crop_flip(x, torch.tensor([[p, p]]), torch.tensor([True]), padding=p), x.flip(-1))
    # A full shift leaves `p` rows of padding on top.
    shifted = crop_flip(x, torch.tensor([[0, p]]), padding=p)
    assert torch.equal(shifted[..., :p, :], torch.zeros(1, 2, p, size))
    assert torch.equal(shifted[..., p:, :], x[..., : size - p, :])


@pytest.mark.parametrize("device", DEVICES)
def test_fill_per_channel_and_black(device):
    x = torch.randn(6, 3, 8, 8, device=device)
    offsets, flips = random_offsets(6, 4, seed=3)
    fill = black_fill(CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(crop_flip(x, offsets, flips, padding=4, fill=fill),
                               reference(x, offsets, flips, 4, fill=fill), rtol=0, atol=0)
    # One number fills every channel; a tensor works as a sequence.
    torch.testing.assert_close(crop_flip(x, offsets, flips, padding=4, fill=-1.5),
                               reference(x, offsets, flips, 4, fill=(-1.5,) * 3), rtol=0, atol=0)
    torch.testing.assert_close(crop_flip(x, offsets, flips, padding=4, fill=torch.tensor(fill)),
                               reference(x, offsets, flips, 4, fill=fill), rtol=0, atol=0)
    # Padding a normalised image with black_fill is padding the raw image with 0 and normalising after.
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    raw = torch.rand(6, 3, 8, 8)
    via_raw = (crop_flip(raw, offsets, flips, padding=4) - mean) / std
    torch.testing.assert_close(crop_flip((raw - mean) / std, offsets, flips, padding=4, fill=fill), via_raw)
    assert black_fill((0.5,), (0.25,)) == (-2.0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", ["constant", "reflect"])
def test_layouts(device, padding_mode):
    x = torch.randn(7, 3, 6, 6, device=device)
    offsets, flips = random_offsets(7, 3, seed=1)
    want = reference(x, offsets, flips, 3, fill=(1.0, 2.0, 3.0), padding_mode=padding_mode)
    kwargs = dict(padding=3, fill=(1.0, 2.0, 3.0), padding_mode=padding_mode)

    cl = crop_flip(x.contiguous(memory_format=torch.channels_last), offsets, flips, **kwargs)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, want, rtol=0, atol=0)
    assert crop_flip(x, offsets, flips, **kwargs).is_contiguous()

    # Non-contiguous views: every other sample of a bigger batch, and a spatially transposed batch.
    big = torch.randn(14, 3, 6, 6, device=device)
    torch.testing.assert_close(crop_flip(big[::2], offsets, flips, **kwargs),
                               reference(big[::2], offsets, flips, 3, fill=(1.0, 2.0, 3.0),
                                         padding_mode=padding_mode), rtol=0, atol=0)
    xt = x.transpose(2, 3)
    assert not xt.is_contiguous()
    torch.testing.assert_close(crop_flip(xt, offsets, flips, **kwargs),
                               reference(xt.contiguous(), offsets, flips, 3, fill=(1.0, 2.0, 3.0),
                                         padding_mode=padding_mode), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(device, dtype):
    x = torch.randn(5, 3, 7, 7, device=device).to(dtype)
    offsets, flips = random_offsets(5, 4, seed=2)
    fill = black_fill(CIFAR10_MEAN, CIFAR10_STD)
    got = crop_flip(x, offsets, flips, padding=4, fill=fill)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference(x, offsets, flips, 4, fill=fill), rtol=0, atol=0)
    g = torch.Generator(device=device).manual_seed(0)
    assert random_crop_flip(x, generator=g).dtype == dtype


def test_gradient_flows_to_the_kept_pixels():
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    offsets, flips = random_offsets(4, 2, seed=5)
    crop_flip(x, offsets, flips, padding=2, fill=3.0).sum().backward()
    # Each source pixel is read at most once (constant padding), so its gradient is 1 if kept, else 0.
    kept = reference(torch.ones_like(x), offsets, flips, 2, fill=(0.0, 0.0)).sum((1, 2, 3))
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(x.grad.sum((1, 2, 3)), kept)


# --- randomness -------------------------------------------------------------------------------------------

def test_sample_crop_flip_distribution():
    g = torch.Generator().manual_seed(0)
    offsets, flips = sample_crop_flip(20000, 4, True, generator=g)
    assert offsets.shape == (20000, 2) and offsets.dtype == torch.int64
    assert flips.shape == (20000,) and flips.dtype == torch.bool
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=9)
        assert len(counts) == 9 and counts.min() > 0  # every offset in 0..2p, none beyond
        assert (counts.float() / 20000 - 1 / 9).abs().max() < 0.015
    assert abs(flips.float().mean().item() - 0.5) < 0.015
    assert sample_crop_flip(5, 4, False, generator=g)[1] is None
    assert torch.equal(sample_crop_flip(5, 0, True, generator=g)[0], torch.zeros(5, 2, dtype=torch.int64))


def test_random_crop_flip_covers_every_shift():
    """Each sample of a random call is one of the (2p+1)² × 2 crops, and each of those occurs."""
    p, size = 1, 4
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) + 1
    batch = x.expand(400, -1, -1, -1)
    out = random_crop_flip(batch, p, generator=torch.Generator().manual_seed(0))
    tops, lefts = torch.meshgrid(torch.arange(2 * p + 1), torch.arange(2 * p + 1), indexing="ij")
    offsets = torch.stack([tops.flatten(), lefts.flatten()], 1).repeat(2, 1)
    flips = torch.arange(len(offsets)) >= len(offsets) // 2
    candidates = crop_flip(x.expand(len(offsets), -1, -1, -1), offsets, flips, padding=p).flatten(1)
    matches = (out.flatten(1)[:, None, :] == candidates[None]).all(-1)  # (400, 18)
    assert (matches.sum(1) == 1).all()  # the 18 crops of this image are distinct
    assert (matches.sum(0) > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_generator_determinism(device):
    x = torch.randn(9, 3, 8, 8, device=device)
    a = random_crop_flip(x, generator=torch.Generator(device=device).manual_seed(7))
    b = random_crop_flip(x, generator=torch.Generator(device=device).manual_seed(7))
    c = random_crop_flip(x, generator=torch.Generator(device=device).manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The random call is crop_flip of sample_crop_flip's draws from the same generator state.
    offsets, flips = sample_crop_flip(9, 4, True, generator=torch.Generator(device=device).manual_seed(7),
                                      device=device)
    assert torch.equal(a, crop_flip(x, offsets, flips, padding=4))
    # The module keeps its generator, whose state advances: two calls differ, a re-seeded module repeats.
    module = RandomCropFlip(generator=torch.Generator(device=device).manual_seed(7))
    first, second = module(x), module(x)
    assert torch.equal(first, a) and not torch.equal(first, second)
    # A CPU generator drives a batch on any device the same way.
    cpu = random_crop_flip(x.cpu(), generator=torch.Generator().manual_seed(3))
    here = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cpu, here.cpu())


def test_default_generator_follows_manual_seed():
    x = torch.randn(6, 3, 8, 8)
    torch.manual_seed(11)
    a = random_crop_flip(x)
    torch.manual_seed(11)
    assert torch.equal(a, random_crop_flip(x))


def test_identity_and_flip_only():
    x = torch.randn(5, 3, 6, 6)
    assert random_crop_flip(x, 0, False) is x
    assert RandomCropFlip(padding=0, flip=False)(x) is x
    out = random_crop_flip(x, 0, True, generator=torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped ^ kept).all() and flipped.any() and kept.any()
    # Crops only: no sample is mirrored; each is x shifted, so its pixels are x's or padding (0).
    out = random_crop_flip(x, 2, False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_module():
    module = RandomCropFlip(padding=2, flip=True, fill=[0.5, 0.25, 0.0], padding_mode="constant")
    assert "padding=2" in repr(module) and "fill=(0.5, 0.25, 0.0)" in repr(module)
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    x = torch.randn(4, 3, 5, 5)
    g = torch.Generator().manual_seed(1)
    offsets, flips = sample_crop_flip(4, 2, True, generator=torch.Generator().manual_seed(1))
    module.generator = g
    torch.testing.assert_close(module(x), reference(x, offsets, flips, 2, fill=(0.5, 0.25, 0.0)), rtol=0, atol=0)
    module.eval()  # augments in eval mode too: the caller applies it to training batches only
    assert not torch.equal(module(x), x)


# --- errors -----------------------------------------------------------------------------------------------

def test_errors_random():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"random_crop_flip: expected x to be a 4-D batch .* got shape \(3, 8, 8\)"):
        random_crop_flip(x[0])
    with pytest.raises(TypeError, match=r"expected x to have a floating dtype .* torch.uint8"):
        random_crop_flip(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"expected x to have a floating dtype .* torch.int64"):
        random_crop_flip(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"expected x to be a torch\.Tensor, got list"):
        random_crop_flip([[1.0]])
    with pytest.raises(ValueError, match="expected padding >= 0, got -1"):
        random_crop_flip(x, -1)
    with pytest.raises(TypeError, match="expected padding to be an int, got float"):
        random_crop_flip(x, 2.0)
    with pytest.raises(TypeError, match="expected padding to be an int, got bool"):
        random_crop_flip(x, True)
    with pytest.raises(TypeError, match="expected flip to be a bool, got int"):
        random_crop_flip(x, 4, 1)
    with pytest.raises(ValueError, match="fill has 2 values but the images have 3 channels"):
        random_crop_flip(x, fill=(0.0, 1.0))
    with pytest.raises(TypeError, match="expected fill to be None, a number or a sequence"):
        random_crop_flip(x, fill="black")
    with pytest.raises(ValueError, match="expected padding_mode to be 'constant' or 'reflect', got 'wrap'"):
        random_crop_flip(x, padding_mode="wrap")
    with pytest.raises(ValueError, match=r"padding_mode='reflect' needs padding < H and padding < W, got padding=8 "
                                         r"for 8×8 images"):
        random_crop_flip(x, 8, padding_mode="reflect")


def test_errors_module_and_sample():
    with pytest.raises(ValueError, match="RandomCropFlip: expected padding >= 0, got -4"):
        RandomCropFlip(padding=-4)
    with pytest.raises(TypeError, match=r"RandomCropFlip: expected generator to be a torch\.Generator or None, "
                                        r"got int"):
        RandomCropFlip(generator=0)
    with pytest.raises(TypeError, match="RandomCropFlip: expected fill"):
        RandomCropFlip(fill=object())
    with pytest.raises(ValueError, match=r"RandomCropFlip: expected padding_mode"):
        RandomCropFlip(padding_mode="edge")
    with pytest.raises(ValueError, match=r"random_crop_flip: expected x to be a 4-D batch"):
        RandomCropFlip()(torch.randn(8, 8))
    with pytest.raises(ValueError, match="sample_crop_flip: expected batch_size >= 0, got -1"):
        sample_crop_flip(-1)
    with pytest.raises(TypeError, match="sample_crop_flip: expected batch_size to be an int, got float"):
        sample_crop_flip(2.0)
    with pytest.raises(ValueError, match="black_fill: mean has 3 channels but std has 2"):
        black_fill((0.0, 0.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="black_fill: std must be non-zero"):
        black_fill((0.0,), (0.0,))


def test_errors_explicit():
    x = torch.randn(2, 3, 8, 8)
    ok = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"crop_flip: expected offsets to be an integer tensor of shape \(2, 2\), got "
                                         r"torch.int64 tensor of shape \(3, 2\)"):
        crop_flip(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected offsets to be an integer tensor .* got torch.float32"):
        crop_flip(x, ok.float())
    with pytest.raises(ValueError, match=r"offsets must be in 0..8 \(2 \* padding\), got values in 0..9"):
        crop_flip(x, torch.tensor([[0, 9], [0, 0]]))
    with pytest.raises(ValueError, match=r"offsets must be in 0..2 .* got values in -1..0"):
        crop_flip(x, torch.tensor([[0, -1], [0, 0]]), padding=1)
    with pytest.raises(ValueError, match=r"expected flips to be None or a bool tensor of shape \(2,\), got "
                                         r"torch.int64 tensor of shape \(2,\)"):
        crop_flip(x, ok, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected flips .* got list"):
        crop_flip(x, ok, [True, False])
    with pytest.raises(ValueError, match=r"crop_flip: expected x to be a 4-D batch"):
        crop_flip(x[None], ok)
    with pytest.raises(TypeError, match=r"crop_flip: expected x to have a floating dtype"):
        crop_flip(x.int(), ok)
    with pytest.raises(ValueError, match="crop_flip: expected padding >= 0"):
        crop_flip(x, ok, padding=-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu():
    x = torch.randn(64, 3, 32, 32)
    offsets, flips = sample_crop_flip(64, 4, True, generator=torch.Generator().manual_seed(0))
    fill = black_fill(CIFAR10_MEAN, CIFAR10_STD)
    on_cpu = crop_flip(x, offsets, flips, fill=fill)
    on_gpu = crop_flip(x.cuda().contiguous(memory_format=torch.channels_last), offsets.cuda(), flips.cuda(), fill=fill)
    assert on_gpu.is_cuda and on_gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=0)
