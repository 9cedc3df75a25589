"""Reference models: small digits networks, CIFAR ResNets, VGG, an MLP, a transformer encoder, GCNs.

Every model but the digits helpers is a flat ``nn.Sequential`` of cuttable units (stem or embedding,
blocks or layers, a classifier head as its own last entry), so that a split planner can cut it between
units; residual blocks implement ``forward_residual(x) -> (y, r)`` with ``y = shortcut(x) + r``.
``from llkern.models import X`` keeps working for everything ``llkern/models.py`` exported before it
became this package.
"""

from llkern.models.digits import PreActBlock, digits_lenet, digits_lenet_caffe, digits_resnet
from llkern.models.gcn import GCNLayer, GraphHead, gcn_graphs, gcn_nodes
from llkern.models.mlp import mlp
from llkern.models.moda_cnn import ResidualReLUBlock, digits_cnn, digits_resnet_moda
from llkern.models.resnet import BasicBlock, PadShortcut, cifar_resnet, resnet32, resnet110
from llkern.models.transformer import (
    PatchEmbed,
    SelfAttention,
    TokenClassifier,
    TokenEmbed,
    TransformerBlock,
    transformer_encoder,
)
from llkern.models.vgg import VGG_CONFIGS, vgg, vgg11, vgg16

__all__ = [
    "VGG_CONFIGS",
    "BasicBlock",
    "GCNLayer",
    "GraphHead",
    "PadShortcut",
    "PatchEmbed",
    "PreActBlock",
    "ResidualReLUBlock",
    "SelfAttention",
    "TokenClassifier",
    "TokenEmbed",
    "TransformerBlock",
    "cifar_resnet",
    "digits_cnn",
    "digits_lenet",
    "digits_lenet_caffe",
    "digits_resnet",
    "digits_resnet_moda",
    "gcn_graphs",
    "gcn_nodes",
    "mlp",
    "resnet32",
    "resnet110",
    "transformer_encoder",
    "vgg",
    "vgg11",
    "vgg16",
]
