"""MAUVE cost at the paper's size, and agreement with the reference quantiser when installed.

    python benchmarks/bench_mauve.py [--n 1024] [--words 350] [--seeds 3]

Texts are synthetic (Zipf-distributed words) so the script needs no corpus. It prints
1. seconds per MAUVE seed for n generated texts, split into TF-IDF, PCA and k-means, and the
   peak memory numpy allocated;
2. if the optional ``mauve-text`` package is importable: MAUVE from our quantiser and from its
   quantiser on the same TF-IDF vectors, for three contamination levels, with the difference
   in units of the spread over seeds (a ratio near or below 1 means they agree), and the time
   ratio reference / ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import tracemalloc

import numpy as np

from gtl_dist.eval.features import principal_components, tfidf_matrix
from gtl_dist.eval.mauve import default_num_buckets, mauve_from_features, quantize
from gtl_dist.log import setup_logging


def zipf_texts(prefix: str, n: int, words: int, rng: np.random.Generator, vocab: int = 5000) -> list[str]:
    ids = rng.zipf(1.2, size=(n, words)) % vocab
    return [" ".join(f"{prefix}{j}" for j in row) for row in ids]


def timed_seed(gen: list[str], ref: list[str], seed: int) -> dict[str, float]:
    t0 = time.perf_counter()
    x = tfidf_matrix(gen + ref)
    t1 = time.perf_counter()
    feats = principal_components(x)
    t2 = time.perf_counter()
    k = default_num_buckets(len(gen), len(ref))
    quantize(feats[:len(gen)], feats[len(gen):], k, seed)
    t3 = time.perf_counter()
    return {"tfidf_s": t1 - t0, "pca_s": t2 - t1, "kmeans_s": t3 - t2, "dims": feats.shape[1], "k": k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="generated texts (references: the same count)")
    ap.add_argument("--words", type=int, default=350, help="words per text (~512 tokens)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gen = zipf_texts("a", args.n, args.words, rng)
    ref = zipf_texts("a", args.n, args.words, rng)
    foreign = zipf_texts("b", args.n, args.words, rng)

    tracemalloc.start()
    t = timed_seed(gen, ref, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = t["tfidf_s"] + t["pca_s"] + t["kmeans_s"]
    print(f"n={args.n} words={args.words}: {total:.1f} s per MAUVE seed (tfidf {t['tfidf_s']:.1f}, "
          f"pca {t['pca_s']:.1f} -> {t['dims']} dims, k-means k={t['k']} {t['kmeans_s']:.1f}); "
          f"peak numpy memory {peak / 2**20:.0f} MiB")

    if importlib.util.find_spec("mauve") is None:
        print("mauve-text not installed: skipping the comparison with the reference quantiser")
        return
    import mauve as reference

    for share in (0.0, 0.25, 0.5):
        m = int(share * args.n)
        mixed = gen[:args.n - m] + foreign[:m]
        x = tfidf_matrix(mixed + ref)
        t0 = time.perf_counter()
        feats = principal_components(x)
        ours = [mauve_from_features(feats[:args.n], feats[args.n:], seed=s) for s in range(args.seeds)]
        t1 = time.perf_counter()
        theirs = [reference.compute_mauve(p_features=x[:args.n], q_features=x[args.n:], seed=s,
                                          verbose=False).mauve for s in range(args.seeds)]
        t2 = time.perf_counter()
        spread = max(np.std(ours), np.std(theirs), 1e-3)
        print(f"contamination {share:.2f}: ours {np.mean(ours):.3f} ± {np.std(ours):.3f}, "
              f"mauve-text {np.mean(theirs):.3f} ± {np.std(theirs):.3f}, "
              f"|difference| / spread = {abs(np.mean(ours) - np.mean(theirs)) / spread:.2f}, "
              f"time reference / ours = {(t2 - t1) / (t1 - t0):.2f}")


if __name__ == "__main__":
    setup_logging()
    main()
