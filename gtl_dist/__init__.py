"""gtl_dist: masked discrete diffusion at cluster scale, with Guided Transfer Learning.

Modules, one purpose each:
  config     typed run configuration (YAML + --set overrides), hashing
  paths      the run-directory layout every stage agrees on
  io         atomic writes and checksums (nothing half-written looks complete)
  log        console logging and progress output
  data/      corpora, tokenizer, WebDataset shards, the resumable shard reader
  models/    the DiT backbone and its heads (denoiser, classifiers, ratio net, planner, AR)
  diffusion  the masking process, noise schedules and training objectives
  sample/    unguided, guided (planner / ancestral / exact) and AR samplers
  train/     distributed set-up, the DeepSpeed engine, checkpoints, the training loop
  eval/      metrics and the report
  cluster/   the pipeline DAG and its submitit launch
"""

__version__ = "0.1.0"
