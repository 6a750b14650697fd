"""Evaluation: metrics on sampled sequences and the run report (docs/method.md §10).

Modules, one purpose each; every metric is a pure function of arrays (or texts) so the pipeline
can score one sample shard at a time and merge the mergeable statistics:
  markov     transition-matrix error and exact NLL under the true chains (synthetic task)
  features   the offline text featuriser for MAUVE: TF-IDF of word uni/bi-grams -> PCA by SVD
  mauve      MAUVE: k-means quantisation, divergence frontier, area; length-matched references
  text       classifier domain score, generative perplexity, diversity
  results    one result row per (method, target, fraction, metric); results.csv round trip
  paper      the paper's published numbers, shown where the run reproduces the paper's set-up
  report     report.md, plots, TensorBoard
  samples    reading the sample shards (JSONL) of one (method, target, fraction), validated
  evaluate   the stage: score every sample set (networks passed in as callables), write the report
"""
