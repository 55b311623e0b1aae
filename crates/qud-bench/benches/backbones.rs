//! Eval-mode forward throughput (images/s) at batch 64: MobileFaceNet, iresnet50 and TransFace-B
//! on every compiled CPU backend, and on flex with BatchNorm folded (iresnet50 and TransFace-B on
//! ndarray only with `QUD_BENCH_ALL=1`). The PyTorch reference is `python/backbones.py` (`cargo xtask bench
//! backbones` runs both).

use burn::prelude::*;
use criterion::{criterion_group, Criterion, Throughput};
use qud_backbone::Backbone;
use qud_models::{IResNet, MobileFaceNet};
use std::time::{Duration, Instant};

const BATCH: usize = 64;

fn forward(c: &mut Criterion) {
    let input = qud_bench::random_faces(BATCH);
    for arch in ["mobilefacenet", "iresnet50", "transface-b"] {
        let mut group = c.benchmark_group(format!("forward_b{BATCH}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(2));
        group.measurement_time(Duration::from_secs(match arch {
            "mobilefacenet" => 15,
            "iresnet50" => 60,
            _ => 60,
        }));
        // `flex_folded`: the same network with its BatchNorms folded into the convolutions, as
        // teachers, `qud eval` and `qud embed` run it.
        for variant in ["flex", "flex_folded", "ndarray"] {
            let backend = variant.trim_end_matches("_folded");
            // ndarray's convolutions make one iresnet50 batch take minutes; QUD_BENCH_ALL=1 runs it.
            if arch != "mobilefacenet"
                && backend == "ndarray"
                && std::env::var_os("QUD_BENCH_ALL").is_none()
            {
                continue;
            }
            let Ok(device) = qud_backends::device(backend, "cpu") else {
                continue;
            };
            let mut model = qud_models::create(arch, &qud_models::BackboneSpec::default(), &device)
                .expect("registered")
                .valid();
            if variant.ends_with("_folded") {
                model.fold_batchnorm();
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(input.clone(), [BATCH, 3, 112, 112]),
                &device,
            );
            group.bench_function(format!("{arch}/{variant}"), |b| {
                b.iter(|| {
                    model
                        .forward(x.clone())
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .expect("f32")
                })
            });
        }
        group.finish();
    }
}

/// Where an eval-mode forward spends its time, by kind of layer: each layer run on its own, the
/// device synchronised after it. Printed before the criterion groups (`QUD_BENCH_PROFILE=0`
/// skips it); the sums are a little above a plain forward's time, which overlaps nothing anyway
/// on the CPU backends.
struct LayerTimes {
    device: Device,
    kinds: Vec<(String, f64)>,
}

impl LayerTimes {
    fn op<const D: usize>(&mut self, kind: &str, f: impl FnOnce() -> Tensor<D>) -> Tensor<D> {
        let start = Instant::now();
        let out = f();
        self.device.sync().expect("device sync");
        let seconds = start.elapsed().as_secs_f64();
        match self.kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, total)) => *total += seconds,
            None => self.kinds.push((kind.to_string(), seconds)),
        }
        out
    }

    fn conv_block(
        &mut self,
        kind: &'static str,
        b: &qud_mobilefacenet::ConvBlock,
        x: Tensor<4>,
    ) -> Tensor<4> {
        // As the network runs it: convolutions through qud's CPU kernels.
        let x = self.op(kind, || qud_cpu_kernels::conv2d(&b.conv, x));
        let x = self.op("BatchNorm", || b.bn.forward(x));
        self.op("PReLU", || b.prelu.forward(x))
    }

    fn depthwise(&mut self, b: &qud_mobilefacenet::DepthWise, x: Tensor<4>) -> Tensor<4> {
        let y = self.conv_block("conv 1x1", &b.conv, x.clone());
        let y = self.conv_block("conv 3x3 depthwise", &b.conv_dw, y);
        let y = self.op("conv 1x1", || qud_cpu_kernels::conv2d(&b.project.conv, y));
        let y = self.op("BatchNorm", || b.project.bn.forward(y));
        if b.residual {
            self.op("residual add", || x + y)
        } else {
            y
        }
    }

    fn mobilefacenet(&mut self, m: &MobileFaceNet, x: Tensor<4>) {
        let x = self.conv_block("conv 3x3 dense", &m.conv1, x);
        let mut x = self.conv_block("conv 3x3 depthwise", &m.conv2_dw, x);
        for (down, blocks) in [
            (&m.conv_23, &m.conv_3),
            (&m.conv_34, &m.conv_4),
            (&m.conv_45, &m.conv_5),
        ] {
            x = self.depthwise(down, x);
            for block in &blocks.model {
                x = self.depthwise(block, x);
            }
        }
        let x = self.conv_block("conv 1x1", &m.conv_6_sep, x);
        let head = &m.output_layer;
        let x = self.op("head (7x7 depthwise, linear, BN)", || {
            let x: Tensor<2> = head.conv_6_dw.forward(x).flatten(1, 3);
            head.bn.forward(head.linear.forward(x))
        });
        drop(x);
    }

    fn iresnet(&mut self, m: &IResNet, x: Tensor<4>) {
        let conv = qud_cpu_kernels::conv2d;
        let x = self.op("conv 3x3 dense", || conv(&m.conv1, x));
        let x = self.op("BatchNorm", || m.bn1.forward(x));
        let mut x = self.op("PReLU", || m.prelu.forward(x));
        for b in [&m.layer1, &m.layer2, &m.layer3, &m.layer4]
            .into_iter()
            .flatten()
        {
            let y = self.op("BatchNorm", || b.bn1.forward(x.clone()));
            let label = conv3x3_label(&y);
            let y = self.op(&label, || conv(&b.conv1, y));
            let y = self.op("BatchNorm", || b.bn2.forward(y));
            let y = self.op("PReLU", || b.prelu.forward(y));
            let label = conv3x3_label(&y);
            let y = self.op(&label, || conv(&b.conv2, y));
            let y = self.op("BatchNorm", || b.bn3.forward(y));
            let identity = match &b.downsample {
                Some((down, bn)) => {
                    let d = self.op("conv 1x1 (downsample)", || conv(down, x));
                    self.op("BatchNorm", || bn.forward(d))
                }
                None => x,
            };
            x = self.op("residual add", || y + identity);
        }
        let x = self.op("head (BN, linear, BN)", || {
            let x: Tensor<2> = m.bn2.forward(x).flatten(1, 3);
            m.features.forward(m.fc.forward(x))
        });
        drop(x);
    }

    fn print(&self, title: &str, runs: usize) {
        let total: f64 = self.kinds.iter().map(|(_, t)| t).sum();
        println!(
            "{title}: {:.1} ms a forward, by layer kind",
            1e3 * total / runs as f64
        );
        for (kind, t) in &self.kinds {
            println!(
                "  {kind:<36} {:>8.1} ms {:>5.1} %",
                1e3 * t / runs as f64,
                100.0 * t / total
            );
        }
    }
}

/// The breakdown's row for a block's 3 x 3 convolution on `x`, named by its input channels and
/// size (a stage's stride-2 convolution shows under its input's): stages differ in how they run
/// (im2col or Winograd) and in how well the products use the CPU.
fn conv3x3_label(x: &Tensor<4>) -> String {
    let [_, c, h, w] = x.dims();
    format!("conv 3x3 dense, {c} ch, {h}x{w}")
}

fn layer_breakdown() {
    let Ok(device) = qud_backends::device("flex", "cpu") else {
        return;
    };
    let input = qud_bench::random_faces(BATCH);
    let x = Tensor::<4>::from_data(TensorData::new(input, [BATCH, 3, 112, 112]), &device);
    let spec = qud_models::BackboneSpec::default();
    for (arch, runs) in [("mobilefacenet", 5), ("iresnet50", 1)] {
        let model = qud_models::create(arch, &spec, &device)
            .expect("registered")
            .valid();
        let mut times = LayerTimes {
            device: device.clone(),
            kinds: Vec::new(),
        };
        for run in 0..=runs {
            if run == 1 {
                times.kinds.clear(); // the first forward warms the allocator up
            }
            match &model {
                qud_models::AnyBackbone::MobileFaceNet(m) => times.mobilefacenet(m, x.clone()),
                qud_models::AnyBackbone::IResNet(m) => times.iresnet(m, x.clone()),
                _ => unreachable!("the breakdown runs mobilefacenet and iresnet50"),
            }
        }
        times.print(&format!("{arch}, batch {BATCH}, flex, unfolded"), runs);
    }
}

criterion_group!(benches, forward);

fn main() {
    if std::env::var("QUD_BENCH_PROFILE").map_or(true, |v| v != "0") {
        layer_breakdown();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
