"""onnxruntime reference for the ONNX rows of `cargo xtask bench backbones`: faces/s of the same
ONNX files on one thread, 16 faces a call, run 8 at a time or one at a time as qud runs them.
Prints one JSON object {"images_per_s": {id: rate}}."""

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))


def rate(path, batch, nhwc, seconds=10):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so)
    shape = (batch, 112, 112, 3) if nhwc else (batch, 3, 112, 112)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    name = sess.get_inputs()[0].name
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        sess.run(None, {name: x})
        runs += 1
    return batch * runs / (time.perf_counter() - start)


def main():
    mfn = os.path.join(HERE, "../../qud-onnx/fixtures/mobilefacenet_d128_bgr_nhwc.onnx")
    out = {
        "onnx_tract_1thread/mobilefacenet_export/batch8": rate(mfn, 8, True),
        "onnx_tract_1thread/mobilefacenet_export/batch1": rate(mfn, 1, True),
    }
    real = os.path.join(HERE, "../../../../shared/models/fr_feature.onnx")
    if os.path.isfile(real):
        out["onnx_tract_1thread/fr_feature/batch1"] = rate(real, 1, False)
    print(json.dumps({"onnxruntime": ort.__version__, "images_per_s": out}))


if __name__ == "__main__":
    main()
