//! The depthwise kernels as a Burn backend extension (`#[backend_extension]`): flex runs them on
//! its tensors' host memory, and flex under autodiff records a backward pass made of the two
//! gradient kernels, so that training uses them as well as inference.

use crate::batchnorm::{
    batch_norm_add_train_host, batch_norm_apply_host, batch_norm_apply_in_place_host,
    batch_norm_backward_host, batch_norm_backward_in_place_host,
    batch_norm_prelu_backward_in_place_host, batch_norm_prelu_depthwise_backward_host,
    batch_norm_prelu_depthwise_train_host, batch_norm_prelu_train_host, batch_norm_scale,
    batch_norm_train_host, Normalisation,
};
use crate::{
    dense_conv2d_host, dense_conv2d_input_grad_host, dense_conv2d_weight_grad_host,
    depthwise_conv2d_host, depthwise_conv2d_input_grad_host, depthwise_conv2d_weight_grad_host,
    prelu_alpha_grad_host, prelu_backward_in_place_host, prelu_host, prelu_in_place_host,
    prelu_input_grad_host, prelu_input_grad_in_place_host, Dense, Depthwise,
};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Flex, TensorMetadata};
use burn::tensor::TensorData;
use burn_flex::{FlexDevice, FlexTensor};

/// Depthwise convolution without bias: `x` `[N, C, H, W]`, `weight` `[C, 1, k, k]`, square
/// kernel, equal stride and zero padding on both axes.
#[backend_extension(Flex, Autodiff)]
pub trait DepthwiseBackend: Backend {
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// `[N, C, H, W]` from the output gradient `[N, C, OH, OW]`.
    fn depthwise_conv2d_input_grad(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// `[C, 1, k, k]` from the input and the output gradient.
    fn depthwise_conv2d_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

fn dims4(shape: &burn::tensor::Shape) -> [usize; 4] {
    let dims: &[usize] = shape.as_ref();
    dims.try_into().expect("a 4-d tensor")
}

fn geometry(x: [usize; 4], kernel: usize, stride: usize, padding: usize) -> Depthwise {
    let [batch, channels, height, width] = x;
    Depthwise {
        batch,
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
    }
}

/// The f32 values of a flex tensor, in row-major order.
fn values(tensor: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match tensor.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(
            tensor
                .to_contiguous()
                .as_slice::<f32>()
                .expect("an f32 tensor")
                .to_vec(),
        ),
    }
}

/// The values of `tensor` for overwriting, where it is the whole of a buffer nothing else holds:
/// an activation outside autodiff, or a gradient the backward consumes.
fn owned_values(tensor: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = tensor.shape().num_elements();
    if tensor.layout().contiguous_offsets() != Some((0, n)) {
        return None;
    }
    tensor.try_storage_mut::<f32>().map(|slice| &mut slice[..n])
}

fn flex_tensor(values: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    Flex::float_from_data(TensorData::new(values, shape), &FlexDevice)
}

impl DepthwiseBackend for Flex {
    fn depthwise_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let kernel = dims4(&weight.shape())[2];
        let shape = geometry(dims4(&x.shape()), kernel, stride, padding);
        let out = depthwise_conv2d_host(&shape, &values(&x), &values(&weight), None);
        let (oh, ow) = shape.output_size();
        flex_tensor(out, [shape.batch, shape.channels, oh, ow])
    }

    fn depthwise_conv2d_input_grad(
        grad: FlexTensor,
        weight: FlexTensor,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let [batch, channels, _, _] = dims4(&grad.shape());
        let kernel = dims4(&weight.shape())[2];
        let shape = geometry([batch, channels, height, width], kernel, stride, padding);
        let out = depthwise_conv2d_input_grad_host(&shape, &values(&grad), &values(&weight));
        flex_tensor(out, [batch, channels, height, width])
    }

    fn depthwise_conv2d_weight_grad(
        x: FlexTensor,
        grad: FlexTensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let shape = geometry(dims4(&x.shape()), kernel, stride, padding);
        let out = depthwise_conv2d_weight_grad_host(&shape, &values(&x), &values(&grad));
        flex_tensor(out, [shape.channels, 1, kernel, kernel])
    }
}

/// The backward step of [`DepthwiseBackend::depthwise_conv2d`] on the inner backend.
#[derive(Debug)]
struct DepthwiseBackward;

impl<B: Backend + DepthwiseBackend> Backward<B, 2> for DepthwiseBackward {
    /// Input and weight checkpoints, then `[height, width, kernel, stride, padding]`.
    type State = (NodeId, NodeId, [usize; 5]);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, [height, width, kernel, stride, padding]) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let weight = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(weight_state);
        if let Some(node) = node_x {
            let dx = B::depthwise_conv2d_input_grad(
                grad.clone(),
                weight,
                height,
                width,
                stride,
                padding,
            );
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_weight {
            let dw = B::depthwise_conv2d_weight_grad(x, grad, kernel, stride, padding);
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: Backend + DepthwiseBackend, C: CheckpointStrategy> DepthwiseBackend for Autodiff<B, C> {
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let [_, _, height, width] = dims4(&x.primitive().shape());
        let kernel = dims4(&weight.primitive().shape())[2];
        match DepthwiseBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                prep.finish(
                    (
                        x_state,
                        weight_state,
                        [height, width, kernel, stride, padding],
                    ),
                    B::depthwise_conv2d(
                        x.into_primitive(),
                        weight.into_primitive(),
                        stride,
                        padding,
                    ),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::depthwise_conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
            )),
        }
    }

    // The gradients themselves are not differentiated again (no second-order use in qud): they
    // are computed on the inner backend and enter the graph as constants.
    fn depthwise_conv2d_input_grad(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::depthwise_conv2d_input_grad(
            Self::inner(grad),
            Self::inner(weight),
            height,
            width,
            stride,
            padding,
        ))
    }

    fn depthwise_conv2d_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::depthwise_conv2d_weight_grad(
            Self::inner(x),
            Self::inner(grad),
            kernel,
            stride,
            padding,
        ))
    }
}

/// PReLU with one slope per channel: `x` `[N, C, ...]`, `alpha` `[C]`.
#[backend_extension(Flex, Autodiff)]
pub trait PreluBackend: Backend {
    fn prelu_channels(x: FloatTensor<Self>, alpha: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient of `x`, shaped as `x`.
    fn prelu_channels_input_grad(
        x: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The gradient of `alpha`, `[C]`.
    fn prelu_channels_alpha_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Both gradients, `(x_grad, alpha_grad)`: in one pass where `grad` can be overwritten.
    fn prelu_channels_backward(
        x: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// `(channels, plane)` of a `[N, C, ...]` shape: the plane is everything after dimension 1.
fn channels_and_plane(shape: &burn::tensor::Shape) -> (usize, usize) {
    let dims: &[usize] = shape.as_ref();
    (dims[1], dims[2..].iter().product())
}

/// A training BatchNorm's host kernel on `x` (`host` gets `x`'s values and its plane size and
/// returns `(output, mean, biased variance)`), its results as flex tensors: the output of `x`'s
/// shape, the statistics `[C]`.
fn batch_norm_train_on_host(
    x: &FlexTensor,
    host: impl FnOnce(&[f32], usize) -> (Vec<f32>, Vec<f32>, Vec<f32>),
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = x.shape();
    let (channels, plane) = channels_and_plane(&shape);
    let (out, mean, var) = host(&values(x), plane);
    (
        flex_tensor(out, shape),
        flex_tensor(mean, [channels]),
        flex_tensor(var, [channels]),
    )
}

impl PreluBackend for Flex {
    fn prelu_channels(mut x: FlexTensor, alpha: FlexTensor) -> FlexTensor {
        let shape = x.shape();
        let (_, plane) = channels_and_plane(&shape);
        // Outside autodiff nothing else holds the activation: overwrite it.
        if let Some(slice) = owned_values(&mut x) {
            prelu_in_place_host(slice, &values(&alpha), plane);
            return x;
        }
        flex_tensor(prelu_host(&values(&x), &values(&alpha), plane), shape)
    }

    fn prelu_channels_input_grad(
        x: FlexTensor,
        alpha: FlexTensor,
        mut grad: FlexTensor,
    ) -> FlexTensor {
        let shape = x.shape();
        let (_, plane) = channels_and_plane(&shape);
        if grad.shape() == shape {
            if let Some(dy) = owned_values(&mut grad) {
                prelu_input_grad_in_place_host(&values(&x), &values(&alpha), dy, plane);
                return grad;
            }
        }
        let out = prelu_input_grad_host(&values(&x), &values(&alpha), &values(&grad), plane);
        flex_tensor(out, shape)
    }

    fn prelu_channels_alpha_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (channels, plane) = channels_and_plane(&x.shape());
        let out = prelu_alpha_grad_host(&values(&x), &values(&grad), channels, plane);
        flex_tensor(out, [channels])
    }

    fn prelu_channels_backward(
        x: FlexTensor,
        alpha: FlexTensor,
        mut grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let shape = x.shape();
        let (channels, plane) = channels_and_plane(&shape);
        if grad.shape() == shape {
            let (x, alpha) = (values(&x), values(&alpha));
            if let Some(dy) = owned_values(&mut grad) {
                let alpha_grad = prelu_backward_in_place_host(&x, &alpha, dy, plane);
                return (grad, flex_tensor(alpha_grad, [channels]));
            }
        }
        let alpha_grad = Self::prelu_channels_alpha_grad(x.clone(), grad.clone());
        (Self::prelu_channels_input_grad(x, alpha, grad), alpha_grad)
    }
}

/// The backward step of [`PreluBackend::prelu_channels`] on the inner backend.
#[derive(Debug)]
struct PreluBackward;

impl<B: Backend + PreluBackend> Backward<B, 2> for PreluBackward {
    /// Input and slope checkpoints.
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_alpha] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, alpha_state) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let alpha = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(alpha_state);
        match (node_x, node_alpha) {
            (Some(node_x), Some(node_alpha)) => {
                let (dx, da) = B::prelu_channels_backward(x, alpha, grad);
                grads.register::<B>(node_x.id, dx);
                grads.register::<B>(node_alpha.id, da);
            }
            (Some(node), None) => {
                let dx = B::prelu_channels_input_grad(x, alpha, grad);
                grads.register::<B>(node.id, dx);
            }
            (None, Some(node)) => {
                let da = B::prelu_channels_alpha_grad(x, grad);
                grads.register::<B>(node.id, da);
            }
            (None, None) => {}
        }
    }
}

impl<B: Backend + PreluBackend, C: CheckpointStrategy> PreluBackend for Autodiff<B, C> {
    fn prelu_channels(x: FloatTensor<Self>, alpha: FloatTensor<Self>) -> FloatTensor<Self> {
        match PreluBackward
            .prepare::<C>([x.node(), alpha.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let alpha_state = prep.checkpoint(&alpha);
                prep.finish(
                    (x_state, alpha_state),
                    B::prelu_channels(x.into_primitive(), alpha.into_primitive()),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::prelu_channels(
                x.into_primitive(),
                alpha.into_primitive(),
            )),
        }
    }

    // As for the depthwise gradients: computed on the inner backend, constants in the graph.
    fn prelu_channels_input_grad(
        x: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::prelu_channels_input_grad(
            Self::inner(x),
            Self::inner(alpha),
            Self::inner(grad),
        ))
    }

    fn prelu_channels_alpha_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::prelu_channels_alpha_grad(
            Self::inner(x),
            Self::inner(grad),
        ))
    }

    fn prelu_channels_backward(
        x: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, da) =
            B::prelu_channels_backward(Self::inner(x), Self::inner(alpha), Self::inner(grad));
        (Self::from_inner(dx), Self::from_inner(da))
    }
}

/// Dense convolution (groups = 1) without bias: `x` `[N, C, H, W]`, `weight` `[O, C, k, k]`,
/// square kernel, equal stride and zero padding on both axes.
#[backend_extension(Flex, Autodiff)]
pub trait DenseConvBackend: Backend {
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// `[N, C, H, W]` from the output gradient `[N, O, OH, OW]`.
    fn dense_conv2d_input_grad(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// `[O, C, k, k]` from the input and the output gradient.
    fn dense_conv2d_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

fn dense_geometry(
    x: [usize; 4],
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Dense {
    let [batch, in_channels, height, width] = x;
    Dense {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel,
        stride,
        padding,
    }
}

impl DenseConvBackend for Flex {
    fn dense_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let [out_channels, _, kernel, _] = dims4(&weight.shape());
        let shape = dense_geometry(dims4(&x.shape()), out_channels, kernel, stride, padding);
        let out = dense_conv2d_host(&shape, &values(&x), &values(&weight));
        let (oh, ow) = shape.output_size();
        flex_tensor(out, [shape.batch, out_channels, oh, ow])
    }

    fn dense_conv2d_input_grad(
        grad: FlexTensor,
        weight: FlexTensor,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let [batch, _, _, _] = dims4(&grad.shape());
        let [out_channels, in_channels, kernel, _] = dims4(&weight.shape());
        let shape = dense_geometry(
            [batch, in_channels, height, width],
            out_channels,
            kernel,
            stride,
            padding,
        );
        let out = dense_conv2d_input_grad_host(&shape, &values(&grad), &values(&weight));
        flex_tensor(out, [batch, in_channels, height, width])
    }

    fn dense_conv2d_weight_grad(
        x: FlexTensor,
        grad: FlexTensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let out_channels = dims4(&grad.shape())[1];
        let shape = dense_geometry(dims4(&x.shape()), out_channels, kernel, stride, padding);
        let out = dense_conv2d_weight_grad_host(&shape, &values(&x), &values(&grad));
        flex_tensor(out, [out_channels, shape.in_channels, kernel, kernel])
    }
}

/// The backward step of [`DenseConvBackend::dense_conv2d`] on the inner backend.
#[derive(Debug)]
struct DenseConvBackward;

impl<B: Backend + DenseConvBackend> Backward<B, 2> for DenseConvBackward {
    /// Input and weight checkpoints, then `[height, width, kernel, stride, padding]`.
    type State = (NodeId, NodeId, [usize; 5]);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, [height, width, kernel, stride, padding]) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let weight = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(weight_state);
        if let Some(node) = node_x {
            let dx =
                B::dense_conv2d_input_grad(grad.clone(), weight, height, width, stride, padding);
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_weight {
            let dw = B::dense_conv2d_weight_grad(x, grad, kernel, stride, padding);
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: Backend + DenseConvBackend, C: CheckpointStrategy> DenseConvBackend for Autodiff<B, C> {
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let [_, _, height, width] = dims4(&x.primitive().shape());
        let kernel = dims4(&weight.primitive().shape())[2];
        match DenseConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                prep.finish(
                    (
                        x_state,
                        weight_state,
                        [height, width, kernel, stride, padding],
                    ),
                    B::dense_conv2d(x.into_primitive(), weight.into_primitive(), stride, padding),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
            )),
        }
    }

    // As for the depthwise gradients: computed on the inner backend, constants in the graph.
    fn dense_conv2d_input_grad(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        height: usize,
        width: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::dense_conv2d_input_grad(
            Self::inner(grad),
            Self::inner(weight),
            height,
            width,
            stride,
            padding,
        ))
    }

    fn dense_conv2d_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::dense_conv2d_weight_grad(
            Self::inner(x),
            Self::inner(grad),
            kernel,
            stride,
            padding,
        ))
    }
}

/// BatchNorm over dimension 1 of `x` `[N, C, ...]`; `gamma`, `beta`, statistics `[C]`.
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormBackend: Backend {
    /// Training mode: normalised with the batch's own statistics, returned as
    /// `(output, mean, biased variance)`.
    fn batch_norm_train_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(x_grad, gamma_grad, beta_grad)` of [`Self::batch_norm_train_channels`].
    fn batch_norm_train_channels_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Inference mode: normalised with the given statistics.
    fn batch_norm_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
}

impl BatchNormBackend for Flex {
    fn batch_norm_train_channels(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_train_on_host(&x, |x, plane| {
            batch_norm_train_host(x, &values(&gamma), &values(&beta), epsilon, plane)
        })
    }

    fn batch_norm_train_channels_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        mut grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = x.shape();
        let (channels, plane) = channels_and_plane(&shape);
        if grad.shape() == shape {
            let x = values(&x);
            let (gamma, mean, variance) = (values(&gamma), values(&mean), values(&variance));
            if let Some(dy) = owned_values(&mut grad) {
                let (gamma_grad, beta_grad) = batch_norm_backward_in_place_host(
                    &x, dy, &gamma, &mean, &variance, epsilon, plane,
                );
                return (
                    grad,
                    flex_tensor(gamma_grad, [channels]),
                    flex_tensor(beta_grad, [channels]),
                );
            }
        }
        let (x_grad, gamma_grad, beta_grad) = batch_norm_backward_host(
            &values(&x),
            &values(&grad),
            &values(&gamma),
            &values(&mean),
            &values(&variance),
            epsilon,
            plane,
        );
        (
            flex_tensor(x_grad, shape),
            flex_tensor(gamma_grad, [channels]),
            flex_tensor(beta_grad, [channels]),
        )
    }

    fn batch_norm_channels(
        mut x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        let shape = x.shape();
        let (_, plane) = channels_and_plane(&shape);
        let scale = batch_norm_scale(&values(&gamma), &values(&variance), epsilon);
        let (mean, beta) = (values(&mean), values(&beta));
        let norm = Normalisation {
            mean: &mean,
            scale: &scale,
            beta: &beta,
        };
        // As for PReLU: outside autodiff nothing else holds the activation.
        if let Some(slice) = owned_values(&mut x) {
            batch_norm_apply_in_place_host(slice, norm, plane);
            return x;
        }
        flex_tensor(batch_norm_apply_host(&values(&x), norm, plane), shape)
    }
}

/// The backward step of [`BatchNormBackend::batch_norm_train_channels`] on the inner backend.
#[derive(Debug)]
struct BatchNormTrainBackward;

/// What a training BatchNorm's backward step keeps: the input and gamma checkpoints, the batch
/// statistics as the forward computed them, epsilon.
type BatchNormState<B> = (NodeId, NodeId, FloatTensor<B>, FloatTensor<B>, f64);

impl<B: Backend + BatchNormBackend> Backward<B, 3> for BatchNormTrainBackward {
    type State = BatchNormState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let parents = ops.parents.map(|node| node.map(|node| node.id));
        register_batch_norm_grads::<B>(parents, ops.state, grad, grads, checkpointer);
    }
}

/// The BatchNorm part of a training BatchNorm's backward step: its input, gamma and beta
/// gradients from the output gradient `grad`, registered for those of the parents (`x`,
/// `gamma`, `beta`) that are tracked.
fn register_batch_norm_grads<B: Backend + BatchNormBackend>(
    [x_id, gamma_id, beta_id]: [Option<NodeId>; 3],
    (x_state, gamma_state, mean, variance, epsilon): BatchNormState<B>,
    grad: B::FloatTensorPrimitive,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
    let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
    let (x_grad, gamma_grad, beta_grad) =
        B::batch_norm_train_channels_backward(x, gamma, mean, variance, epsilon, grad);
    for (id, grad) in [(x_id, x_grad), (gamma_id, gamma_grad), (beta_id, beta_grad)] {
        if let Some(id) = id {
            grads.register::<B>(id, grad);
        }
    }
}

impl<B: Backend + BatchNormBackend, C: CheckpointStrategy> BatchNormBackend for Autodiff<B, C> {
    fn batch_norm_train_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let forward = |x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>| {
            let (x, gamma, beta) = (
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
            );
            B::batch_norm_train_channels(x, gamma, beta, epsilon)
        };
        // The statistics leave as constants: callers only feed them to the running statistics.
        match BatchNormTrainBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (x_state, gamma_state) = (prep.checkpoint(&x), prep.checkpoint(&gamma));
                let (out, mean, var) = forward(x, gamma, beta);
                let state = (x_state, gamma_state, mean.clone(), var.clone(), epsilon);
                let out = prep.finish(state, out);
                (out, Self::from_inner(mean), Self::from_inner(var))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, var) = forward(x, gamma, beta);
                (
                    prep.finish(out),
                    Self::from_inner(mean),
                    Self::from_inner(var),
                )
            }
        }
    }

    fn batch_norm_train_channels_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (x_grad, gamma_grad, beta_grad) = B::batch_norm_train_channels_backward(
            Self::inner(x),
            Self::inner(gamma),
            Self::inner(mean),
            Self::inner(variance),
            epsilon,
            Self::inner(grad),
        );
        (
            Self::from_inner(x_grad),
            Self::from_inner(gamma_grad),
            Self::from_inner(beta_grad),
        )
    }

    // Inference only: the graph gets the result as a constant.
    fn batch_norm_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::batch_norm_channels(
            Self::inner(x),
            Self::inner(gamma),
            Self::inner(beta),
            Self::inner(mean),
            Self::inner(variance),
            epsilon,
        ))
    }
}

/// Training-mode BatchNorm over dimension 1 of `x` `[N, C, ...]` plus `shortcut` (`x`'s shape):
/// the last BatchNorm of a residual unit and the unit's sum as one op, whose BatchNorm output
/// is never written. Its backward is the BatchNorm's ([`BatchNormBackend`]) and, for the
/// shortcut, the output gradient itself.
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormAddBackend: Backend {
    /// `(output + shortcut, mean, biased variance)`.
    fn batch_norm_add_train_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        shortcut: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl BatchNormAddBackend for Flex {
    fn batch_norm_add_train_channels(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        shortcut: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_train_on_host(&x, |x, plane| {
            let (gamma, beta) = (values(&gamma), values(&beta));
            batch_norm_add_train_host(x, &gamma, &beta, &values(&shortcut), epsilon, plane)
        })
    }
}

/// The backward step of [`BatchNormAddBackend::batch_norm_add_train_channels`].
#[derive(Debug)]
struct BatchNormAddTrainBackward;

impl<B: Backend + BatchNormBackend> Backward<B, 4> for BatchNormAddTrainBackward {
    type State = BatchNormState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta, node_shortcut] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_shortcut {
            grads.register::<B>(node.id, grad.clone());
        }
        let parents = [node_x, node_gamma, node_beta].map(|node| node.map(|node| node.id));
        register_batch_norm_grads::<B>(parents, ops.state, grad, grads, checkpointer);
    }
}

impl<B: Backend + BatchNormBackend + BatchNormAddBackend, C: CheckpointStrategy> BatchNormAddBackend
    for Autodiff<B, C>
{
    fn batch_norm_add_train_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        shortcut: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let forward = |x: FloatTensor<Self>,
                       gamma: FloatTensor<Self>,
                       beta: FloatTensor<Self>,
                       shortcut: FloatTensor<Self>| {
            B::batch_norm_add_train_channels(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                shortcut.into_primitive(),
                epsilon,
            )
        };
        // The statistics leave as constants, as in `batch_norm_train_channels`.
        match BatchNormAddTrainBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node(), shortcut.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (x_state, gamma_state) = (prep.checkpoint(&x), prep.checkpoint(&gamma));
                let (out, mean, var) = forward(x, gamma, beta, shortcut);
                let state = (x_state, gamma_state, mean.clone(), var.clone(), epsilon);
                let out = prep.finish(state, out);
                (out, Self::from_inner(mean), Self::from_inner(var))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, var) = forward(x, gamma, beta, shortcut);
                (
                    prep.finish(out),
                    Self::from_inner(mean),
                    Self::from_inner(var),
                )
            }
        }
    }
}

/// Training-mode BatchNorm then PReLU, both per channel (dimension 1 of `x` `[N, C, ...]`;
/// `gamma`, `beta`, `alpha` `[C]`), as one op: the BatchNorm's output is neither written forward
/// nor kept for the backward, which recomputes it.
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormPreluBackend: Backend {
    /// `(output, mean, biased variance)`.
    fn batch_norm_prelu_train_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(x_grad, gamma_grad, beta_grad, alpha_grad)` of
    /// [`Self::batch_norm_prelu_train_channels`].
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_prelu_train_channels_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

impl BatchNormPreluBackend for Flex {
    fn batch_norm_prelu_train_channels(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        alpha: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_train_on_host(&x, |x, plane| {
            let (gamma, beta) = (values(&gamma), values(&beta));
            batch_norm_prelu_train_host(x, &gamma, &beta, &values(&alpha), epsilon, plane)
        })
    }

    fn batch_norm_prelu_train_channels_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        alpha: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        mut grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let shape = x.shape();
        let (channels, plane) = channels_and_plane(&shape);
        // The gradient is consumed: overwrite it when it is a whole buffer, else a copy.
        let owned = grad.shape() == shape && owned_values(&mut grad).is_some();
        let mut grad = if owned {
            grad
        } else {
            flex_tensor(values(&grad).into_owned(), shape.clone())
        };
        let x = values(&x);
        let dz = owned_values(&mut grad).expect("a whole, unshared buffer");
        let (gamma_grad, beta_grad, alpha_grad) = batch_norm_prelu_backward_in_place_host(
            &x,
            dz,
            &values(&gamma),
            &values(&beta),
            &values(&alpha),
            &values(&mean),
            &values(&variance),
            epsilon,
            plane,
        );
        (
            grad,
            flex_tensor(gamma_grad, [channels]),
            flex_tensor(beta_grad, [channels]),
            flex_tensor(alpha_grad, [channels]),
        )
    }
}

/// The backward step of [`BatchNormPreluBackend::batch_norm_prelu_train_channels`] on the inner
/// backend.
#[derive(Debug)]
struct BatchNormPreluTrainBackward;

impl<B: Backend + BatchNormPreluBackend> Backward<B, 4> for BatchNormPreluTrainBackward {
    /// Input, gamma, beta and alpha checkpoints; the batch statistics as the forward computed
    /// them.
    type State = (
        [NodeId; 4],
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (states, mean, variance, epsilon) = ops.state;
        let [x, gamma, beta, alpha] =
            states.map(|state| checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(state));
        let (x_grad, gamma_grad, beta_grad, alpha_grad) =
            B::batch_norm_prelu_train_channels_backward(
                x, gamma, beta, alpha, mean, variance, epsilon, grad,
            );
        for (parent, grad) in ops
            .parents
            .into_iter()
            .zip([x_grad, gamma_grad, beta_grad, alpha_grad])
        {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Backend + BatchNormPreluBackend, C: CheckpointStrategy> BatchNormPreluBackend
    for Autodiff<B, C>
{
    fn batch_norm_prelu_train_channels(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [x.node(), gamma.node(), beta.node(), alpha.node()];
        match BatchNormPreluTrainBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let states = [
                    prep.checkpoint(&x),
                    prep.checkpoint(&gamma),
                    prep.checkpoint(&beta),
                    prep.checkpoint(&alpha),
                ];
                let (out, mean, var) = B::batch_norm_prelu_train_channels(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    alpha.into_primitive(),
                    epsilon,
                );
                let state = (states, mean.clone(), var.clone(), epsilon);
                let out = prep.finish(state, out);
                (out, Self::from_inner(mean), Self::from_inner(var))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, var) = B::batch_norm_prelu_train_channels(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    alpha.into_primitive(),
                    epsilon,
                );
                (
                    prep.finish(out),
                    Self::from_inner(mean),
                    Self::from_inner(var),
                )
            }
        }
    }

    fn batch_norm_prelu_train_channels_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (x_grad, gamma_grad, beta_grad, alpha_grad) =
            B::batch_norm_prelu_train_channels_backward(
                Self::inner(x),
                Self::inner(gamma),
                Self::inner(beta),
                Self::inner(alpha),
                Self::inner(mean),
                Self::inner(variance),
                epsilon,
                Self::inner(grad),
            );
        (
            Self::from_inner(x_grad),
            Self::from_inner(gamma_grad),
            Self::from_inner(beta_grad),
            Self::from_inner(alpha_grad),
        )
    }
}

/// BatchNorm (batch statistics) over dimension 1 of `x` `[N, C, H, W]`, PReLU with one slope per
/// channel, then a depthwise convolution without bias (`weight` `[C, 1, k, k]`), as one
/// training op whose in-between activation is never stored.
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormPreluDepthwiseBackend: Backend {
    /// `(convolution output, mean, biased variance)`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_prelu_depthwise_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad)` of
    /// [`Self::batch_norm_prelu_depthwise_train`] given its output's gradient.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn batch_norm_prelu_depthwise_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        geometry: (usize, usize, f64),
        grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

impl BatchNormPreluDepthwiseBackend for Flex {
    fn batch_norm_prelu_depthwise_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        alpha: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let kernel = dims4(&weight.shape())[2];
        let conv = geometry(dims4(&x.shape()), kernel, stride, padding);
        let (out, mean, var) = batch_norm_prelu_depthwise_train_host(
            &values(&x),
            &values(&gamma),
            &values(&beta),
            &values(&alpha),
            &values(&weight),
            epsilon,
            &conv,
        );
        let (oh, ow) = conv.output_size();
        (
            flex_tensor(out, [conv.batch, conv.channels, oh, ow]),
            flex_tensor(mean, [conv.channels]),
            flex_tensor(var, [conv.channels]),
        )
    }

    fn batch_norm_prelu_depthwise_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        alpha: FlexTensor,
        weight: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        (stride, padding, epsilon): (usize, usize, f64),
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let weight_shape = weight.shape();
        let kernel = dims4(&weight_shape)[2];
        let x_shape = x.shape();
        let conv = geometry(dims4(&x_shape), kernel, stride, padding);
        let (x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad) =
            batch_norm_prelu_depthwise_backward_host(
                &values(&x),
                &values(&grad),
                &values(&gamma),
                &values(&beta),
                &values(&alpha),
                &values(&weight),
                (&values(&mean), &values(&variance), epsilon),
                &conv,
            );
        let channels = [conv.channels];
        (
            flex_tensor(x_grad, x_shape),
            flex_tensor(gamma_grad, channels),
            flex_tensor(beta_grad, channels),
            flex_tensor(alpha_grad, channels),
            flex_tensor(weight_grad, weight_shape),
        )
    }
}

/// The backward step of [`BatchNormPreluDepthwiseBackend::batch_norm_prelu_depthwise_train`] on
/// the inner backend.
#[derive(Debug)]
struct BatchNormPreluDepthwiseBackward;

impl<B: Backend + BatchNormPreluDepthwiseBackend> Backward<B, 5>
    for BatchNormPreluDepthwiseBackward
{
    /// Input, gamma, beta, alpha and weight checkpoints; the batch statistics as the forward
    /// computed them; `(stride, padding, epsilon)`.
    type State = (
        [NodeId; 5],
        (B::FloatTensorPrimitive, B::FloatTensorPrimitive),
        (usize, usize, f64),
    );

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (states, (mean, variance), geometry) = ops.state;
        let [x, gamma, beta, alpha, weight] =
            states.map(|state| checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(state));
        let (x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad) =
            B::batch_norm_prelu_depthwise_backward(
                x, gamma, beta, alpha, weight, mean, variance, geometry, grad,
            );
        for (parent, grad) in
            ops.parents
                .into_iter()
                .zip([x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad])
        {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Backend + BatchNormPreluDepthwiseBackend, C: CheckpointStrategy>
    BatchNormPreluDepthwiseBackend for Autodiff<B, C>
{
    fn batch_norm_prelu_depthwise_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [
            x.node(),
            gamma.node(),
            beta.node(),
            alpha.node(),
            weight.node(),
        ];
        let forward = |x: FloatTensor<Self>,
                       gamma: FloatTensor<Self>,
                       beta: FloatTensor<Self>,
                       alpha: FloatTensor<Self>,
                       weight: FloatTensor<Self>| {
            B::batch_norm_prelu_depthwise_train(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                alpha.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
                epsilon,
            )
        };
        match BatchNormPreluDepthwiseBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let states = [
                    prep.checkpoint(&x),
                    prep.checkpoint(&gamma),
                    prep.checkpoint(&beta),
                    prep.checkpoint(&alpha),
                    prep.checkpoint(&weight),
                ];
                let (out, mean, var) = forward(x, gamma, beta, alpha, weight);
                let state = (
                    states,
                    (mean.clone(), var.clone()),
                    (stride, padding, epsilon),
                );
                let out = prep.finish(state, out);
                (out, Self::from_inner(mean), Self::from_inner(var))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, var) = forward(x, gamma, beta, alpha, weight);
                (
                    prep.finish(out),
                    Self::from_inner(mean),
                    Self::from_inner(var),
                )
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn batch_norm_prelu_depthwise_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        geometry: (usize, usize, f64),
        grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad) =
            B::batch_norm_prelu_depthwise_backward(
                Self::inner(x),
                Self::inner(gamma),
                Self::inner(beta),
                Self::inner(alpha),
                Self::inner(weight),
                Self::inner(mean),
                Self::inner(variance),
                geometry,
                Self::inner(grad),
            );
        (
            Self::from_inner(x_grad),
            Self::from_inner(gamma_grad),
            Self::from_inner(beta_grad),
            Self::from_inner(alpha_grad),
            Self::from_inner(weight_grad),
        )
    }
}
