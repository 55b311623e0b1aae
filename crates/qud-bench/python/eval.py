"""NumPy + scikit-learn reference for `cargo xtask bench eval`: insightface's verification.py
protocol (crates/qud-eval/fixtures/make_fixtures.py `reference`) on the embedding files the Rust
benchmark wrote. Prints {pairs: seconds per evaluation}."""

import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("ref", os.path.join(HERE, "../../qud-eval/fixtures/make_fixtures.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def main():
    data = sys.argv[1]
    out = {}
    for pairs in (6000, 7000):
        emb = np.fromfile(os.path.join(data, f"pairs_{pairs}.f32"), dtype="<f4").reshape(-1, 512).astype(np.float64)
        issame = np.fromfile(os.path.join(data, f"pairs_{pairs}.issame"), dtype=np.uint8).astype(bool)
        start = time.perf_counter()
        ref.reference(emb, issame)
        out[str(pairs)] = time.perf_counter() - start
    print(json.dumps({"seconds": out}))


if __name__ == "__main__":
    main()
