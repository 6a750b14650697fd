"""Samplers (docs/method.md §7): the GTL planner sampler, the guided ancestral sampler with the
stabiliser, exact full-vocabulary guidance, the unguided baseline sampler, and sharded sampling.
The AR sampler lives in ``gtl_dist.sample.ar``."""

from gtl_dist.sample.ancestral import AncestralSampler, StepKernel, exact_guided_sampler, unguided_sampler
from gtl_dist.sample.checks import SamplerConfigError
from gtl_dist.sample.entry import (MethodNetworks, SampleShard, build_sampler, sample_sequences, sample_shard,
                                   shard_seed, shard_sizes, write_sample_shard)
from gtl_dist.sample.guidance import stabilise_mask_mass
from gtl_dist.sample.planner_sampler import PlannerSampler
from gtl_dist.sample.stats import SampleResult, SamplerStats

__all__ = ["AncestralSampler", "MethodNetworks", "PlannerSampler", "SampleResult", "SampleShard",
           "SamplerConfigError", "SamplerStats", "StepKernel", "build_sampler", "exact_guided_sampler",
           "sample_sequences", "sample_shard", "shard_seed", "shard_sizes", "stabilise_mask_mass",
           "unguided_sampler", "write_sample_shard"]
