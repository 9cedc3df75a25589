"""Datasets read from local files: scikit-learn's digits, CIFAR-10 (binary or Python format, no
download), folders of one's own images, and graphs from networkx; batched on-device augmentation."""

from llkern.data.augment import RandomCropFlip, black_fill, crop_flip, random_crop_flip, sample_crop_flip
from llkern.data.folder import IMAGE_EXTENSIONS, ImageFolderData, load_image_folder
from llkern.data.graphs import karate_club, split_graphs, synthetic_graphs
from llkern.data.images import load_cifar10, load_digits

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "RandomCropFlip",
    "black_fill",
    "crop_flip",
    "karate_club",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "random_crop_flip",
    "sample_crop_flip",
    "split_graphs",
    "synthetic_graphs",
]
