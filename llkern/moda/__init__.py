"""MODA (Ngo et al., arXiv 2411.01074): activation-driven modular training and module extraction.

**Losses.** At every ReLU output of the network, each sample's unit activations ``a_i`` ((B, N_l):
a linear layer's outputs, or a conv layer's per-channel mean ``|activation|`` over space) are
L2-normalised, ``â_i = a_i / max(‖a_i‖, eps)``, and compared, ``S_ij = â_i · â_j``. Over the pairs
``i < j`` of the batch::

    L_aff = 1 − mean_layers mean_{i<j, y_i=y_j} S_ij      (intra-class affinity)
    L_dis =     mean_layers mean_{i<j, y_i≠y_j} S_ij      (inter-class dispersion)
    L_com =     mean_layers ‖a‖₁ / (B · N_l)              (compactness)
    total = CE + 1.0·L_aff + 1.0·L_dis + 0.3·L_com

A batch without a same-class pair gives ``L_aff = 0`` and one without a different-class pair
``L_dis = 0`` (a batch of one sample has neither): the term is 0 with a zero gradient, never NaN.
The pair sets are masks over the B×B similarity matrix (upper triangle), so nothing loops over pairs;
samples labelled ``ignore_index`` (-100) are in no pair.

**Collecting the ReLU outputs.** :class:`ActivationCollector` registers forward hooks on every
``nn.ReLU`` module of a model (``inplace=True`` too: the hook sees the output) and removes them on
exit. Functional ReLUs (``F.relu``, ``torch.relu``) do not pass through a module and are not seen;
wrap such an output in :func:`record` (``x = record(F.relu(x))``), which hands it to the innermost
active collector and returns it unchanged.

**Extraction.** :func:`class_masks` marks, for every class c and ReLU layer, the units active
(``a > 0``) on at least ``tau`` of class c's samples (and at least ``min_keep`` of the layer, the most
often active). :func:`extract` builds the module of a set of classes: the union of their masks, the
network deep-copied with its Conv2d, Linear and BatchNorm layers sliced to the kept units, and the last
layer's rows restricted to the classes. In a residual block (``ResidualReLUBlock``) an identity shortcut's
addition is done on the intersection of the input's and the output's kept units (:func:`extract`).
:func:`modularity_report` measures modules' sizes, accuracies and overlap.
"""

from llkern.moda import activations, extraction, loss, report
from llkern.moda.activations import (
    ActivationCollector,
    record,
    relu_modules,
    unit_activations,
)
from llkern.moda.extraction import (
    ChannelMap,
    ClassMasks,
    class_masks,
    count_weights,
    extract,
    weight_masks,
)
from llkern.moda.loss import (
    DEFAULT_WEIGHTS,
    MODALocalLoss,
    MODALoss,
    MODAOutput,
    affinity_loss,
    compactness_loss,
    dispersion_loss,
    moda_local_losses,
    moda_terms,
)
from llkern.moda.report import (
    MODAReport,
    ModuleStats,
    modularity_report,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "ActivationCollector",
    "ChannelMap",
    "ClassMasks",
    "MODALocalLoss",
    "MODALoss",
    "MODAOutput",
    "MODAReport",
    "ModuleStats",
    "activations",
    "affinity_loss",
    "class_masks",
    "compactness_loss",
    "count_weights",
    "dispersion_loss",
    "extract",
    "extraction",
    "loss",
    "moda_local_losses",
    "moda_terms",
    "modularity_report",
    "record",
    "relu_modules",
    "report",
    "unit_activations",
    "weight_masks",
]
