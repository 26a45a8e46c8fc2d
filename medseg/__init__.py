"""medseg: 2D medical image segmentation trainer with MLflow tracking and a Ray Tune improvement loop."""

__version__ = "0.1.0"
