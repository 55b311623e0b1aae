//! Export of a qud backbone to an ONNX file that onnxruntime, tract and `onnx.checker` accept.
//!
//! The network is written in eval mode from [`Backbone::onnx_graph`] after
//! [`Backbone::fold_batchnorm`] (each BatchNorm after a convolution or linear layer folded into
//! it; those before one, as in iResNet's blocks, stay `BatchNormalization`), with a dynamic batch
//! dimension: input `input` `[batch, 3, 112, 112]` RGB in [-1, 1] (`(pixel - 127.5) / 127.5`),
//! output `embedding` `[batch, D]`, unnormalised. The messages are the ONNX schema as
//! `tract_onnx::pb` carries it, encoded by prost; the model states its input contract in
//! `metadata_props` (and `doc_string`), as insightface users read it.

use crate::OnnxError;
use prost::Message;
use qud_backbone::onnx_graph::Attribute;
use qud_backbone::{Backbone, OnnxGraph};
use std::io::Write;
use std::path::Path;
use tract_onnx::pb;

/// The opset written by default, and the range accepted (every operator used is unchanged
/// from 13 on).
pub const DEFAULT_OPSET: i64 = 13;
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// Where the exported weights came from, for the model's metadata.
#[derive(Clone, Debug, Default)]
pub struct ExportSource {
    /// The weight file (or a description such as `random init, seed 7`).
    pub weights: String,
    /// Its length and CRC-32, when it is a file.
    pub checksum: Option<(u64, u32)>,
}

impl ExportSource {
    /// `path`, with its length and CRC-32.
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        Ok(Self {
            weights: path.display().to_string(),
            checksum: Some((bytes.len() as u64, crc32fast::hash(&bytes))),
        })
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub nodes: usize,
    pub parameters: usize,
    pub bytes: usize,
}

fn attribute(name: &str, value: &Attribute) -> pb::AttributeProto {
    let mut proto = pb::AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match value {
        Attribute::Int(i) => {
            proto.i = *i;
            proto.r#type = pb::attribute_proto::AttributeType::Int as i32;
        }
        Attribute::Ints(ints) => {
            proto.ints = ints.clone();
            proto.r#type = pb::attribute_proto::AttributeType::Ints as i32;
        }
        Attribute::Float(f) => {
            proto.f = *f;
            proto.r#type = pb::attribute_proto::AttributeType::Float as i32;
        }
    }
    proto
}

/// A float tensor's type with `dims` (`Err(name)`: a named, dynamic dimension).
fn float_type(dims: &[Result<i64, &str>]) -> Option<pb::TypeProto> {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Ok(n) => Value::DimValue(*n),
                Err(name) => Value::DimParam(name.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: pb::tensor_proto::DataType::Float as i32,
            shape: Some(pb::TensorShapeProto { dim }),
        })),
        ..Default::default()
    })
}

/// The ONNX model of `model` (eval mode; BatchNorms folded on a copy), as bytes.
pub(crate) fn onnx_bytes<M: Backbone + Clone>(
    model: &M,
    source: &ExportSource,
    opset: i64,
) -> Result<(Vec<u8>, ExportReport), String> {
    if !OPSETS.contains(&opset) {
        return Err(format!(
            "opset {opset} is not one qud writes ({}..={})",
            OPSETS.start(),
            OPSETS.end()
        ));
    }
    let mut folded = model.clone();
    folded.fold_batchnorm();
    let mut graph = OnnxGraph::new();
    let output = folded.onnx_graph(&mut graph).map_err(|e| e.to_string())?;
    graph.rename(&output, "embedding");
    let dim = model.embedding_dim();
    let nodes: Vec<pb::NodeProto> = graph
        .nodes
        .iter()
        .map(|n| pb::NodeProto {
            input: n.inputs.clone(),
            output: vec![n.output.clone()],
            name: n.name.clone(),
            op_type: n.op.to_string(),
            attribute: n.attributes.iter().map(|(k, v)| attribute(k, v)).collect(),
            ..Default::default()
        })
        .collect();
    let parameters = graph.initializers.iter().map(|i| i.values.len()).sum();
    let initializer = graph
        .initializers
        .into_iter()
        .map(|i| pb::TensorProto {
            dims: i.dims.iter().map(|&d| d as i64).collect(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            name: i.name,
            raw_data: i.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        })
        .collect();
    let report = ExportReport {
        nodes: nodes.len(),
        parameters,
        bytes: 0,
    };
    let contract = [
        ("arch", model.arch().to_string()),
        ("embedding_size", dim.to_string()),
        ("input_layout", "NCHW".into()),
        ("input_size", "112x112".into()),
        ("channel_order", "RGB".into()),
        ("mean", "127.5,127.5,127.5".into()),
        ("std", "127.5,127.5,127.5".into()),
        (
            "output",
            "unnormalised embedding; L2-normalise before comparing".into(),
        ),
        ("qud_version", env!("CARGO_PKG_VERSION").into()),
        ("source_weights", source.weights.clone()),
        (
            "source_weights_checksum",
            source.checksum.map_or("none".into(), |(len, crc)| {
                format!("{len} bytes, crc32 {crc:08x}")
            }),
        ),
    ];
    let doc = format!(
        "{} face embedding (qud {}): input [batch, 3, 112, 112] RGB, (pixel - 127.5) / 127.5, \
         output [batch, {dim}] unnormalised",
        model.arch(),
        env!("CARGO_PKG_VERSION")
    );
    let proto = pb::ModelProto {
        // IR version 7 (ONNX 1.8), the first that carries opset 13.
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "qud".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc,
        metadata_props: contract
            .into_iter()
            .map(|(key, value)| pb::StringStringEntryProto {
                key: key.into(),
                value,
            })
            .collect(),
        graph: Some(pb::GraphProto {
            name: model.arch().to_string(),
            node: nodes,
            initializer,
            input: vec![pb::ValueInfoProto {
                name: OnnxGraph::INPUT.into(),
                r#type: float_type(&[Err("batch"), Ok(3), Ok(112), Ok(112)]),
                ..Default::default()
            }],
            output: vec![pb::ValueInfoProto {
                name: "embedding".into(),
                r#type: float_type(&[Err("batch"), Ok(dim as i64)]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = proto.encode_to_vec();
    Ok((
        bytes.clone(),
        ExportReport {
            bytes: bytes.len(),
            ..report
        },
    ))
}

/// Write `model` as ONNX to `path` (a temporary file renamed over it).
pub fn export_onnx<M: Backbone + Clone>(
    model: &M,
    source: &ExportSource,
    path: &Path,
    opset: i64,
) -> Result<ExportReport, OnnxError> {
    let fail = |reason: String| OnnxError::Export {
        path: path.to_path_buf(),
        reason,
    };
    let (bytes, report) = onnx_bytes(model, source, opset).map_err(fail)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| fail(e.to_string()))?;
    tmp.write_all(&bytes).map_err(|e| fail(e.to_string()))?;
    tmp.persist(path).map_err(|e| fail(e.error.to_string()))?;
    Ok(report)
}
