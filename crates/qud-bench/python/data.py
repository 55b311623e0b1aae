"""Reference for `cargo xtask bench data`: the QUD/insightface training transform on the same
.rec the Rust benchmark reads: record bytes -> PIL decode -> RGB -> random horizontal flip ->
ToTensor -> Normalize(0.5, 0.5) -> stacked batch of 128, with torchvision's transforms written out
in PIL + torch (ToTensor is `from_numpy(...).permute(2, 0, 1).float().div(255)`). Threads: a
torch DataLoader with that many worker processes (the reference's own parallelism); 1 thread is
the plain loop in one process. Prints {threads: images_per_s}."""

import io
import json
import random
import struct
import sys
import time

import numpy as np
import torch
from PIL import Image

BATCH = 128


def read_records(path):
    """Image bytes of every record with a scalar label (insightface layout, no split records)."""
    raw = open(path, "rb").read()
    at, out = 0, []
    while at < len(raw):
        _, lrec = struct.unpack_from("<II", raw, at)
        length = lrec & ((1 << 29) - 1)
        payload = raw[at + 8:at + 8 + length]
        flag = struct.unpack_from("<I", payload, 0)[0]
        if flag == 0:
            out.append(payload[24:])
        at += 8 + (length + 3) // 4 * 4
    return out


class Faces(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return t.sub_(0.5).div_(0.5)


def rate(images, workers, seconds=10):
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(Faces(images), batch_size=BATCH, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    count, start = 0, None
    while start is None or time.perf_counter() - start < seconds:
        for batch in loader:
            if start is None:  # the first batch pays for starting the workers
                start = time.perf_counter()
                continue
            count += batch.shape[0]
            if time.perf_counter() - start >= seconds:
                break
    return count / (time.perf_counter() - start)


def main():
    images = read_records(sys.argv[1])
    print(json.dumps({"images_per_s": {"1": rate(images, 0), "2": rate(images, 2)}}))


if __name__ == "__main__":
    main()
