"""Pixel-BERT (arXiv:2004.00849) in pure PyTorch."""
