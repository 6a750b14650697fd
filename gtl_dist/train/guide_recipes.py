"""The recipes of the guides: the domain classifiers, the ratio and edit-ratio networks, the guide
adapter and the planner, each trained against frozen upstream exports."""

from __future__ import annotations

import torch

from gtl_dist.config import ConfigError, TrainConfig
from gtl_dist.models.adapter import AdaptedDenoiser
from gtl_dist.objectives import (classifier_td_loss, classifier_ti_loss, edit_ratio_loss, masked_token_ce,
                                 overlap_report, planner_loss, ratio_loss)
from gtl_dist.train import dist
from gtl_dist.train.recipe import StageContext
from gtl_dist.train.shard_recipe import (ShardRecipe, frozen_export, mean_over_ranks, paired_validation_batches,
                                         validation_batches)


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


class FrozenSourceRecipe(ShardRecipe):
    """A recipe trained against the frozen export of the pipeline's source stage (``ar2diff`` or
    ``denoiser``): ``self.denoiser``, moved to the training device with the model."""

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        self.denoiser = frozen_export(ctx, self.graph.source_stage)

    def prepare(self, device):
        self.denoiser.to(device)


class EditRatioRecipe(FrozenSourceRecipe):
    """gtl's edit-ratio network (docs/method.md §5): fitted so that the frozen source denoiser,
    reweighted by it, predicts the target's masked tokens."""

    def objective(self, model, x0, rng):
        return edit_ratio_loss(model, self.denoiser, x0, self.t(x0.shape[0], rng, x0.device), rng.local,
                               mask_id=self.vocab.mask_id, pad_id=self.vocab.pad_id)

    def training_loss(self, model, batches, rng):
        return self.objective(model, batches["target"]["tokens"], rng)

    def validate(self, model, rng, loaders, dist_env):
        return mean_over_ranks([self.objective(model, x0, rng)[1] for x0 in
                                validation_batches(loaders["target"], self.train_config.val_batches, rng)])


class AdapterRecipe(FrozenSourceRecipe):
    """gtl's guide adapter (docs/method.md §5a): fitted so that the frozen source denoiser,
    edited through its own last hidden state, predicts the target's masked tokens."""

    def training_loss(self, model, batches, rng):
        x0 = batches["train"]["tokens"]
        return masked_token_ce(AdaptedDenoiser(self.denoiser, model), x0, self.t(x0.shape[0], rng, x0.device),
                               rng.local, vocab=self.vocab)

    def validate(self, model, rng, loaders, dist_env):
        return self.held_out_ce(AdaptedDenoiser(self.denoiser, model), rng, loaders, reference=self.denoiser)


class PlannerRecipe(FrozenSourceRecipe):
    """The planner (docs/method.md §6): source-only by default; pipeline.planner_scope=per_target
    trains one per (target, fraction) on target data (its row's sets, the target's in place of the
    source's)."""

    def objective(self, model, x0, rng):
        return planner_loss(model, self.denoiser, x0, self.schedule, self.t(x0.shape[0], rng, x0.device),
                            rng.local, mask_id=self.vocab.mask_id)

    def training_loss(self, model, batches, rng):
        return self.objective(model, batches["train"]["tokens"], rng)

    def validate(self, model, rng, loaders, dist_env):
        return mean_over_ranks([self.objective(model, x0, rng)[1] for x0 in
                                validation_batches(loaders["val"], self.train_config.val_batches, rng)])
