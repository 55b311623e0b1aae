"""PyTorch reference for `cargo xtask bench backbones`: eval-mode forward images/s at batch 64,
MobileFaceNet and iresnet50 as defined in models/fixtures/make_fixtures.py, on the CPU with the
same number of threads as the Rust side. Prints one JSON object {name: images_per_s}."""

import importlib.util
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("ref", os.path.join(HERE, "../../../models/fixtures/make_fixtures.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def rate(model, batch, seconds):
    x = torch.empty(batch, 3, 112, 112).uniform_(-1, 1)
    with torch.inference_mode():
        model(x)
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            model(x)
            runs += 1
        return batch * runs / (time.perf_counter() - start)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
    torch.set_num_threads(threads)
    out = {
        "mobilefacenet": rate(ref.MobileFaceNet(512).eval(), 64, 15),
        "iresnet50": rate(ref.IResNet([3, 4, 14, 3], 512).eval(), 64, 40),
    }
    print(json.dumps({"torch": torch.__version__, "threads": threads, "images_per_s": out}))


if __name__ == "__main__":
    main()
