"""Tiny real models for the scorer tests, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    from factory.tiny.dino import build_tiny_dino

    return build_tiny_dino(tmp_path_factory.mktemp("tiny-dino"))


@pytest.fixture(scope="session")
def clip_scorer(tiny_clip):
    from filters.clip import ClipScorer

    return ClipScorer(tiny_clip.model_name, tiny_clip.pretrained, model_config=tiny_clip.model_config)


@pytest.fixture(scope="session")
def dino_scorer(tiny_dino):
    from filters.dino import DinoScorer

    return DinoScorer(tiny_dino)
