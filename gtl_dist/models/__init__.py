"""The DiT backbone and the method's networks (docs/method.md §2, §4-§6, §11)."""

from gtl_dist.models.dit import DiT, KVCache, check_token_ids
from gtl_dist.models.heads import (ARLM, ROLES, Denoiser, EditRatioNet, Planner, RatioNet,
                                   SequenceClassifier, VocabSpec, build_model, check_compatible,
                                   count_parameters, subs_log_probs)

__all__ = ["ARLM", "DiT", "Denoiser", "EditRatioNet", "KVCache", "Planner", "ROLES", "RatioNet",
           "SequenceClassifier", "VocabSpec", "build_model", "check_compatible", "check_token_ids",
           "count_parameters", "subs_log_probs"]
