"""PyTorch reference for `cargo xtask bench backbones`: eval-mode forward images/s at batch 64,
MobileFaceNet and iresnet50 as defined in models/fixtures/make_fixtures.py and TransFace-B
(`TransFaceB` below: the layers of the QUD code's `VisionTransformer(patch_size=9, embed_dim=512,
depth=24, num_heads=8)` in eval mode, for timing), on the CPU with the same number of threads as
the Rust side. Prints one JSON object {name: images_per_s}."""

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


class TransFaceB(torch.nn.Module):
    """Eval-mode TransFace-B: 9x9 patches, 24 pre-norm blocks (attention without qkv bias, ReLU6
    MLP), LayerNorm, a sigmoid weight per patch, BatchNorm'd linear head."""

    def __init__(self, dim=512, depth=24, heads=8, patches=144):
        super().__init__()
        nn = torch.nn
        self.heads, self.patches = heads, patches
        self.proj = nn.Conv2d(3, dim, 9, 9)
        self.pos = nn.Parameter(torch.zeros(1, patches, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim, bias=False),
                               proj=nn.Linear(dim, dim), norm2=nn.LayerNorm(dim),
                               fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)))
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.senet = nn.Sequential(nn.Linear(dim * patches, patches, bias=False), nn.ReLU(),
                                   nn.Linear(patches, patches, bias=False), nn.Sigmoid())
        self.feature = nn.Sequential(nn.Linear(dim * patches, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, 512, bias=False), nn.BatchNorm1d(512, eps=2e-5))

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2) + self.pos
        b, t, c = x.shape
        for blk in self.blocks:
            qkv = blk["qkv"](blk["norm1"](x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
            x = x + blk["proj"]((attn @ qkv[2]).transpose(1, 2).reshape(b, t, c))
            x = x + blk["fc2"](torch.nn.functional.relu6(blk["fc1"](blk["norm2"](x))))
        x = self.norm(x)
        w = self.senet(x.reshape(b, -1)).reshape(b, t, 1)
        return self.feature((x * w).reshape(b, -1))


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
        "transface-b": rate(TransFaceB().eval(), 64, 60),
    }
    print(json.dumps({"torch": torch.__version__, "threads": threads, "images_per_s": out}))


if __name__ == "__main__":
    main()
