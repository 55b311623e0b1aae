"""NumPy reference for `cargo xtask bench ijb`: insightface's IJB 1:1 pooling and scoring
(image2template_feature, verification in batches of 100,000 pairs) and scikit-learn's roc_curve on
random 512-d features of the given sizes. Prints the wall time of pooling + scoring + ROC in
seconds. Usage: python ijb.py TEMPLATES IMAGES PAIRS"""

import importlib.util
import os
import sys
import time

import numpy as np
from sklearn.metrics import roc_curve

# The reference functions of the parity fixture (insightface's algorithm), not a copy of them.
HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "ijb_ref", os.path.join(HERE, "../../qud-eval/fixtures/make_ijb_fixture.py")
)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
image2template_feature, verification = ref.image2template_feature, ref.verification


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
    tars = ref.insightface_tar_at_far(fpr, tpr)
    print(f"{time.perf_counter() - start:.3f} {tars[2]:.4f}")


if __name__ == "__main__":
    main()
