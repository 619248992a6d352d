//! Activations fused into one vectorized CPU pass.
//!
//! Burn's flex backend computes `sigmoid` and `exp` one element at a time through libm, with a
//! branch on the sign, so CLIP's QuickGELU (`x * sigmoid(1.702 x)`, three passes) was a third
//! of a scope-classifier training step and its backward recomputes the sigmoid again. On
//! flex, [`quick_gelu`] runs one branch-free pass compiled for the widest SIMD the CPU has
//! (AVX-512, AVX2 or SSE2, chosen at run time by `pulp`), and its gradient one more. Other
//! backends (wgpu, cuda: their fusion compiles the composition into one kernel already) get
//! the composition itself.

use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;

/// QuickGELU's sigmoid scale (CLIP's `quick_gelu`).
const QUICK_GELU_SCALE: f32 = 1.702;

/// CLIP's QuickGELU, `x * sigmoid(1.702 x)`, as one fused pass on flex (with its own gradient
/// under autodiff).
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if flex::applies(&x) {
        return flex::quick_gelu(x);
    }
    quick_gelu_composed(x)
}

/// QuickGELU from Burn's own ops: the definition [`quick_gelu`] computes.
pub fn quick_gelu_composed<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * sigmoid(x * QUICK_GELU_SCALE)
}

/// `exp(x)` without branches or libm, so that it vectorizes: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, a degree-6 polynomial for `exp(r)` (Cephes' `expf` coefficients,
/// relative error about 2e-7), and `2^n` written into the exponent bits. `x` is clamped to
/// the range whose result is a normal f32 (below it, the smallest normal instead of 0).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, also where `round` is not a vector op.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.37);
    // t's low mantissa bits hold n as an integer (read below without a float-to-int
    // conversion, whose saturating form does not vectorize).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: n + 127 in the exponent field.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    e * f32::from_bits(biased << 23)
}

/// `sigmoid(1.702 x)`.
#[inline(always)]
fn quick_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-QUICK_GELU_SCALE * x))
}

/// QuickGELU of each value, in place.
pub fn quick_gelu_f32(values: &mut [f32]) {
    pulp::Arch::new().dispatch(|| {
        for x in values.iter_mut() {
            *x *= quick_sigmoid(*x);
        }
    });
}

/// QuickGELU's gradient: each `grad` times d/dx QuickGELU at the matching input,
/// `s + 1.702 x s (1 - s)` with `s = sigmoid(1.702 x)`, in place of `grad`.
pub fn quick_gelu_backward_f32(inputs: &[f32], grad: &mut [f32]) {
    assert_eq!(inputs.len(), grad.len(), "an input per gradient");
    pulp::Arch::new().dispatch(|| {
        for (g, &x) in grad.iter_mut().zip(inputs) {
            let s = quick_sigmoid(x);
            *g *= s + QUICK_GELU_SCALE * x * s * (1.0 - s);
        }
    });
}

#[cfg(feature = "flex")]
mod flex {
    //! The fused kernels as a Burn backend extension: flex runs them, `Autodiff<flex>` records
    //! their gradient.

    use burn::backend::autodiff::NodeId;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, DType, DispatchDevice, Flex, backend_extension};
    use burn::tensor::Tensor;

    /// Whether `x` lives on flex (with or without autodiff) as f32, where the kernels apply.
    pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
        matches!(
            x.device().as_dispatch().clone().inner(),
            DispatchDevice::Flex(_)
        ) && x.dtype() == DType::F32
    }

    pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        Tensor::from_dispatch(<burn::backend::Dispatch as FusedActivations>::quick_gelu(
            x.into_dispatch(),
        ))
    }

    #[backend_extension(Flex, Autodiff)]
    pub trait FusedActivations: Backend {
        /// QuickGELU of every value.
        fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
        /// `grad` times QuickGELU's derivative at `x`.
        fn quick_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    /// `tensor` as a unique, contiguous buffer starting at its first element, which the
    /// kernels may write in place.
    fn owned(tensor: FlexTensor) -> FlexTensor {
        let layout = tensor.layout();
        if tensor.is_unique() && layout.is_contiguous() && layout.start_offset() == 0 {
            tensor
        } else {
            tensor.to_contiguous()
        }
    }

    /// A contiguous view of `tensor`'s values, copied only when its layout is not.
    fn contiguous(tensor: FlexTensor) -> FlexTensor {
        let layout = tensor.layout();
        if layout.is_contiguous() && layout.start_offset() == 0 {
            tensor
        } else {
            tensor.to_contiguous()
        }
    }

    impl FusedActivations for Flex {
        fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
            let mut x = owned(x);
            let n = x.layout().num_elements();
            super::quick_gelu_f32(&mut x.storage_mut::<f32>()[..n]);
            x
        }

        fn quick_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            assert_eq!(
                x.layout().shape(),
                grad.layout().shape(),
                "a gradient per input"
            );
            let x = contiguous(x);
            let mut grad = owned(grad);
            let n = grad.layout().num_elements();
            super::quick_gelu_backward_f32(
                &x.storage::<f32>()[..n],
                &mut grad.storage_mut::<f32>()[..n],
            );
            grad
        }
    }

    impl<B: Backend + FusedActivations, C: CheckpointStrategy> FusedActivations for Autodiff<B, C> {
        fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct QuickGelu;

            impl<B: Backend + FusedActivations> Backward<B, 1> for QuickGelu {
                // The input, from which the gradient recomputes the sigmoid.
                type State = NodeId;

                fn backward(
                    self,
                    ops: Ops<Self::State, 1>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let input = checkpointer.retrieve_node_output(ops.state);
                    unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                        B::quick_gelu_backward(input, grad)
                    });
                }
            }

            match QuickGelu
                .prepare::<C>([x.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = prep.checkpoint(&x);
                    prep.finish(state, B::quick_gelu(x.into_primitive()))
                }
                OpsKind::UnTracked(prep) => prep.finish(B::quick_gelu(x.into_primitive())),
            }
        }

        fn quick_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            // A second derivative is not needed by anything mmke trains: no graph is kept.
            let x = x.into_primitive();
            let grad = grad.into_primitive();
            <Self as burn::backend::AutodiffBackend>::from_inner(B::quick_gelu_backward(x, grad))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn exp_matches_libm_to_a_few_ulp_over_the_normal_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let relative = (exp_f32(x) - x.exp()).abs() / x.exp();
            worst = worst.max(relative);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        // Clamped, not infinite or zero.
        assert!(exp_f32(200.0).is_finite() && exp_f32(-200.0) > 0.0);
    }

    fn values() -> Vec<f32> {
        (0..1000).map(|i| (i as f32 - 500.0) * 0.031).collect()
    }

    #[test]
    fn the_fused_quick_gelu_is_the_composition_on_flex() {
        let device = Device::flex();
        let n = values().len();
        let x = Tensor::<2>::from_data(TensorData::new(values(), [10, n / 10]), &device);
        assert!(flex::applies(&x), "the fused kernel runs on flex");
        let fused = quick_gelu(x.clone()).into_data();
        let composed = quick_gelu_composed(x.clone()).into_data();
        fused.assert_approx_eq::<f32>(&composed, burn::tensor::Tolerance::absolute(1e-6));
        // A strided view (transposed) gives the same values as its contiguous copy.
        let t = quick_gelu(x.clone().swap_dims(0, 1)).into_data();
        let c = quick_gelu_composed(x.swap_dims(0, 1)).into_data();
        t.assert_approx_eq::<f32>(&c, burn::tensor::Tolerance::absolute(1e-6));
    }

    #[test]
    fn the_fused_gradient_is_the_composition_s_gradient() {
        let device = Device::flex().autodiff();
        let n = values().len();
        let grad_of = |f: fn(Tensor<1>) -> Tensor<1>| {
            let x = Tensor::<1>::from_data(TensorData::new(values(), [n]), &device).require_grad();
            assert!(flex::applies(&x), "the fused kernel runs on autodiff flex");
            // A weighted sum, so each element's gradient is scaled differently.
            let w = Tensor::<1>::from_data(
                TensorData::new((0..n).map(|i| 1.0 + i as f32 * 0.01).collect(), [n]),
                &device,
            );
            let grads = (f(x.clone()) * w).sum().backward();
            x.grad(&grads).expect("x has a gradient").into_data()
        };
        let fused = grad_of(quick_gelu);
        let composed = grad_of(quick_gelu_composed);
        fused.assert_approx_eq::<f32>(&composed, burn::tensor::Tolerance::absolute(1e-5));
        // And no gradient flows through an input that does not require one.
        let x = Tensor::<1>::from_data(TensorData::new(values(), [n]), &device);
        let y = quick_gelu(x.clone());
        assert!(!y.is_require_grad());
    }
}
