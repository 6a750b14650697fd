"""Typed run configuration: YAML files -> dataclasses, ``--set key=value`` overrides, hashing.

A run is described by one :class:`RunConfig`. It is built from one or more YAML files (later
files override earlier ones) and ``key.path=value`` overrides, and validated as it is built:
unknown keys are rejected naming the key and the file, values are type-checked, and cross-field
rules (fractions in (0, 1], micro-batch dividing the batch, ...) sit in each section's ``check``.

Defaults are the paper's text settings (docs/method.md); the presets in ``configs/`` shrink them.
The modules: ``rules`` (ConfigError and the rule helpers), ``choices`` (the Literal choices),
``sections`` (data, tokenizer, shards, models, training stages), ``run`` (noise, sampling,
evaluation, protocol, pipeline, cluster and RunConfig), ``hashing`` (what a hash leaves out),
``protocol`` (the hold-out and replicate arithmetic) and ``loading`` (YAML layers, ``--set``).
"""

from gtl_dist.config.choices import (ATTENTION_MODES, CORPORA, DEFAULT_LABEL_SMOOTHING, FEATURIZER_CHOICES,
                                     PLANNER_MODES, POOR_OVERLAP_ACCURACY, SELECTIONS)
from gtl_dist.config.hashing import BUILD_ONLY_KEYS, EXECUTION_ONLY_KEYS, execution_only, is_unset, unset_unhashed
from gtl_dist.config.loading import (check_section, config_from_dict, example_override, load_config,
                                     parse_override, validate, with_model_point)
from gtl_dist.config.protocol import Split, check_split, holdout_count, replicate_start, replicates_disjoint
from gtl_dist.config.rules import ConfigError, require, require_at_least, require_in
from gtl_dist.config.run import (ClusterConfig, EvalConfig, NoiseConfig, PipelineConfig, ProtocolConfig,
                                 RunConfig, SampleConfig)
from gtl_dist.config.sections import (COMPILED_STAGES, AdapterConfig, CountsConfig, DataConfig, LoraConfig,
                                      MarkovConfig, ModelConfig, ModelsConfig, ShardConfig, StagesConfig,
                                      TokenizerConfig, TrainConfig)

__all__ = [
    "ATTENTION_MODES", "BUILD_ONLY_KEYS", "COMPILED_STAGES", "CORPORA", "DEFAULT_LABEL_SMOOTHING",
    "EXECUTION_ONLY_KEYS", "FEATURIZER_CHOICES", "PLANNER_MODES", "POOR_OVERLAP_ACCURACY", "SELECTIONS",
    "AdapterConfig", "ClusterConfig", "ConfigError", "CountsConfig", "DataConfig", "EvalConfig",
    "LoraConfig", "MarkovConfig", "ModelConfig", "ModelsConfig", "NoiseConfig", "PipelineConfig",
    "ProtocolConfig", "RunConfig", "SampleConfig", "ShardConfig", "StagesConfig", "TokenizerConfig",
    "Split", "TrainConfig", "check_section", "check_split", "config_from_dict", "example_override",
    "execution_only", "holdout_count", "load_config", "parse_override", "replicate_start",
    "replicates_disjoint", "require", "require_at_least", "require_in", "unset_unhashed", "is_unset", "validate",
    "with_model_point",
]
