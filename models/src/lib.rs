//! The backbone registry: architecture name -> constructor, and [`AnyBackbone`], one enum over
//! every backbone, so the trainer and the CLI handle any of them by name.
//!
//! Adding a backbone: a crate under `models/` whose network implements
//! `qud_backbone::Backbone`, then one line in [`REGISTRY`] (and one variant of [`AnyBackbone`]
//! if it is a new type).

use burn::prelude::*;
use qud_backbone::Backbone;
pub use qud_iresnet::IResNet;
pub use qud_mobilefacenet::MobileFaceNet;

/// What a constructor needs besides the device.
#[derive(Clone, Debug, PartialEq)]
pub struct BackboneSpec {
    pub embedding_dim: usize,
    /// Dropout before the embedding layer, where the architecture has one.
    pub dropout: f64,
}

impl Default for BackboneSpec {
    fn default() -> Self {
        Self {
            embedding_dim: 512,
            dropout: 0.0,
        }
    }
}

/// Every backbone type. (Variants differ in size; a model is built once and moved rarely.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyBackbone {
    MobileFaceNet(MobileFaceNet),
    IResNet(IResNet),
}

type Constructor = fn(&str, &BackboneSpec, &Device) -> AnyBackbone;

/// Name -> constructor. One line per architecture.
pub const REGISTRY: &[(&str, Constructor)] = &[
    ("mobilefacenet", |_, s, d| {
        AnyBackbone::MobileFaceNet(MobileFaceNet::new(s.embedding_dim, d))
    }),
    ("iresnet18", iresnet),
    ("iresnet34", iresnet),
    ("iresnet50", iresnet),
    ("iresnet100", iresnet),
    ("iresnet200", iresnet),
];

fn iresnet(name: &str, spec: &BackboneSpec, device: &Device) -> AnyBackbone {
    AnyBackbone::IResNet(
        IResNet::new(name, spec.embedding_dim, spec.dropout, device).expect("registered depth"),
    )
}

/// An architecture name that is not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backbone `{name}`; known: {}", known.join(", "))]
pub struct UnknownBackbone {
    pub name: String,
    pub known: Vec<&'static str>,
}

/// Names of every registered backbone.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// A freshly initialised backbone called `name`.
pub fn create(
    name: &str,
    spec: &BackboneSpec,
    device: &Device,
) -> Result<AnyBackbone, UnknownBackbone> {
    let wanted = name.trim().to_ascii_lowercase();
    let (registered, build) =
        REGISTRY
            .iter()
            .find(|(n, _)| *n == wanted)
            .ok_or_else(|| UnknownBackbone {
                name: name.into(),
                known: names(),
            })?;
    Ok(build(registered, spec, device))
}

impl Backbone for AnyBackbone {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::MobileFaceNet(m) => m.forward(images),
            Self::IResNet(m) => m.forward(images),
        }
    }

    fn embedding_dim(&self) -> usize {
        match self {
            Self::MobileFaceNet(m) => m.embedding_dim(),
            Self::IResNet(m) => m.embedding_dim(),
        }
    }

    fn arch(&self) -> &str {
        match self {
            Self::MobileFaceNet(m) => m.arch(),
            Self::IResNet(m) => m.arch(),
        }
    }

    fn macs(&self) -> u64 {
        match self {
            Self::MobileFaceNet(m) => m.macs(),
            Self::IResNet(m) => m.macs(),
        }
    }

    fn fold_batchnorm(&mut self) {
        match self {
            Self::MobileFaceNet(m) => m.fold_batchnorm(),
            Self::IResNet(m) => m.fold_batchnorm(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_registered_backbone_by_name() {
        let device = qud_backend_flex::device();
        let spec = BackboneSpec {
            embedding_dim: 64,
            dropout: 0.0,
        };
        for name in ["mobilefacenet", "iresnet18", "IResNet34"] {
            let model = create(name, &spec, &device).unwrap();
            assert_eq!(model.arch(), name.to_ascii_lowercase());
            assert_eq!(model.embedding_dim(), 64);
        }
    }

    /// Expected values: forward hooks on the PyTorch reference modules of
    /// `models/fixtures/make_fixtures.py`, one 1x3x112x112 input, eval mode:
    /// `conv: out.numel() * m.weight[0].numel()`, `linear: m.weight.numel()`, summed.
    #[test]
    fn counts_multiply_accumulates_as_pytorch_hooks_do() {
        let device = qud_backend_flex::device();
        let spec = BackboneSpec::default();
        for (name, macs) in [
            ("mobilefacenet", 221_161_984u64),
            ("iresnet18", 2_609_954_816),
            ("iresnet50", 6_309_330_944),
            ("iresnet100", 12_089_606_144),
        ] {
            assert_eq!(create(name, &spec, &device).unwrap().macs(), macs, "{name}");
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = create(
            "resnet9000",
            &BackboneSpec::default(),
            &qud_backend_flex::device(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("resnet9000")
                && text.contains("mobilefacenet")
                && text.contains("iresnet100"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod parity;

/// Load a PyTorch `state_dict` (`.pth`/`.pt`/`.bin`) or safetensors file into `model`, strictly;
/// keys are those of the architecture's PyTorch module.
pub fn load_weights(
    model: AnyBackbone,
    path: &std::path::Path,
) -> Result<AnyBackbone, qud_backbone::WeightError> {
    Ok(match model {
        AnyBackbone::MobileFaceNet(m) => {
            AnyBackbone::MobileFaceNet(qud_backbone::load_weights(m, path)?)
        }
        AnyBackbone::IResNet(m) => AnyBackbone::IResNet(qud_backbone::load_weights(m, path)?),
    })
}

/// Export `model` as safetensors with PyTorch key names (atomic write).
pub fn save_safetensors(
    model: &AnyBackbone,
    path: &std::path::Path,
) -> Result<(), qud_backbone::WeightError> {
    match model {
        AnyBackbone::MobileFaceNet(m) => qud_backbone::save_safetensors(m, path),
        AnyBackbone::IResNet(m) => qud_backbone::save_safetensors(m, path),
    }
}
