"""bench/generator_work.py end to end on the demo's settings: the counts it prints are the
configured steps, guidance passes and fine-tuning work, per candidate."""

import pytest

from bench import generator_work
from factory.framework.config import load_config

DEMO = "factory/demo/demo.yaml"


@pytest.mark.usefixtures("one_torch_thread")
def test_prints_unet_evaluations_per_candidate_for_each_generator(capsys):
    assert generator_work.main(["--config", DEMO, "--jobs", "2", "--no-results"]) == 0

    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    generators = load_config(DEMO).generate.generators
    profusion, cafe, ip_adapter = generators["profusion"], generators["cafe"], generators["ip_adapter"]
    refine = profusion.options.get("refine_steps", 1)
    assert float(rows["profusion"][2]) == profusion.steps * (2 * refine + 3)  # refinements, then [uncond, S*, class]
    finetune_rows = profusion.options["finetune_steps"] * profusion.options["finetune_batch_size"]
    assert float(rows["profusion"][3]) == pytest.approx(finetune_rows / 2)  # shared by the reference's 2 jobs
    assert float(rows["cafe"][2]) == cafe.steps * 3  # none, E, E+H
    assert float(rows["cafe"][3]) == 0
    assert float(rows["ip_adapter"][2]) == ip_adapter.steps * 2  # [uncond, text + image tokens]
    assert float(rows["ip_adapter"][3]) == 0  # tuning-free
