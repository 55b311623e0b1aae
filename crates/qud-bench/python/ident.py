"""NumPy reference for `cargo xtask bench ident`: the MegaFace scoring of qud_eval::ident
(each probe's best distractor, the impostor scores above the FAR 1e-6 threshold kept by
partition) on blocks of float32 distractors, timed. Prints the seconds.

usage: ident.py PROBES IDENTITIES DISTRACTORS DIM BLOCK
"""
import sys
import time
import numpy as np

probes_n, ids, distractors, dim, block = map(int, sys.argv[1:6])
rng = np.random.default_rng(0)
centres = rng.standard_normal((ids, dim), dtype=np.float32)
probes = 2.0 * rng.standard_normal((probes_n, dim), dtype=np.float32) + centres[np.arange(probes_n) % ids]
probes /= np.linalg.norm(probes, axis=1, keepdims=True)
labels = np.arange(probes_n) % ids
pool = [rng.standard_normal((block, dim), dtype=np.float32) for _ in range(16)]
pool = [b / np.linalg.norm(b, axis=1, keepdims=True) for b in pool]

start = time.perf_counter()
genuine = probes @ probes.T
mates = (labels[:, None] == labels[None, :]) & ~np.eye(probes_n, dtype=bool)
keep = int(np.floor(1e-6 * probes_n * distractors)) + 1
best = np.full(probes_n, -np.inf, dtype=np.float32)
top = np.empty(0, dtype=np.float32)
bound = -np.inf
for b in range((distractors + block - 1) // block):
    rows = min(block, distractors - b * block)
    scores = probes @ pool[b % 16][:rows].T
    best = np.maximum(best, scores.max(axis=1))
    top = np.concatenate([top, scores[scores > bound]])
    if top.size > keep:
        top = top[np.argpartition(-top, keep - 1)[:keep]]
        bound = top.min()
rank1 = (genuine[mates] > np.repeat(best, mates.sum(axis=1))).mean()
threshold = np.sort(top)[::-1][keep - 1]
tar = (genuine[mates] > threshold).mean()
print(time.perf_counter() - start, rank1, tar)
