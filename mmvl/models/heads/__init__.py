"""Pretraining and fine-tuning heads; importing this package registers them in ``mmvl.registry.HEADS``."""

from mmvl.models.heads.classification import MultiClassClassificationHead, MultiLabelClassificationHead
from mmvl.models.heads.contrastive import ContrastiveHead, LabelAwareContrastiveHead, SigLipHead
from mmvl.models.heads.local_align import LocalAlignmentHead
from mmvl.models.heads.mae import MAEHead
from mmvl.models.heads.report import ReportGenerationHead
from mmvl.models.heads.segmentation import SegmentationHead

__all__ = ["ContrastiveHead", "LabelAwareContrastiveHead", "SigLipHead", "MAEHead", "ReportGenerationHead",
           "LocalAlignmentHead",
           "MultiClassClassificationHead", "MultiLabelClassificationHead", "SegmentationHead"]
