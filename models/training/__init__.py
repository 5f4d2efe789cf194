"""Training G and the assistant heads: the loop every worker runs, the data it reads, the two tasks.

`runner` is how training runs (on Ray Train, or in this process), for the train stage, SID and eval;
this package is also what it runs:
- `job`: the `TrainJob`, everything a worker needs as plain data;
- `loop`: the per-worker loop, its steps and its checkpoints (`factory.dataset.checkpoints` reads them);
- `data`: which samples each rank reads in an epoch (`EpochPlan`), batches, shard prefetch;
- `tasks`: G and the assistant heads as tasks (a model, a per-sample loss, save and load);
- `optimizer_state`: the optimizer state in the name-keyed form every wrapper shares.

Each worker reads its share of the version's shards straight from storage: whole shards
dealt round-robin by rank (in a per-epoch shuffled order) when there are at least as many
shards as workers, otherwise samples dealt round-robin from one per-epoch permutation.
Every sample is trained on once per epoch. Workers with fewer samples in a step pad with a
zero-weight sample, and each worker scales its loss so that DDP's gradient average is the
mean over the real samples of the global batch; all workers take the same number of steps.

Features come from the images on the fly: E(x) (DINOv2), F(x~) (CLIP) and, for G, the VAE
latents of x~. Checkpoints go to `checkpoints/<model>/<run-id>/step-<n>/` in storage
(model folder, optimizer state as safetensors + JSON, `meta.json` written last), with
`latest.json` beside them; a run resumes from `latest.json` at the same step, with the
same weights, optimizer state and data order. Randomness (noise, timesteps, condition
dropout) is drawn per (seed, step, rank), so a resumed run continues as if never stopped.
"""
