"""Scorers of the automatic filter (CLIP image-text and image-image, DINO image-image)
and its threshold rules. `rules` is pure (numpy/pandas) and this package imports nothing heavy:
`clip`, `dino` and `precision` import torch."""
