//! The CPU kernels every backbone calls, behind one switch: qud-cpu-kernels' ops with the
//! `cpu-kernels` feature (the default; they serve flex and pass anything else to Burn, and
//! `QUD_CPU_KERNELS=off` turns them off at run time), Burn's own ops without it (a build for GPUs
//! only then compiles no kernel code into the models).

#[cfg(feature = "cpu-kernels")]
pub use qud_cpu_kernels::{
    batch_norm, batch_norm_add_train, batch_norm_prelu_depthwise_train, batch_norm_prelu_train,
    batch_norm_train, conv2d, prelu, BatchNormTrain,
};

#[cfg(not(feature = "cpu-kernels"))]
pub use burn_ops::*;

/// The same functions on Burn's ops, with the kernels' signatures and results.
#[cfg(not(feature = "cpu-kernels"))]
mod burn_ops {
    use burn::nn::conv::Conv2d;
    use burn::prelude::*;

    /// Batch statistics per channel and the normalised output.
    pub struct BatchNormTrain<const D: usize> {
        pub output: Tensor<D>,
        pub mean: Tensor<1>,
        /// Biased (divided by the number of values per channel).
        pub variance: Tensor<1>,
    }

    pub fn conv2d(conv: &Conv2d, input: Tensor<4>) -> Tensor<4> {
        conv.forward(input)
    }

    pub fn prelu<const D: usize>(x: Tensor<D>, alpha: Tensor<1>) -> Tensor<D> {
        burn::tensor::activation::prelu(x, alpha)
    }

    pub fn batch_norm<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        mean: Tensor<1>,
        variance: Tensor<1>,
        epsilon: f64,
    ) -> Tensor<D> {
        burn::tensor::module::batch_norm(x, gamma, beta, mean, variance, epsilon)
    }

    pub fn batch_norm_train<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        epsilon: f64,
    ) -> BatchNormTrain<D> {
        let result = burn::tensor::module::batch_norm_train(x, gamma, beta, epsilon);
        BatchNormTrain {
            output: result.output,
            mean: result.mean.detach(),
            variance: result.variance.detach(),
        }
    }

    pub fn batch_norm_add_train<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        shortcut: Tensor<D>,
        epsilon: f64,
    ) -> BatchNormTrain<D> {
        let result = batch_norm_train(x, gamma, beta, epsilon);
        BatchNormTrain {
            output: shortcut + result.output,
            ..result
        }
    }

    pub fn batch_norm_prelu_train<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        alpha: Tensor<1>,
        epsilon: f64,
    ) -> BatchNormTrain<D> {
        let result = batch_norm_train(x, gamma, beta, epsilon);
        BatchNormTrain {
            output: prelu(result.output, alpha),
            ..result
        }
    }

    pub fn batch_norm_prelu_depthwise_train(
        x: Tensor<4>,
        (gamma, beta, alpha): (Tensor<1>, Tensor<1>, Tensor<1>),
        conv: &Conv2d,
        epsilon: f64,
    ) -> BatchNormTrain<4> {
        let result = batch_norm_prelu_train(x, gamma, beta, alpha, epsilon);
        BatchNormTrain {
            output: conv.forward(result.output),
            ..result
        }
    }
}
