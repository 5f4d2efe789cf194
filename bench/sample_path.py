"""The files one sample crosses, from reference image to shard (issue 25's goal: at most 10, counting
config and storage).

    python bench/sample_path.py [--work bench/out/sample_path]

Runs a tiny demo-like run in this one process with no Ray: the references stage (2 SD-drawn
references per prompt), plan (4 jobs in units of 2), generate -> filter -> dialogue through the
executor's inline loop (`run_steps_inline`, the tiny random Llama drafting) and publish with
`publish.executor=local`, under `sys.setprofile`. It records every file of the product packages
(factory, stages, models, filters) in which a function ran (module bodies run by an import are not
counted) and splits them into:

- per sample: a function of the file ran while a sample was being made or moved: a reference drawn,
  read or stored (`Drawer.pull`, `Drawer.draw`, `load_one`, `write_parts`), a plan partition drawn
  (`write_partitions`), a unit processed (`UnitWorker.run_unit`), a sample read for or written into
  a shard (`part_sizes`, `write_planned_shards`, and in its threads `RunSamples.samples`, `write_shard`);
- set-up only: every other file that ran (config loading, opening storage, loading models, the
  stages' entry points, the manifest).

Prints both counts and lists grouped by package, and how many of the per-sample files are
orchestration (`factory/framework`, `factory/dataset`, `stages`) rather than models and scorers.
The demo's tiny models are built once under `--work` (seconds; not traced); each run stores into a
fresh temporary root. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import warnings
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                   "DIFFUSERS_VERBOSITY": "error"})  # as factory.framework.config.QUIET_ENV, before the imports
warnings.filterwarnings("ignore", category=FutureWarning)

import stages.dialogue  # noqa: E402
import stages.filter  # noqa: E402
import stages.generate  # noqa: E402
import stages.plan  # noqa: E402
import stages.publish  # noqa: E402
import stages.references  # noqa: E402
from factory.demo import prepare_demo  # noqa: E402
from factory.framework.config import load_config  # noqa: E402
from factory.framework.executor import Step, run_steps_inline  # noqa: E402
from factory.framework.stage import RunContext  # noqa: E402

PACKAGES = ("factory", "stages", "models", "filters")
# the orchestration a sample crosses: the framework, the dataset services and the stages, not the
# models and scorers that draw and judge it (the count proposed for issue 25 in the session notes)
ORCHESTRATION = ("factory/framework/", "factory/dataset/", "stages/")
SETTINGS = [
    "references.sources=[{kind: generated, domain: object, prompts: [dog, teapot], per_prompt: 2, seed: 0}]",
    "plan.total_jobs=4", "plan.unit_size=2",
    "generate.generators.profusion.options.finetune_steps=1",
    "filter.thresholds.clip_t=-1", "filter.thresholds.dino=-1",  # random weights: let every candidate through
    "dialogue.model=./factory-data/models/tiny-llama", "dialogue.max_new_tokens=128",
    "dialogue.max_user_chars=24", "dialogue.min_assistant_chars=8", "dialogue.max_assistant_chars=40",
    "publish.executor=local", "publish.shard_max_samples=2",
]
# (file, qualified name) of the functions inside which a sample is being made or moved
SAMPLE_WORK = {
    ("stages/references.py", "Drawer.pull"), ("stages/references.py", "Drawer.draw"),
    ("stages/references.py", "load_one"),
    ("factory/dataset/reference_sets.py", "write_parts"),
    ("factory/dataset/planning.py", "write_partitions"),
    ("factory/framework/executor.py", "UnitWorker.run_unit"),
    ("factory/dataset/publisher.py", "part_sizes"), ("factory/dataset/publisher.py", "write_planned_shards"),
    ("factory/dataset/publisher.py", "RunSamples.samples"),  # in a shard task's reader threads
    ("factory/dataset/publisher.py", "write_shard"),  # in its writer thread
}


class Tracer:
    """Which product files ran a function, inside and outside the sample's work (per thread)."""

    def __init__(self) -> None:
        self.files: dict[object, str | None] = {}  # code object -> product file (None: not ours)
        self.depth: dict[int, int] = defaultdict(int)  # thread -> open SAMPLE_WORK frames
        self.per_sample: set[str] = set()
        self.anywhere: set[str] = set()
        self.roots_seen: set[tuple[str, str]] = set()

    def product_file(self, code) -> str | None:
        if code not in self.files:
            path = Path(code.co_filename)
            relative = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else ""
            ours = relative.split("/")[0] in PACKAGES and code.co_name != "<module>"
            self.files[code] = relative if ours else None
        return self.files[code]

    def __call__(self, frame, event, arg):
        if event not in ("call", "return"):
            return
        code = frame.f_code
        file = self.product_file(code)
        if file is None:
            return
        thread = threading.get_ident()
        root = (file, code.co_qualname) in SAMPLE_WORK
        if event == "call":
            self.anywhere.add(file)
            if root:
                self.depth[thread] += 1
                self.roots_seen.add((file, code.co_qualname))
            if self.depth[thread]:
                self.per_sample.add(file)
        elif root:
            self.depth[thread] -= 1


def run(tracer: Tracer, root: str) -> None:
    config = load_config(None, [*SETTINGS, f"storage.root={root}"])
    steps = [Step("generate", stages.generate.Generate), Step("filter", stages.filter.Filter),
             Step("dialogue", stages.dialogue.Dialogue)]
    ctx = RunContext(config, unit_steps=tuple(steps))
    stages.references.run(ctx)
    stages.plan.run(ctx)
    run_steps_inline(ctx, steps)
    published = stages.publish.run(ctx)
    print(f"published {published['samples']} samples of {published['funnel']['planned']} planned", file=sys.stderr)


def grouped(files: set[str]) -> str:
    by_package: dict[str, list[str]] = defaultdict(list)
    for file in sorted(files):
        package = "/".join(file.split("/")[:-1])
        by_package[package].append(file.split("/")[-1])
    return "\n".join(f"  {package}/: {' '.join(names)}" for package, names in sorted(by_package.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / "bench/out/sample_path"), help="where the tiny models are kept")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # the demo's model paths are relative (./factory-data/models)
    prepare_demo(load_config(None, SETTINGS))
    tracer = Tracer()
    with tempfile.TemporaryDirectory(prefix="sample-path-") as root:
        threading.setprofile(tracer)
        sys.setprofile(tracer)
        try:
            run(tracer, root)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    missing = sorted(f"{file}:{name}" for file, name in SAMPLE_WORK - tracer.roots_seen)
    if missing:
        print(f"warning: sample work that never ran (renamed?): {', '.join(missing)}", file=sys.stderr)
    setup = tracer.anywhere - tracer.per_sample
    orchestration = {file for file in tracer.per_sample if file.startswith(ORCHESTRATION)}
    print(f"per sample: {len(tracer.per_sample)} files, {len(orchestration)} of them orchestration "
          f"(framework, dataset services, stages)\n{grouped(tracer.per_sample)}")
    print(f"set-up only: {len(setup)} files\n{grouped(setup)}")
    print(f"all: {len(tracer.anywhere)} files")


if __name__ == "__main__":
    main()
