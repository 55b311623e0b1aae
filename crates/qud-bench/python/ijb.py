"""NumPy reference for `cargo xtask bench ijb`: insightface's IJB 1:1 pooling and scoring
(image2template_feature, verification in batches of 100,000 pairs) and scikit-learn's roc_curve on
random 512-d features of the given sizes. Prints the wall time of pooling + scoring + ROC in
seconds. Usage: python ijb.py TEMPLATES IMAGES PAIRS"""

import sys
import time

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize


def image2template_feature(img_feats, templates, medias):
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for k, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for u, ct in zip(unique_medias, counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_feats += [face_feats[ind_m]]
            else:
                media_feats += [np.mean(face_feats[ind_m], axis=0, keepdims=True)]
        template_feats[k] = np.sum(np.array(media_feats), axis=0)
    return normalize(template_feats), unique_templates


def verification(template_norm_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for k, uqt in enumerate(unique_templates):
        template2id[uqt] = k
    score = np.zeros((len(p1),))
    for start in range(0, len(p1), 100000):
        s = np.arange(start, min(start + 100000, len(p1)))
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def main():
    n_templates, n_images, n_pairs = (int(v) for v in sys.argv[1:4])
    rng = np.random.default_rng(0)
    per = n_images // n_templates
    templates = np.repeat(np.arange(n_templates), per)
    medias = templates * 4 + rng.integers(0, 4, len(templates))
    feats = rng.uniform(-1, 1, (len(templates), 512)).astype(np.float32)
    dets = rng.uniform(0.5, 1.0, len(templates)).astype(np.float32)
    p1 = rng.integers(0, n_templates, n_pairs)
    p2 = rng.integers(0, n_templates, n_pairs)
    label = rng.random(n_pairs) < 0.01
    start = time.perf_counter()
    x = feats * dets[:, np.newaxis]
    tnorm, uniq = image2template_feature(x, templates, medias)
    score = verification(tnorm, uniq, p1, p2)
    fpr, tpr, _ = roc_curve(label, score)
    tars = [tpr[np.argmin(np.abs(fpr - far))] for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
    print(f"{time.perf_counter() - start:.3f} {tars[2]:.4f}")


if __name__ == "__main__":
    main()
