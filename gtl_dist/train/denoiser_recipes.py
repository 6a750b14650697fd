"""The recipes of the networks that model text: masked diffusion (``denoiser``, ``vanilla``,
``finetune``, ``finetune_small``, ``scratch_head``, ``ar2diff``) and next-token prediction
(``ar_pretrain``, ``reference_lm``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Optional

import torch

from gtl_dist.diffusion import mdlm_loss, mdlm_terms
from gtl_dist.exports import ExportError
from gtl_dist.objectives import ar_loss
from gtl_dist.stages import HELD_OUT
from gtl_dist.train.engine import compile_step
from gtl_dist.train.recipe import StageContext
from gtl_dist.train.shard_recipe import ShardRecipe, mean_over_ranks, upstream_export, validation_batches


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
