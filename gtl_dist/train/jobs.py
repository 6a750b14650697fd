"""The stages' recipes: what each stage trains, on which shards, with which loss.

Every stage's recipe is a :class:`~gtl_dist.train.recipe.Recipe` run by the one shared loop; they
differ only in the network they build, the sets they read and the objective they call.

Which sets each stage trains and validates on, and which export it starts from, are its row's
in the stage table (gtl_dist/stages.py); the recipes below read them.

The low-data protocol (``protocol``, docs/method.md §12). A per-target stage given the n_T target
sequences of its fraction uses no other target data. Under ``selection: holdout`` it trains on the
first n_T − k of them and early-stops / selects its checkpoint on the last k (each scored over
``holdout_views`` masked views per pass); under ``selection: budget`` it trains on all n_T for its
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

import math
import os
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from gtl_dist.config import ConfigError, RunConfig, TrainConfig, check_holdout, replicate_start
from gtl_dist.data import load_run_manifest
from gtl_dist.diffusion import NoiseSchedule, mdlm_loss, mdlm_terms, sample_t
from gtl_dist.log import get_logger
from gtl_dist.models import VocabSpec, build_model
from gtl_dist.models.adapter import AdaptedDenoiser
from gtl_dist.models.heads import trainable_parameters
from gtl_dist.objectives import (ar_loss, classifier_td_loss, classifier_ti_loss, edit_ratio_loss, freeze,
                                 masked_token_ce,
                                 overlap_report, planner_loss, ratio_loss)
from gtl_dist.paths import RunPaths, task_name
from gtl_dist.stages import (HELD_OUT, PER_FRACTION, PER_TARGET, STAGES, TARGET_TRAIN,
                              StageGraph, stage_input_hash)
from gtl_dist.train import dist
from gtl_dist.train.dist import DistEnv
from gtl_dist.train.checkpoint import retire_stale
from gtl_dist.train.engine import compile_step
from gtl_dist.exports import (ExportError, load_exported, read_export, read_export_meta,
                                   upstream_export_path, write_export)
from gtl_dist.train.loop import execute
from gtl_dist.train.recipe import Recipe, StageContext, StageResult, StepRandom

log = get_logger("train.jobs")


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
        # The fraction's n_T target sequences: the first n_train are trained on, the last
        # `held_out` are the stage's only validation data (docs/method.md §12).
        # Replicate ctx.seed's draw starts at sample `window`.
        self.n_train, self.held_out, self.window = 0, 0, 0
        if self.target is not None and self.fraction is not None:
            n = self.manifest.num_samples(self.target_train(), self.fraction)
            self.n_train, self.held_out = check_holdout(
                n, ctx.cfg.protocol, f"target '{self.target}' at fraction {self.fraction} "
                                     f"(n_T = {n}, {self.manifest.path})")
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
                           drop_last=self.held_out if per_fraction else 0,
                           start=self.window if per_fraction else 0,
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
        if HELD_OUT in self.val_sets.values() and not self.held_out:
            return None
        sizes = self.batch_sizes(micro_batch, train=False)
        return {name: self.holdout(sizes[name], dist_env) if set_name == HELD_OUT
                else self.loader(set_name, sizes[name], dist_env, 0, train=False)
                for name, set_name in self.val_sets.items()}

    def holdout(self, micro_batch: int, dist_env: DistEnv) -> Optional[list[torch.Tensor]]:
        """This rank's validation batches of the held-out target sequences, every sequence
        ``protocol.holdout_views`` times (masked afresh in each view); None under budget."""
        if not self.held_out:
            return None
        from gtl_dist.data import read_samples
        start = (self.window + self.n_train) % self.manifest.num_samples(self.target_train())
        held = read_samples(self.manifest, self.target_train(), start, start + self.held_out,
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


# ----------------------------------------------------------------------------------------------
# Masked diffusion: denoiser, vanilla, finetune, ar2diff
# ----------------------------------------------------------------------------------------------

class DiffusionRecipe(ShardRecipe):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        self.terms: Optional[Callable] = None  # mdlm_loss's network and loss: compile() sets it
        self.init_from: Optional[dict] = None
        if self.spec.init is not None:
            self.init_from = upstream_export(ctx, self.graph.method_stage(self.spec.init))
        if self.init_from is not None:
            meta = self.init_from["meta"]
            if meta["config"]["models"]["denoiser"] != asdict(ctx.cfg.models.denoiser) or \
                    meta["vocab"] != asdict(self.vocab):
                raise ExportError(f"{meta['stage']} export: its network (models.denoiser, vocabulary) "
                                  f"differs from this run's; re-run stage {meta['stage']}")

    def initial_weights(self) -> Optional[dict[str, torch.Tensor]]:
        # AR2Diff: the causal LM's weights, now run bidirectionally (same parameter names).
        return None if self.init_from is None else self.init_from["state_dict"]

    def compile(self):
        # Only the network and the loss: the masking draws and the data check stay eager.
        self.terms = compile_step(mdlm_terms)

    def training_loss(self, model, batches, rng):
        x0 = batches["train"]["tokens"]
        return mdlm_loss(model, x0, self.schedule, self.t(x0.shape[0], rng, x0.device), rng.local,
                         vocab=self.vocab, terms=self.terms)

    def validate(self, model, rng, loaders, dist_env):
        if HELD_OUT in self.val_sets.values():  # a per-target stage: the selection rule
            return self.held_out_ce(model, rng, loaders)
        stats = []
        for x0 in validation_batches(loaders["val"], self.train_config.val_batches, rng):
            stats.append(mdlm_loss(model, x0, self.schedule, self.t(x0.shape[0], rng, x0.device),
                                   rng.local, vocab=self.vocab)[1])
        return mean_over_ranks(stats)


class ARRecipe(ShardRecipe):
    """Next-token prediction: ``ar_pretrain`` on the source, ``reference_lm`` on the target's
    evaluator split (see the module docstring)."""

    def training_loss(self, model, batches, rng):
        return ar_loss(model, batches["train"]["tokens"], pad_id=self.vocab.pad_id)

    def validate(self, model, rng, loaders, dist_env):
        loader = loaders["val"]
        stats = [ar_loss(model, b["tokens"].to(rng.local.device), pad_id=self.vocab.pad_id)[1]
                 for _, b in zip(range(self.val_batches(loader)), loader)]
        return mean_over_ranks(stats)


# ----------------------------------------------------------------------------------------------
# Domain classifiers
# ----------------------------------------------------------------------------------------------

def check_classifier_micro_batch(tc: TrainConfig, stage: str, micro_batch: int) -> None:
    """A classifier micro-batch must hold a source and a target sequence, half and half when
    balanced (also checked at submit time, by the launcher's preflight)."""
    key = f"train.{stage}"
    if micro_batch < 2:
        raise ConfigError(f"{key}.global_batch: a classifier micro-batch of {micro_batch} cannot hold "
                          f"both a source and a target sequence; raise global_batch")
    if tc.balanced and micro_batch % 2:
        raise ConfigError(f"{key}.global_batch: balanced batches split each micro-batch in "
                          f"half, and {micro_batch} is odd; use an even micro-batch")


class ClassifierRecipe(ShardRecipe):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        self.time_dependent = self.role == "classifier_td"
        self.smoothing = list(self.train_config.label_smoothing) or None

    def batch_sizes(self, micro_batch: int, train: bool) -> dict[str, int]:
        """Source and target rows of one micro-batch; validation pairs half a micro-batch each."""
        if not train:
            return {"source": max(1, micro_batch // 2), "target": max(1, micro_batch // 2)}
        check_classifier_micro_batch(self.train_config, self.stage, micro_batch)
        if self.train_config.balanced:
            return {"source": micro_batch // 2, "target": micro_batch // 2}
        n_s, n_t = self.set_size(self.train_sets["source"]), self.set_size(self.train_sets["target"])
        n_source = min(micro_batch - 1, max(1, round(micro_batch * n_s / (n_s + n_t))))
        return {"source": n_source, "target": micro_batch - n_source}

    def objective(self, model, xs, xt, rng):
        if self.time_dependent:
            t = self.t(xs.shape[0] + xt.shape[0], rng, xs.device)
            return classifier_td_loss(model, xs, xt, self.schedule, t, rng.local,
                                      mask_id=self.vocab.mask_id, label_smoothing=self.smoothing)
        return classifier_ti_loss(model, xs, xt, rng.local, label_smoothing=self.smoothing)

    def clean_logits(self, model, x):
        """Logits on clean sequences (the time-dependent one at t = t_min): what separates the
        domains, and -logit is the ratio target."""
        if not self.time_dependent:
            return model(x).float()
        t = torch.full((x.shape[0],), self.cfg.noise.t_min, device=x.device)
        return model(x, self.schedule.sigma(t)).float()

    def training_loss(self, model, batches, rng):
        return self.objective(model, batches["source"]["tokens"], batches["target"]["tokens"], rng)

    def validate(self, model, rng, loaders, dist_env):
        stats, logits_s, logits_t = [], [], []
        for xs, xt in paired_validation_batches(loaders, self.train_config.val_batches, rng):
            stats.append(self.objective(model, xs, xt, rng)[1])
            logits_s.append(self.clean_logits(model, xs).cpu())
            logits_t.append(self.clean_logits(model, xt).cpu())
        values = mean_over_ranks(stats)
        all_s = torch.cat(dist.all_gather_object(torch.cat(logits_s)))
        all_t = torch.cat(dist.all_gather_object(torch.cat(logits_t)))
        if dist_env.is_main:
            report = overlap_report(all_s, all_t)
            values.update({f"overlap/{k}": float(v) for k, v in report.items()})
            self._report = "\n".join(f"- {k}: {v}" for k, v in report.items())
        return values


# ----------------------------------------------------------------------------------------------
# Ratio network and planner (frozen teachers)
# ----------------------------------------------------------------------------------------------

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


class RatioRecipe(ShardRecipe):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        self.classifier_ti = frozen_export(ctx, "classifier_ti", ctx.target, ctx.fraction, ctx.seed)
        self.classifier_td = frozen_export(ctx, "classifier_td", ctx.target, ctx.fraction, ctx.seed)

    def prepare(self, device):
        self.classifier_ti.to(device)
        self.classifier_td.to(device)

    def objective(self, model, xs, xt, rng):
        t_source = self.t(xs.shape[0], rng, xs.device)
        t_target = self.t(xt.shape[0], rng, xt.device)
        return ratio_loss(model, self.classifier_ti, self.classifier_td, xs, xt, self.schedule,
                          t_source, t_target, rng.local, eta_cycle=self.train_config.eta_cycle,
                          mask_id=self.vocab.mask_id)

    def training_loss(self, model, batches, rng):
        return self.objective(model, batches["source"]["tokens"], batches["target"]["tokens"], rng)

    def validate(self, model, rng, loaders, dist_env):
        return mean_over_ranks([self.objective(model, xs, xt, rng)[1] for xs, xt in
                                paired_validation_batches(loaders, self.train_config.val_batches, rng)])


class EditRatioRecipe(ShardRecipe):
    """gtl's edit-ratio network (docs/method.md §5): fitted so that the frozen source denoiser,
    reweighted by it, predicts the target's masked tokens."""

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        self.denoiser = frozen_export(ctx, self.graph.source_stage)

    def prepare(self, device):
        self.denoiser.to(device)

    def objective(self, model, x0, rng):
        return edit_ratio_loss(model, self.denoiser, x0, self.t(x0.shape[0], rng, x0.device), rng.local,
                               mask_id=self.vocab.mask_id, pad_id=self.vocab.pad_id)

    def training_loss(self, model, batches, rng):
        return self.objective(model, batches["target"]["tokens"], rng)

    def validate(self, model, rng, loaders, dist_env):
        return mean_over_ranks([self.objective(model, x0, rng)[1] for x0 in
                                validation_batches(loaders["target"], self.train_config.val_batches, rng)])


class AdapterRecipe(ShardRecipe):
    """gtl's guide adapter (docs/method.md §5a): fitted so that the frozen source denoiser,
    edited through its own last hidden state, predicts the target's masked tokens."""

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        self.denoiser = frozen_export(ctx, self.graph.source_stage)

    def prepare(self, device):
        self.denoiser.to(device)

    def training_loss(self, model, batches, rng):
        x0 = batches["train"]["tokens"]
        return masked_token_ce(AdaptedDenoiser(self.denoiser, model), x0, self.t(x0.shape[0], rng, x0.device),
                               rng.local, vocab=self.vocab)

    def validate(self, model, rng, loaders, dist_env):
        return self.held_out_ce(AdaptedDenoiser(self.denoiser, model), rng, loaders, reference=self.denoiser)


class PlannerRecipe(ShardRecipe):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        # Source-only by default (docs/method.md §6); pipeline.planner_scope=per_target trains one
        # per (target, fraction) on target data (its row's sets, the target's in place of the source's).
        self.denoiser = frozen_export(ctx, self.graph.source_stage)

    def prepare(self, device):
        self.denoiser.to(device)

    def objective(self, model, x0, rng):
        return planner_loss(model, self.denoiser, x0, self.schedule, self.t(x0.shape[0], rng, x0.device),
                            rng.local, mask_id=self.vocab.mask_id)

    def training_loss(self, model, batches, rng):
        return self.objective(model, batches["train"]["tokens"], rng)

    def validate(self, model, rng, loaders, dist_env):
        return mean_over_ranks([self.objective(model, x0, rng)[1] for x0 in
                                validation_batches(loaders["val"], self.train_config.val_batches, rng)])


RECIPES = {"denoiser": DiffusionRecipe, "vanilla": DiffusionRecipe, "finetune": DiffusionRecipe,
           "finetune_small": DiffusionRecipe, "scratch_head": DiffusionRecipe,
           "ar2diff": DiffusionRecipe, "ar_pretrain": ARRecipe, "reference_lm": ARRecipe,
           "classifier_ti": ClassifierRecipe, "classifier_td": ClassifierRecipe, "ratio": RatioRecipe,
           "domain_classifier": ClassifierRecipe,
           "edit_ratio": EditRatioRecipe, "adapter": AdapterRecipe, "planner": PlannerRecipe}
# The stages of role "chain" (counts, counts_source) have a closed form and no recipe: run_stage
# fits them without the loop (gtl_dist/train/counts.py).


def check_stage_args(cfg: RunConfig, stage: str, target: Optional[str],
                     fraction: Optional[float], seed: int = 0) -> None:
    """Refuse a stage/target/fraction combination the stage is not trained for, saying which
    arguments it takes."""
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: not a stage; choose one of {', '.join(STAGES)}")
    targets = f"one of {', '.join(cfg.targets)}"
    fractions = f"one of {', '.join(map(str, cfg.data.target_fractions))}"
    scope = StageGraph(cfg).scope(stage)
    if scope == PER_FRACTION:
        if target is None or fraction is None:
            raise ConfigError(f"stage {stage} is trained per target and fraction: pass --target "
                              f"({targets}) and --fraction ({fractions})")
    elif scope == PER_TARGET:
        if target is None or fraction is not None:
            raise ConfigError(f"stage {stage} is trained once per target, on its evaluator split "
                              f"and no fraction of its training data: pass --target ({targets}) "
                              f"and no --fraction")
    elif target is not None or fraction is not None:
        key = STAGES[stage].scope_key
        raise ConfigError(f"stage {stage} is trained once per run (on source data); drop --target and "
                          f"--fraction" + (f" (or set {key}=per_target)" if key else ""))
    if target is not None and target not in cfg.targets:
        raise ConfigError(f"--target {target!r}: this config's targets are {', '.join(cfg.targets)}")
    if fraction is not None and fraction not in cfg.data.target_fractions:
        raise ConfigError(f"--fraction {fraction}: not in data.target_fractions "
                          f"{cfg.data.target_fractions}")
    if seed and fraction is None:
        raise ConfigError(f"--seed {seed}: only per-target stages are replicated over pipeline.seeds; "
                          f"drop --seed for stage {stage}")
    if fraction is not None and seed not in cfg.pipeline.seeds_at(fraction):
        raise ConfigError(f"--seed {seed}: not among the replicates {cfg.pipeline.seeds_at(fraction)} of "
                          f"fraction {fraction} (pipeline.seeds, pipeline.replicates_at)")


def run_stage(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str] = None,
              fraction: Optional[float] = None, seed: int = 0) -> StageResult:
    """Train one stage (this process is one rank of the job) and export it.

    Resumes from the newest committed checkpoint; returns at once when the stage already
    finished with the same inputs; returns ``status="preempted"`` after a preemption signal
    (unless an earlier handler, e.g. submitit's, took over and exited). With
    ``train.<stage>.lr_grid`` it trains once per learning rate and exports the best run
    (:func:`run_lr_grid`).
    """
    check_stage_args(cfg, stage, target, fraction, seed)
    RunPaths(run_dir).root.mkdir(parents=True, exist_ok=True)
    input_hash = stage_input_hash(cfg, stage, target, fraction, seed)
    if STAGES[stage].role == "chain":  # closed form, no optimiser
        from gtl_dist.train.counts import fit_counts
        return fit_counts(cfg, run_dir, stage, target, fraction, seed, input_hash)
    if getattr(cfg.train, stage).lr_grid:
        return run_lr_grid(cfg, run_dir, stage, target, fraction, seed, input_hash)
    return execute(cfg, run_dir, stage, target, fraction, input_hash, RECIPES[stage], seed)


def run_lr_grid(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str],
                fraction: Optional[float], seed: int, input_hash: str) -> StageResult:
    """One run per learning rate of ``train.<stage>.lr_grid``, each in its own folder (lr-<value>/,
    resumable on its own), then the export of the run whose best held-out validation loss is
    lowest becomes the stage's export, its metadata listing every run (docs/method.md §12)."""
    paths = RunPaths(run_dir)
    final = paths.export(stage, target, fraction, seed)
    meta = read_export_meta(final)
    if meta and meta.get("input_hash") == input_hash and meta.get("finished"):
        return StageResult("finished", stage, target, fraction, meta["trained_steps"], input_hash,
                           export=final, val_loss=meta.get("val_loss"), best_step=meta.get("step"))
    tc = getattr(cfg.train, stage)
    runs = {}
    for lr in tc.lr_grid:
        one = replace(cfg, train=replace(cfg.train, **{stage: replace(tc, lr=lr, lr_grid=None)}))
        variant = f"lr-{lr:g}"
        retire_stale_variant(paths, stage, target, fraction, seed, variant, input_hash)
        result = execute(one, run_dir, stage, target, fraction, input_hash, RECIPES[stage], seed,
                         variant=variant)
        if result.status != "finished":
            return result
        runs[lr] = result
    finite = {lr: r for lr, r in runs.items() if r.val_loss is not None and math.isfinite(r.val_loss)}
    if not finite:
        raise ConfigError(f"train.{stage}.lr_grid: no run of {tc.lr_grid} reached a finite held-out "
                          f"validation loss at {task_name(stage, target=target, fraction=fraction, seed=seed)}; "
                          f"lower the learning rates")
    best_lr = min(finite, key=lambda lr: finite[lr].val_loss)
    best = runs[best_lr]
    if int(os.environ.get("RANK", "0")) == 0:
        chosen = read_export(best.export)
        grid = [{"lr": lr, "val_loss": r.val_loss, "step": r.best_step, "trained_steps": r.step}
                for lr, r in runs.items()]
        write_export(final, chosen["state_dict"], {**chosen["meta"], "lr_grid": grid})
        log.info("%s: lr %g kept (held-out loss %s; grid %s)", task_name(stage, target=target,
                 fraction=fraction, seed=seed), best_lr, best.val_loss,
                 ", ".join(f"{g['lr']:g}: {g['val_loss']}" for g in grid))
    return StageResult("finished", stage, target, fraction, best.step, input_hash, export=final,
                       val_loss=best.val_loss, best_step=best.best_step)


def retire_stale_variant(paths: RunPaths, stage: str, target: Optional[str], fraction: Optional[float],
                         seed: int, variant: str, input_hash: str) -> None:
    """A grid run whose checkpoints were made with other inputs (a run directory that adopted a
    changed config; the launcher retires the stage's own checkpoints, not its runs' folders)
    starts afresh; its old checkpoints and train log are kept aside, as the launcher keeps a
    stage's. Only this task's job writes these folders, so it may move them itself."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    moved = retire_stale(paths.checkpoints(stage, target, fraction, seed, variant), input_hash)
    if moved is not None:
        old_log = paths.stage(stage, target, fraction, seed, variant) / "train_log.jsonl"
        if old_log.exists():
            old_log.rename(moved / old_log.name)
        log.info("%s/%s: checkpoints made with other inputs kept as %s; the run starts afresh",
                 task_name(stage, target=target, fraction=fraction, seed=seed), variant, moved)
