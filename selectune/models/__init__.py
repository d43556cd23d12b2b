"""Pretrained weights that do not ship as a transformers folder and are converted once on first use."""
