"""t-SNE wall time on N x 2048 features (the flatten layer of the 3-layer CNNs): cifarlab's path
(PCA to 50, openTSNE FFT, all cores) at 10,000 and 40,000 points, and scikit-learn's TSNE on the
same 10,000 for comparison (--sklearn). Features are 10 Gaussian clusters with heavy overlap (k-NN
accuracy about 0.99 in the 50 PCA dimensions, silhouette about 0.08), so the k-NN accuracy and
silhouette of each embedding say whether it kept the structure. Prints one JSON object.

    python benchmarks/tsne.py [--sizes 10000 40000] [--sklearn]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from cifarlab.analysis.embed import pca, separation, tsne


def features(n: int, dims: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, size=(10, dims)).astype(np.float32)
    labels = rng.integers(0, 10, size=n)
    noise = rng.normal(0, 9.0, size=(n, dims)).astype(np.float32)
    return (centers[labels] + noise).astype(np.float16), labels


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--sklearn", action="store_true", help="also time scikit-learn's TSNE at the first size")
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        x, labels = features(n)
        embedding, seconds = timed(tsne, x.astype(np.float32), seed=0)
        results.append({"n": n, "dims": x.shape[1], "method": "cifarlab (PCA 50 + openTSNE FFT)",
                        "seconds": round(seconds, 2), **separation(embedding, labels)})
    if args.sklearn:
        from sklearn.manifold import TSNE

        n = args.sizes[0]
        x, labels = features(n)
        reduced = pca(x.astype(np.float32), 50)
        model = TSNE(n_components=2, init="pca", random_state=0, n_jobs=os.cpu_count())
        embedding, seconds = timed(model.fit_transform, reduced)
        results.append({"n": n, "dims": x.shape[1], "method": "scikit-learn TSNE (Barnes-Hut) after the same PCA",
                        "seconds": round(seconds, 2), **separation(embedding, labels)})
    print(json.dumps({"benchmark": "tsne", "cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
