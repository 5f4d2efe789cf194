"""The dataset services stages and commands share: plan, instruction bank, reference sets, the SID pool,
publisher, shards, manifests, eval sets and checkpoints."""
