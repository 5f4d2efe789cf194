"""bench/real_size.py: the published configurations build models of the published sizes (counted
on the meta device, nothing allocated), and the bench runs end to end on tiny configurations,
writing figures the dry run then prices with."""

from __future__ import annotations

import json

import pytest
import torch

from bench.published_models import build, parameter_count, specs

PUBLISHED = {  # the sizes the model cards and papers state
    "sd2_unet": 865e6,
    "clip_vit_l14_336": 304e6,
    "dinov2_giant": 1.1e9,
    "dino_vits16": 22e6,
    "clip_vit_b32": 151e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_build_models_of_the_published_size(name):
    with torch.device("meta"):
        model = build(name)
    assert all(p.device.type == "meta" for p in model.parameters())  # no full-size allocation
    count = parameter_count(model)
    assert count == pytest.approx(PUBLISHED[name], rel=0.035)
    assert count == specs()[name]["published_params"]


def test_every_published_config_counts_what_its_card_says():
    for name, spec in specs().items():
        with torch.device("meta"):
            model = build(name)
        assert parameter_count(model) == spec["published_params"], name


def test_bench_runs_end_to_end_on_tiny_models_and_the_dry_run_prices_with_its_figures(tmp_path, monkeypatch, capsys,
                                                                                      one_torch_thread):
    from bench.real_size import PARTS, main
    from factory.run import main as run_main

    figures = tmp_path / "figures.json"
    results = tmp_path / "RESULTS.md"
    assert main(["--tiny", "--figures", str(figures), "--results", str(results), "--threads", "1"]) == 0
    output = capsys.readouterr().out
    assert "IP-Adapter at the production config" in output and not results.exists()
    entry = json.loads(figures.read_text())["devices"]["cpu (tiny models)"]
    assert entry["parts"] == list(PARTS) and entry["counts"].startswith("reduced")
    expected = {"profusion_finetune_step_s", "profusion_reference_s", "profusion_sample_step_s", "profusion_decode_s",
                "cafe_reference_s", "cafe_w_s", "cafe_sample_step_s", "cafe_decode_s", "sd_step_s",
                "ip_adapter_reference_s", "ip_adapter_sample_step_s", "ip_adapter_decode_s",
                "filter_candidate_s", "train_generator_sample_s", "train_assistant_sample_s"}
    assert set(entry["figures"]) == expected
    for name, figure in entry["figures"].items():
        assert figure["value"] > 0, name
        assert figure["source"] in ("measured", "measured, extrapolated") and figure["note"], name
    for reuser in ("cafe_decode_s", "ip_adapter_decode_s"):  # a reduced run decodes once, in [profusion]
        assert entry["figures"][reuser]["value"] == entry["figures"]["profusion_decode_s"]["value"]
        assert entry["figures"][reuser]["note"].startswith("measured in [profusion]")

    monkeypatch.chdir(tmp_path)
    assert run_main(["--stage", "all", "--dry-run", "--device-kind", "cpu (tiny models)", "--figures",
                     str(figures)]) == 0
    priced = capsys.readouterr().out
    generate = next(line for line in priced.splitlines() if line.strip().startswith("generate "))
    assert "[measured]" in generate and "cpu (tiny models)-hours" in priced


def test_the_unreduced_path_a_gpu_takes_runs_on_tiny_models(one_torch_thread):
    """Warm-up runs, the optimizer over every parameter, the LLM at all its layers: what CUDA runs,
    with small counts on tiny models (the CUDA-only settings themselves need a GPU)."""
    from bench.real_size import PARTS, PRODUCTION_CONFIG, Bench, Counts, run_parts
    from factory.framework.config import load_config

    counts = Counts(reduced=False, tiny=True, sample_steps=2, finetune_steps=2, finetune_batch=2, finetune_views=2,
                    batch=2, filter_candidates=4, filter_batch=2, train_batch=2, assistant_batch=2, image_size=64)
    bench = Bench(torch.device("cpu"), "cpu (tiny models)", counts, load_config(PRODUCTION_CONFIG))
    run_parts(bench, list(PARTS))
    assert bench.figures["train_assistant_sample_s"]["source"] == "measured"  # all layers ran
    for part in ("cafe", "ip_adapter"):  # each times its own decode
        assert bench.figures[f"{part}_decode_s"]["note"] == "measured: VAE decode per candidate"
    assert "AdamW on" not in bench.figures["train_generator_sample_s"]["note"]  # every parameter stepped
    assert bench.figures["profusion_finetune_step_s"]["source"] == "measured"  # the configured batch of 2
    assert all(figure["value"] > 0 for figure in bench.figures.values())


@pytest.mark.parametrize("name", ["sd2_unet", "dinov2_giant", "clip_vit_h14_vision", "llama2_13b"])
def test_filled_models_are_the_library_build_with_every_weight_allocated_and_finite(name):
    """`filled` skips the library's initialisers (most of a paper-size build's time on a CPU) and
    leaves no meta tensor behind, noise in the matrices, zero biases."""
    from bench.published_models import filled

    model = filled(lambda: build(name, tiny=True))
    library = build(name, tiny=True)
    assert type(model) is type(library)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in library.named_parameters()]
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in tensors.values())
    matrices = [p for p in model.parameters() if p.dim() > 1]
    assert all(p.std() > 0 for p in matrices)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert all((p == 0).all() for p in biases)  # Llama has none
