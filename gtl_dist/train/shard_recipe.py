"""What the stages' recipes share: what each stage trains, on which shards, with which loss.

Every stage's recipe is a :class:`~gtl_dist.train.recipe.Recipe` run by the one shared loop; they
differ only in the network they build, the sets they read and the objective they call.

Which sets each stage trains and validates on, and which export it starts from, are its row's
in the stage table (gtl_dist/stages.py); the recipes below read them.

The low-data protocol (``protocol``, docs/method.md §12). A per-target stage given the n_T target
sequences of its fraction uses no other target data. Under ``selection: holdout`` it trains on the
first n_T − k of them and early-stops / selects its checkpoint on the last k (each scored over
``holdout_views`` masked views per pass); under ``selection: kfold`` a fold's run (``ctx.fold``)
trains on all but its fold's block and validates on that block, and the refit trains on all n_T
(gtl_dist/train/grid.py); under ``selection: budget`` it trains on all n_T for its
fixed number of steps and validates on nothing. The targets' test sets are read by the evaluation
only (and by the evaluator's own models, which validate on them).

``reference_lm`` and ``domain_classifier`` (one per target, no fraction) are not part of any
method: they are the evaluator's instruments, the causal LM whose perplexity on generated text
the report calls generative perplexity and the classifier of the domain score. They train on the
evaluator split (``<target>/evaluator``, and ``source/evaluator`` for the classifier), which no
method trains on, so they judge every method's samples by the same outside standard, and they
validate on the test text, so their selected checkpoints and the report's own figure of their
quality (the reference LM's held-out perplexity) are held out.

Batches: ``global_batch`` counts sequences per optimiser step. Classifiers split each
micro-batch between source and target — half and half when ``train.<stage>.balanced`` (the
default, docs/method.md §4), else in proportion to the two training sets' sizes; the target stream
cycles over its (small) set. The ratio net reads paired batches: ``micro_batch`` source and
``micro_batch`` target sequences per micro-step (docs/method.md §5).

Target sets are small (often one shard, read by sample at any world size), so target loaders read
in the main process (``num_workers=0``); source loaders use ``train.<stage>.num_workers``.

The source denoiser of ``finetune`` and ``planner`` is the export of the pipeline's source stage
(``StageGraph.source_stage`` in gtl_dist/stages.py: ``ar2diff`` when ``pipeline.ar2diff`` is set,
else ``denoiser``).
Upstream exports are checked before training: missing -> which stage to run; trained from other
inputs -> which stage to re-run.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cached_property
from typing import Any, Optional

import torch
from torch import nn

from gtl_dist.config import ConfigError, Split, check_split, replicate_start
from gtl_dist.data import load_run_manifest
from gtl_dist.diffusion import NoiseSchedule, sample_t
from gtl_dist.exports import load_exported, read_export, upstream_export_path
from gtl_dist.models import VocabSpec, build_model
from gtl_dist.models.heads import trainable_parameters
from gtl_dist.objectives import freeze, masked_token_ce
from gtl_dist.stages import HELD_OUT, STAGES, TARGET_TRAIN, StageGraph
from gtl_dist.train import dist
from gtl_dist.train.dist import DistEnv
from gtl_dist.train.recipe import Recipe, StageContext, StepRandom


def upstream_export(ctx: StageContext, stage: str, target: Optional[str] = None,
                    fraction: Optional[float] = None, seed: int = 0) -> dict[str, Any]:
    """The finished export of an upstream stage, checked against the current configuration."""
    return read_export(upstream_export_path(ctx.cfg, ctx.paths, stage, target, fraction, seed,
                                            needed_by=f"stage {ctx.label}"))


class ShardRecipe(Recipe):
    """What the recipes share: manifest, vocabulary, noise schedule, loaders, export info.

    The sets a stage reads, loader name -> set, are its row's ``train_sets`` and ``val_sets``
    (gtl_dist/stages.py; a shared stage run per target reads the target's in place of the
    source's); the loaders follow from them.
    """

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.stage = ctx.stage
        self.spec = STAGES[ctx.stage]
        self.role = self.spec.role
        self.graph = StageGraph(ctx.cfg)
        self.train_sets, self.val_sets = self.graph.stage_sets(ctx.stage)
        self.train_config = getattr(ctx.cfg.train, ctx.stage)
        self.manifest = load_run_manifest(ctx.cfg, ctx.paths.root)
        self.vocab = VocabSpec.from_manifest(self.manifest)
        self.seq_len = self.manifest.seq_len
        if self.seq_len != ctx.cfg.seq_len:
            raise ConfigError(f"{self.manifest.path}: shards hold sequences of {self.seq_len} tokens "
                              f"but the config's sequence length is {ctx.cfg.seq_len}")
        self.tokenizer_hash = self.manifest.tokenizer_hash
        self.target, self.fraction = ctx.target, ctx.fraction
        self._report: Optional[str] = None
        # The fraction's n_T target sequences: the run trains on all but the block `split.held`
        # at offset `split.held_at`, the stage's only validation data (docs/method.md §12).
        # Replicate ctx.seed's draw starts at sample `window`.
        self.split, self.window = Split(0, 0, 0), 0
        if self.target is not None and self.fraction is not None:
            n = self.manifest.num_samples(self.target_train(), self.fraction)
            self.split = check_split(n, ctx.cfg.protocol, f"target '{self.target}' at fraction "
                                                          f"{self.fraction} (n_T = {n}, {self.manifest.path})",
                                     ctx.fold)
            self.window = replicate_start(self.manifest.num_samples(self.target_train()), n, ctx.seed,
                                          ctx.cfg.protocol)

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule, read from the config by the recipes that use it (not the AR ones)."""
        return NoiseSchedule.from_config(self.cfg.noise)

    # -- sets and loaders ----------------------------------------------------------------------
    def target_train(self) -> str:
        return f"{self.target}/train"

    def loader(self, set_name: str, batch_size: int, dist_env: DistEnv, seed: int, *,
               train: bool) -> Any:
        """A loader of one of the row's sets: TARGET_TRAIN is the task's n_T sequences less the
        held-out part; any other name is a set of the shards ("{target}" filled in)."""
        from gtl_dist.data import make_loader
        is_source = set_name.startswith("source/")
        per_fraction = set_name == TARGET_TRAIN
        set_name = self.target_train() if per_fraction else set_name.format(target=self.target)
        return make_loader(self.manifest, set_name, batch_size,
                           fraction=self.fraction if per_fraction else None,
                           drop_last=self.split.held if per_fraction else 0,
                           start=self.window if per_fraction else 0,
                           held_at=self.split.held_at if per_fraction else None,
                           rank=dist_env.rank, world_size=dist_env.world_size,
                           num_workers=self.train_config.num_workers if is_source and train else 0,
                           seed=seed, shuffle=train, infinite=train,
                           expected_tokenizer_hash=self.tokenizer_hash)

    def set_size(self, set_name: str) -> int:
        """Samples in one of the row's sets (TARGET_TRAIN: the task's n_T)."""
        if set_name == TARGET_TRAIN:
            return self.manifest.num_samples(self.target_train(), self.fraction)
        return self.manifest.num_samples(set_name.format(target=self.target))

    def batch_sizes(self, micro_batch: int, train: bool) -> dict[str, int]:
        """Rows per micro-step of each loader: the whole micro-batch, unless a kind splits it."""
        return {name: micro_batch for name in (self.train_sets if train else self.val_sets)}

    def train_loaders(self, micro_batch: int, dist_env: DistEnv, seed: int) -> dict[str, Any]:
        sizes = self.batch_sizes(micro_batch, train=True)
        # The i-th loader shuffles with seed + i: two loaders of one kind draw unrelated orders.
        return {name: self.loader(set_name, sizes[name], dist_env, seed + i, train=True)
                for i, (name, set_name) in enumerate(self.train_sets.items())}

    def validation_loaders(self, micro_batch: int, dist_env: DistEnv) -> Optional[dict[str, Any]]:
        """The validation sets' loaders (held-out sequences as ready batches); None when a set
        is the held-out part and the protocol holds nothing out (selection: budget)."""
        if HELD_OUT in self.val_sets.values() and not self.split.held:
            return None
        sizes = self.batch_sizes(micro_batch, train=False)
        return {name: self.holdout(sizes[name], dist_env) if set_name == HELD_OUT
                else self.loader(set_name, sizes[name], dist_env, 0, train=False)
                for name, set_name in self.val_sets.items()}

    def holdout(self, micro_batch: int, dist_env: DistEnv) -> Optional[list[torch.Tensor]]:
        """This rank's validation batches of the held-out target sequences, every sequence
        ``protocol.holdout_views`` times (masked afresh in each view); None under budget."""
        if not self.split.held:
            return None
        from gtl_dist.data import read_samples
        start = (self.window + self.split.held_at) % self.manifest.num_samples(self.target_train())
        held = read_samples(self.manifest, self.target_train(), start, start + self.split.held,
                            self.tokenizer_hash)
        views = held.repeat(self.cfg.protocol.holdout_views, 1)
        per_rank = len(views) // dist_env.world_size
        if per_rank < 1:
            raise ConfigError(f"protocol.holdout_views: {len(views)} held-out views of target "
                              f"'{self.target}' at fraction {self.fraction} cannot be shared by "
                              f"{dist_env.world_size} ranks; raise protocol.holdout_views")
        # Equal shares: every rank must run the same number of forward passes (ZeRO-3 gathers
        # parameters collectively in each), so up to world_size - 1 views are left out.
        mine = views[dist_env.rank::dist_env.world_size][:per_rank]
        return list(torch.split(mine, micro_batch))

    def t(self, n: int, rng: StepRandom, device: torch.device) -> torch.Tensor:
        """Diffusion times for this micro-batch's share of the global batch."""
        return sample_t(n, rng.shared, t_min=self.cfg.noise.t_min, antithetic=self.cfg.noise.antithetic,
                        rank=rng.slot, world_size=rng.slots, device=device)

    def val_batches(self, loader: Any) -> int:
        return common_batches(loader, self.train_config.val_batches)

    # -- Recipe --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = build_model(self.role, self.cfg, self.vocab)
        # What the stage trains (frozen parts of its network, e.g. a low-rank fine-tune's base,
        # are exported but not trained): the export records it for the report's cost section.
        self.trainable = trainable_parameters(model)
        return model

    def export_info(self) -> dict[str, Any]:
        return {"role": self.role, "config": self.cfg.to_dict(), "vocab": asdict(self.vocab),
                "seq_len": self.seq_len, "trainable_parameters": self.trainable}

    def held_out_ce(self, model: nn.Module, rng: StepRandom, loaders: dict[str, Any],
                    reference: Optional[nn.Module] = None) -> dict[str, float]:
        """The per-target selection rule (docs/method.md §12): masked-token cross-entropy of the
        held-out views at uniform mask rates, under the prediction the method samples from."""
        batches = validation_batches(loaders[next(iter(self.val_sets))], self.train_config.val_batches, rng)
        return mean_over_ranks([masked_token_ce(model, x0, self.t(x0.shape[0], rng, x0.device), rng.local,
                                                vocab=self.vocab, reference=reference)[1] for x0 in batches])

    def validation_report(self) -> Optional[str]:
        return self._report


def validation_batches(source: Any, limit: int, rng: StepRandom) -> list[torch.Tensor]:
    """Token batches of one validation pass on the device: every held-out batch (a list), or at
    most ``limit`` batches of a shard loader."""
    device = rng.local.device
    if isinstance(source, list):
        return [x.to(device) for x in source[:limit]]
    return [b["tokens"].to(device) for _, b in zip(range(common_batches(source, limit)), source)]


def common_batches(loader: Any, limit: int) -> int:
    """Batches of a validation pass that every rank has: a finite pass gives ranks counts that differ
    by one, and every rank must run the same number of forward passes (ZeRO-3 gathers parameters
    collectively in each)."""
    count = min(limit, loader.batches_per_epoch)
    if torch.distributed.is_initialized():
        count = int(dist.all_reduce([count], "min")[0])
    return count


def mean_over_ranks(per_batch: list[dict[str, float]]) -> dict[str, float]:
    """Average statistics over this rank's batches, then over ranks (equal batch counts)."""
    keys = sorted(per_batch[0])
    local = [sum(b[k] for b in per_batch) / len(per_batch) for k in keys]
    world = torch.distributed.get_world_size()
    return {k: v / world for k, v in zip(keys, dist.all_reduce(local, "sum"))}


def frozen_export(ctx: StageContext, stage: str, target: Optional[str] = None,
                  fraction: Optional[float] = None, seed: int = 0) -> nn.Module:
    return freeze(load_exported(upstream_export_path(ctx.cfg, ctx.paths, stage, target, fraction, seed,
                                                     needed_by=f"stage {ctx.label}")))


def paired_validation_batches(loaders: dict[str, Any], limit: int,
                              rng: StepRandom) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source, target) batch pairs of one validation pass: source/test against the held-out
    target views, as many pairs as the shorter side has."""
    targets = validation_batches(loaders["target"], limit, rng)
    sources = validation_batches(loaders["source"], max(len(targets), 1), rng)
    return list(zip(sources, targets))
