//! Mixed precision (`run.precision`): the student's forward and backward in f16 or bf16 over f32
//! master weights (`qud_backbone::cast_trainable`), while the loss, the queue, the teacher,
//! BatchNorm and the optimizer state stay f32. f16 adds dynamic loss scaling by the rule of
//! PyTorch's `torch.amp.GradScaler` (defaults: 2^16, x0.5 on overflow, x2 after 2000 good
//! steps, the overflowing step skipped); bf16 has f32's range and needs none.

use crate::TrainError;
use burn::tensor::{DType, Device, FloatDType};
use qud_config::Precision;
use serde::{Deserialize, Serialize};

/// The dtype the student computes in, when it is not f32.
pub(crate) fn compute_dtype(precision: Precision) -> Option<FloatDType> {
    match precision {
        Precision::F32 => None,
        Precision::F16 => Some(FloatDType::F16),
        Precision::Bf16 => Some(FloatDType::BF16),
    }
}

/// Refuse a precision one of the run's devices cannot compute in.
pub(crate) fn check_supported(precision: Precision, devices: &[Device]) -> Result<(), TrainError> {
    let Some(dtype) = compute_dtype(precision) else {
        return Ok(());
    };
    let wanted = match dtype {
        FloatDType::F16 => DType::F16,
        _ => DType::BF16,
    };
    match devices.iter().find(|d| !d.supports_dtype(wanted)) {
        Some(device) => Err(TrainError::Precision {
            precision: format!("{precision:?}"),
            device: format!("{device:?}"),
            dtype: format!("{wanted:?}"),
        }),
        None => Ok(()),
    }
}

/// The f16 loss scale and its growth counter; part of a checkpoint, so that a resumed run scales
/// as the uninterrupted one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Steps since the last overflow or growth.
    pub good_steps: usize,
}

impl LossScale {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }

    /// Account for a step whose unscaled gradients were `finite` or not; returns whether the
    /// step is applied (an overflowing one is skipped and the scale halved).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= 0.5;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::LossScale;

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_2000_good_steps() {
        let mut s = LossScale::new();
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }
}
