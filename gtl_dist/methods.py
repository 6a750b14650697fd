"""The methods table: every way of producing target samples that a report compares.

Every method is one row of :data:`METHODS` (a :class:`MethodSpec`): the stage whose export is the
denoiser it samples (``SOURCE``: the pipeline's source stage, denoiser or ar2diff), the stage that
guides it (GTL recipes), the ``sample.*`` key of its guidance strength, and the stages whose
calibration the report shows. The rest of the package reads the table: ``config`` takes the
method choices from it, ``stages.StageGraph`` the sample tasks' dependencies and config sections,
``cluster.tasks`` the networks a sample task loads, and ``eval`` the ladder, calibration and cost
rows. Adding a method that samples an existing stage's export is one row here
(docs/architecture.md, "Adding a method").

This module is pure data: it imports nothing from the package, so every other module may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

# In a row's ``model``: the pipeline's source stage (StageGraph.source_stage).
SOURCE = "source_stage"

# The sample.* settings every sample task reads, then those only guided sampling reads (its own
# γ key comes on top). The list of methods is never an input: adding a method must not redraw
# the others.
SAMPLE_SECTIONS = ("noise", "sample.num_samples", "sample.batch_size", "sample.top_k", "sample.steps",
                   "sample.t_end", "sample.seed", "sample.sampler")
GUIDED_SECTIONS = ("sample.n_ratio", "sample.ratio_batch_size", "sample.planner_temperature",
                   "sample.planner_mode", "sample.stabilise")


@dataclass(frozen=True)
class MethodSpec:
    """One compared method."""
    name: str
    # The stage whose export is the denoiser it samples from: SOURCE or a stage name.
    model: str
    # The stage whose export guides the denoiser (docs/method.md §5), for GTL recipes.
    guide: Optional[str] = None
    # The SampleConfig field that holds its guidance strength (guided methods only).
    gamma_key: Optional[str] = None
    # False: one sample set per seed, shared by every target (the unadapted source).
    per_target: bool = True
    # Stages whose edit-difference calibration the Markov report shows (docs/method.md §12).
    calibrated: tuple[str, ...] = ()
    # One line for the report and --help.
    summary: str = ""
    # Needs a known chain (data.corpus: markov).
    markov_only: bool = False

    def __post_init__(self) -> None:
        if (self.guide is None) != (self.gamma_key is None):
            raise ValueError(f"method {self.name}: a guide stage and a gamma_key go together")

    @property
    def guided(self) -> bool:
        return self.guide is not None

    @property
    def sample_sections(self) -> tuple[str, ...]:
        """The config sections its sample tasks read (besides their dependencies')."""
        if not self.guided:
            return SAMPLE_SECTIONS
        return SAMPLE_SECTIONS + GUIDED_SECTIONS + (f"sample.{self.gamma_key}",)

    def gamma(self, sample_cfg: Any) -> float:
        """Its guidance strength under ``sample_cfg`` (a SampleConfig); 0 when unguided."""
        return float(getattr(sample_cfg, self.gamma_key)) if self.gamma_key else 0.0

    def needs_planner(self, sample_cfg: Any) -> bool:
        """Whether its sampler reads a trained planner: guided, planner sampler, and a planner
        mode that reads the network (``uniform`` draws positions without it)."""
        return (self.guided and sample_cfg.sampler == "planner"
                and sample_cfg.planner_mode != "uniform")

    def stages(self) -> tuple[str, ...]:
        """The stages whose exports it samples with (the planner aside)."""
        return tuple(s for s in (self.model, self.guide) if s is not None)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("gtl", model=SOURCE, guide="adapter", gamma_key="gamma", calibrated=("adapter",),
               summary="the frozen source guided by a low-rank adapter on its last hidden state"),
    MethodSpec("gtl_edit", model=SOURCE, guide="edit_ratio", gamma_key="gamma",
               calibrated=("edit_ratio",),
               summary="the frozen source guided by an edit-ratio network of its own"),
    MethodSpec("gtl_paper", model=SOURCE, guide="ratio", gamma_key="paper_gamma",
               calibrated=("classifier_ti", "classifier_td", "ratio"),
               summary="the paper's recipe: domain classifiers, then a sequence-level ratio network"),
    MethodSpec("source", model=SOURCE, per_target=False,
               summary="the frozen source denoiser, unguided"),
    MethodSpec("vanilla", model="vanilla", summary="a denoiser trained on the target data only"),
    MethodSpec("finetune", model="finetune",
               summary="the source denoiser trained further on the target data, all parameters"),
    MethodSpec("finetune_small", model="finetune_small",
               summary="a low-rank fine-tune of the source, as many trained parameters as gtl's guide"),
    MethodSpec("scratch_head", model="scratch_head",
               summary="the edit-ratio network's architecture trained alone on the target data"),
    MethodSpec("counts", model="counts", markov_only=True,
               summary="the target chain from transition counts, uniform prior"),
    MethodSpec("counts_source", model="counts_source", markov_only=True,
               summary="the target chain from transition counts, prior centred on the source chain"),
)}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
