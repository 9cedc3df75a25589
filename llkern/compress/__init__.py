"""Weight compression: Mean-KL variational weights (``MeanKLNetwork``, ``GaussianNetwork``) and the
MIRACLE coder with its checksummed file format (``encode``, ``decode``, ``read``)."""

from llkern.compress import header, mean_kl, miracle
from llkern.compress.mean_kl import GaussianNetwork, MeanKLNetwork
from llkern.compress.miracle import EncodeReport, decode, encode, read

__all__ = [
    "EncodeReport",
    "GaussianNetwork",
    "MeanKLNetwork",
    "decode",
    "encode",
    "header",
    "mean_kl",
    "miracle",
    "read",
]
