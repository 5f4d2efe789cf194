"""filter: score every live candidate with CLIP-T and DINO, then apply the threshold rules.

`clip_t` is the CLIP cosine between `x~` (target_image) and the instruction; `dino` the DINO
cosine between `x~` and `x` (input_image). Every scored row keeps both scores and one flag
per rule, so a version can be re-thresholded later from the stored scores
(`filters.rules.apply_thresholds`). A candidate that cannot be scored (bad image bytes, an
unreadable instruction) is rejected with a reason and the batch goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from factory.framework.config import FactoryConfig
from factory.framework.executor import Step, run_steps
from factory.framework.images import ImageRejected, decode_image
from factory.framework.models_cache import loader_paths
from factory.framework.stage import Stage
from filters.clip import clip_scorer_from_config, paired_cosines
from filters.dino import DinoScorer
from filters.rules import RULES, SCORE_COLUMNS, first_failure, funnel_counts, rule_flags
from models.base import pick_device

log = logging.getLogger(__name__)

# CLIP resizes the shortest side to its input size, so a 1 x 40M image would grow to
# billions of pixels: refuse such shapes before preprocessing.
MAX_ASPECT_RATIO = 50.0


@dataclass
class Prepared:
    """One micro-batch turned into model inputs (by row position), and the rows that could not be."""

    positions: list[int] = field(default_factory=list)
    clip_pixels: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    dino_targets: list = field(default_factory=list)
    dino_inputs: list = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


class Filter(Stage):
    """Adds clip_t, dino and a pass flag per rule; a row under a threshold is rejected with
    the reason of its first failed rule."""

    name = "filter"
    adds = (*SCORE_COLUMNS, *(rule.flag for rule in RULES.values()))
    source = "generate"
    needs_images = ("target_image", "input_image")
    shaped_by = ("references", "plan", "generate", "filter")

    def __init__(self, config: FactoryConfig, device: str | None = None):
        super().__init__(config)
        self.settings = config.filter
        self.device = device or pick_device(self.settings.num_gpus)

    def setup(self) -> None:
        local = loader_paths(self.config.storage)
        self.clip = clip_scorer_from_config(self.config, self.device, local)
        self.dino = DinoScorer(local(self.settings.dino_model, "filter.dino_model"), device=self.device,
                               dtype=self.settings.dtype)

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        scores = {rule: np.full(len(rows), np.nan) for rule in RULES}
        scored = np.zeros(len(rows), dtype=bool)
        reasons = np.full(len(rows), None, dtype=object)
        size = self.settings.batch_size
        for start in range(0, len(rows), size):
            prepared = self.prepare(rows, np.arange(start, min(start + size, len(rows))))
            for position, reason in prepared.rejected.items():
                reasons[position] = reason
            if prepared.positions:
                scores["clip_t"][prepared.positions], scores["dino"][prepared.positions] = self.score(prepared)
                scored[prepared.positions] = True
        finite = np.isfinite(scores["clip_t"]) & np.isfinite(scores["dino"])
        reasons[scored & ~finite] = "non_finite_score"  # an embedding that overflowed: no score, not a miss
        scored &= finite
        flags = rule_flags(scores, self.settings.thresholds)
        for column, values in {**scores, **flags}.items():
            rows[column] = values
        rows["reject"] = np.where(scored, first_failure(flags), reasons)
        self.count("scored", int(scored.sum()))
        for gate, count in funnel_counts(scored, flags).items():
            self.count(gate, count)
        return rows

    def prepare(self, rows: pd.DataFrame, positions: np.ndarray) -> Prepared:
        """Decode both images and read the instruction of each row; preprocess what is usable.

        Each decoded image goes through the models' own preprocessing at once, so at most
        two full-size images are held at a time.
        """
        prepared = Prepared()
        columns = [rows[name].to_numpy() for name in ("target_image", "input_image", "instruction")]
        for position in positions:
            target_bytes, input_bytes, instruction = (column[position] for column in columns)
            text = readable_text(instruction)
            if text is None:
                prepared.rejected[position] = "bad_instruction"
                continue
            try:
                target = self.decode(target_bytes)
                reference = self.decode(input_bytes)
            except ImageRejected as err:
                prepared.rejected[position] = err.reason
                continue
            prepared.positions.append(position)
            prepared.texts.append(text)
            prepared.clip_pixels.append(self.clip.preprocess(target))
            prepared.dino_targets.append(self.dino.image_tensors([target])[0])
            prepared.dino_inputs.append(self.dino.image_tensors([reference])[0])
        return prepared

    def decode(self, data: bytes | None):
        image = decode_image(data, self.settings.max_pixels)
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise ImageRejected("extreme_aspect_ratio", f"{image.width}x{image.height}")
        return image

    def score(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """(clip_t, dino) for the prepared rows: one CLIP image, one CLIP text and one DINO pass."""
        image_features = self.clip.embed_pixels(torch.stack(prepared.clip_pixels))
        text_features = self.clip.embed_texts(prepared.texts)
        dino_features = self.dino.embed_pixels(torch.stack([*prepared.dino_targets, *prepared.dino_inputs]))
        count = len(prepared.positions)
        clip_t = paired_cosines(image_features, text_features)
        dino = paired_cosines(dino_features[:count], dino_features[count:])
        return clip_t, dino


def readable_text(value: object) -> str | None:
    """The instruction as text, or None when it is missing, blank or not valid UTF-8."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def run(ctx) -> dict:
    """Score every unit's generated candidates (an actor pool over units)."""
    return run_steps(ctx, [Step("filter", Filter)])
