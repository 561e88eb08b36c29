"""Models: the ASCL objective, encoders and the trainable ``ASCLModel`` (MoCo form) and
``BYOLModel`` (BYOL form).

Knows nothing about files, configuration or Beam.
"""

from models.ascl_model import ASCLModel
from models.backbones import BACKBONES, build_backbone, resnet, small_cnn
from models.byol_model import BYOLModel, prediction_head
from models.heads import projection_head
from models.normalization import NORMALIZATIONS, SplitBatchNormalization, normalization_layer
from models.objective import (
                              BYOL_MODES,
                              MODES,
                              ascl_loss,
                              ascl_targets,
                              byol_ascl_loss,
                              byol_ascl_targets,
                              byol_regression_loss,
                              contrastive_logits,
                              soft_cross_entropy,
                              validate_objective_args,
)

__all__ = [
    "ASCLModel", "BACKBONES", "BYOLModel", "BYOL_MODES", "MODES", "NORMALIZATIONS",
    "SplitBatchNormalization", "ascl_loss", "ascl_targets", "build_backbone", "byol_ascl_loss",
    "byol_ascl_targets", "byol_regression_loss", "contrastive_logits", "normalization_layer",
    "prediction_head", "projection_head", "resnet", "small_cnn", "soft_cross_entropy",
    "validate_objective_args",
]
