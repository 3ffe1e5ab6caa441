"""maskloom: self-supervised masked modeling across modalities."""

__version__ = "0.1.0"
