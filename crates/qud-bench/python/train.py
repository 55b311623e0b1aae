"""PyTorch reference for the `train` benchmark: one QUD step as the QUD repository computes it
(MobileFaceNet student in train mode, iresnet50 teacher in eval mode under no_grad, queue of 1024
normalised features, InfoNCE at tau 0.1, clip_grad_norm_ 5, SGD momentum 0.9 weight decay 5e-4),
batch 64 on the CPU with the given thread count. `train.py THREADS student B` times a MobileFaceNet
train step alone at batch B instead (forward, loss on the normalised embedding, backward,
clip_grad_norm_ 5, SGD). One warm-up step, 3 timed. Prints `samples_per_s peak_rss_mb`.

`train.py THREADS qud B DEVICE [cached] [WARMUP STEPS]` (what `cargo xtask gpu-check` runs) times the
QUD step at batch B on DEVICE (e.g. `cuda`); with `cached` the teacher's keys are copied from host
memory each step, as from a teacher-feature cache, instead of computed."""

import importlib.util
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("ref", os.path.join(HERE, "../../../models/fixtures/make_fixtures.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def student_step(batch):
    student = ref.MobileFaceNet(512).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1 * batch / 512, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    target = F.normalize(torch.ones(batch, 512), dim=1)
    times = []
    for step in range(4):
        start = time.perf_counter()
        loss = -(F.normalize(student(x), dim=1) * target).sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{3 * batch / sum(times):.3f} {peak_mb:.1f}")


def qud_step(batch, device, cached, warmup, steps):
    student = ref.MobileFaceNet(512).train().to(device)
    teacher = ref.IResNet([3, 4, 14, 3], 512).eval().to(device)
    queue = F.normalize(torch.randn(1024, 512), dim=1).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1 * batch / 512, momentum=0.9, weight_decay=5e-4)
    x = (torch.rand(batch, 3, 112, 112) * 2 - 1).to(device)
    with torch.no_grad():
        host_keys = F.normalize(teacher(x), dim=1).cpu()
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        if cached:
            k = host_keys.to(device)
        else:
            with torch.no_grad():
                k = F.normalize(teacher(x), dim=1)
        q = F.normalize(student(x), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.1
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        queue = torch.cat([queue[batch:], k])
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{steps * batch / sum(times):.3f} {peak_mb:.1f}")


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count())
    if len(sys.argv) > 3 and sys.argv[2] == "student":
        student_step(int(sys.argv[3]))
    elif len(sys.argv) > 4 and sys.argv[2] == "qud":
        rest = sys.argv[5:]
        cached = "cached" in rest
        counts = [int(a) for a in rest if a != "cached"] or [1, 3]
        qud_step(int(sys.argv[3]), sys.argv[4], cached, counts[0], counts[1])
    else:
        qud_step(64, "cpu", False, 1, 3)


if __name__ == "__main__":
    main()
