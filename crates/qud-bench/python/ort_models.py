"""onnxruntime reference for `cargo xtask bench onnx`: faces/s of the same ONNX files with every
core (intra-op threads = CPU count), 128 faces a call, at the batch sizes a user would run.
Prints one JSON object {"onnxruntime": version, "threads": n, "images_per_s": {id: rate}}.

`ort_models.py --make DIR` first writes DIR/mobilefacenet_d128_dynamic_quant.onnx: the exported
MobileFaceNet fixture quantised by onnxruntime's `quantize_dynamic` (DynamicQuantizeLinear,
ConvInteger, MatMulInteger), the form in which int8 face models are usually shipped."""

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
FACES = 128
MFN = os.path.join(HERE, "../../qud-onnx/fixtures/mobilefacenet_d128_bgr_nhwc.onnx")
QUANT = "mobilefacenet_d128_dynamic_quant.onnx"


def make(directory):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.makedirs(directory, exist_ok=True)
    quantize_dynamic(MFN, os.path.join(directory, QUANT),
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                     weight_type=QuantType.QUInt8)


def rate(path, batch, nhwc, seconds=10):
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count()
    sess = ort.InferenceSession(path, so)
    shape = (FACES, 112, 112, 3) if nhwc else (FACES, 3, 112, 112)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    name = sess.get_inputs()[0].name
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        for i in range(0, FACES, batch):
            sess.run(None, {name: x[i:i + batch]})
        calls += 1
    return FACES * calls / (time.perf_counter() - start)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--make"]:
        make(args[1])
        args = args[2:]
    data = args[0] if args else os.path.join(HERE, "../../../target/bench-data")
    out = {
        "mobilefacenet_export/batch64": rate(MFN, 64, True),
        "mobilefacenet_export/batch1": rate(MFN, 1, True),
    }
    quant = os.path.join(data, QUANT)
    if os.path.isfile(quant):
        # batch 1: each face quantised on its own; batch 64 is faster but batch-dependent.
        out["mobilefacenet_dynamic_quant/batch1"] = rate(quant, 1, True)
        out["mobilefacenet_dynamic_quant/batch64"] = rate(quant, 64, True)
    real = os.path.join(HERE, "../../../../shared/models/fr_feature.onnx")
    if os.path.isfile(real):
        out["fr_feature/batch1"] = rate(real, 1, False)
    print(json.dumps({"onnxruntime": ort.__version__, "threads": os.cpu_count(),
                      "images_per_s": out}))


if __name__ == "__main__":
    main()
