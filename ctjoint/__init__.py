"""ctjoint: joint COVID-19 chest-CT lesion segmentation and classification at the edge."""

__version__ = "0.1.0"
