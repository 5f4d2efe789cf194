"""Model code, apart from orchestration: generators, scorers' backbones, LLM engines."""

import os

from diffusers.utils import logging as diffusers_logging

if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # diffusers' own loading bars follow the Hub's switch
    diffusers_logging.disable_progress_bar()
