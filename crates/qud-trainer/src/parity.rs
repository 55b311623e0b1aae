//! Backend parity: one backbone's embeddings and gradients on two devices from the same weights
//! and faces. The wgpu test (`cargo xtask test --wgpu`) and `cargo xtask gpu-check` measure with
//! it; each states its own tolerance.

use crate::setup::{initialize_now, seeded};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use qud_backbone::Backbone;
use qud_loss::l2_normalize;
use qud_models::{AnyBackbone, BackboneSpec};

/// How far `other` is from `reference` on one backbone.
#[derive(Debug, Clone)]
pub struct Parity {
    pub arch: String,
    /// Largest absolute difference of the eval-mode embeddings over their largest magnitude.
    pub embedding_difference: f32,
    /// Cosine between the two devices' flattened train-mode gradients of one loss.
    pub gradient_cosine: f64,
    /// The parameter (module path) whose gradients agree least, and their cosine: where to look
    /// when `gradient_cosine` is low.
    pub worst_parameter: Option<(String, f64)>,
}

/// A randomly initialised `arch` drawn from `seed` on `device`, and `batch` uniform faces in
/// [-1, 1] drawn from `seed + 1`: the same values on every run.
pub fn random_backbone_and_faces(
    arch: &str,
    spec: &BackboneSpec,
    device: &Device,
    seed: u64,
    batch: usize,
) -> Result<(AnyBackbone, Tensor<4>), qud_models::UnknownBackbone> {
    let model = seeded(device, seed, || {
        qud_models::create(arch, spec, device).map(initialize_now)
    })?;
    let faces = seeded(device, seed + 1, || {
        Tensor::<4>::random(
            [batch, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            device,
        )
    });
    Ok((model, faces))
}

/// `model` (living on `reference`) and `faces` evaluated on `reference` and on `other`: the
/// eval-mode embeddings, and the gradients in train mode (BatchNorm on batch statistics) of the
/// summed cosines of the embeddings to fixed targets, one per face, as a training step computes
/// them.
pub fn compare(
    model: &AnyBackbone,
    faces: &Tensor<4>,
    reference: &Device,
    other: &Device,
) -> Parity {
    let on_reference = model.valid().forward(faces.clone());
    let on_other = model
        .valid()
        .to_device(other)
        .forward(faces.clone().to_device(other))
        .to_device(reference);
    let scale = on_reference.clone().abs().max().into_scalar::<f32>();
    let difference = (on_reference - on_other).abs().max().into_scalar::<f32>();
    let gradient = |device: &Device| {
        let device = device.clone().autodiff();
        let net = model.valid().to_device(&device).train();
        let features = l2_normalize(net.forward(faces.clone().to_device(&device)));
        let target = targets(features.dims(), &device);
        let grads = GradientsParams::from_grads((features * target).sum().backward(), &net);
        let mut named = Named {
            grads: &grads,
            path: Vec::new(),
            found: Vec::new(),
        };
        net.visit(&mut named);
        named.found
    };
    let (a, b) = (gradient(reference), gradient(other));
    let flat = |g: &[(String, Vec<f32>)]| g.iter().flat_map(|(_, v)| v.clone()).collect::<Vec<_>>();
    let same_parameters = a.len() == b.len() && a.iter().zip(&b).all(|(p, q)| p.0 == q.0);
    // A parameter without a gradient on one side: no agreement to speak of.
    let gradient_cosine = if same_parameters {
        cosine(&flat(&a), &flat(&b))
    } else {
        f64::NAN
    };
    let worst_parameter = a
        .iter()
        .zip(&b)
        .map(|((name, p), (_, q))| (name.clone(), cosine(p, q)))
        .min_by(|x, y| x.1.total_cmp(&y.1));
    Parity {
        arch: model.arch().to_string(),
        embedding_difference: difference / scale,
        gradient_cosine,
        worst_parameter,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Every parameter's gradient with its module path (`layer1.0.conv1.weight`), in visit order.
struct Named<'a> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    found: Vec<(String, Vec<f32>)>,
}

impl ModuleVisitor for Named<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(p.id) {
            let g = g.into_data().convert::<f32>();
            let values = g.as_slice::<f32>().expect("f32 gradient").to_vec();
            self.found.push((self.path.join("."), values));
        }
    }
}

/// Fixed, different directions per row. One direction for every row would make the gradient
/// cancel: the embedding's BatchNorm centres each feature over the batch, so the summed cosines
/// to one direction are nearly constant, and their gradient is rounding noise (measured: a
/// cosine of 0.09 between wgpu and flex on iresnet50).
fn targets([rows, dim]: [usize; 2], device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * dim)
        .map(|k| ((k as f64 * 0.618_033_988_75).fract() - 0.5) as f32)
        .collect();
    l2_normalize(Tensor::from_data(
        TensorData::new(values, [rows, dim]),
        device,
    ))
}

#[cfg(test)]
mod tests {
    /// The two CPU backends from the same weights: a check of this module as much as of them.
    #[test]
    fn flex_and_ndarray_agree() {
        let flex = qud_backends::device("flex", "cpu").unwrap();
        let ndarray = qud_backends::device("ndarray", "cpu").unwrap();
        let spec = qud_models::BackboneSpec {
            embedding_dim: 32,
            dropout: 0.0,
        };
        let (model, faces) =
            super::random_backbone_and_faces("mobilefacenet", &spec, &flex, 7, 3).unwrap();
        let parity = super::compare(&model, &faces, &flex, &ndarray);
        assert_eq!(parity.arch, "mobilefacenet");
        assert!(parity.embedding_difference <= 1e-4, "{parity:?}");
        assert!(parity.gradient_cosine > 0.9999, "{parity:?}");
    }
}
