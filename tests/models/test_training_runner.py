"""How Ray Train's workers are sized (models/training/runner.py)."""

from factory.framework.config import load_config
from models.training.runner import scaling


def test_training_workers_ask_for_their_memory_and_node_type():
    config = load_config("configs/production.yaml")
    scaling_config = scaling(config.train)
    assert scaling_config.num_workers == 8 and scaling_config.use_gpu
    assert scaling_config.resources_per_worker == {
        "CPU": 1.0, "GPU": 1.0, "a100_80g": 1.0, "memory": config.train.memory_per_worker}


def test_a_worker_without_resources_or_memory_takes_ray_trains_defaults():
    config = load_config(None, ["train.memory_per_worker=0"])
    assert scaling(config.train).resources_per_worker is None
