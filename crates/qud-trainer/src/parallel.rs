//! Data parallelism over `run.devices`: a replica of the student per device, each on its
//! consecutive piece of the global batch, gradients summed onto the main device.
//!
//! The semantics are PyTorch DDP's (`DistributedDataParallel` with `broadcast_buffers=True`):
//! - the loss is the global batch's mean: each device's mean is weighted by its share;
//! - gradients of all devices are summed (Burn's [`MultiGradientsParams`]), then clipped by their
//!   global norm and applied once, on the main device, whose weights every replica copies at the
//!   start of the next step;
//! - BatchNorm normalises with each device's own batch statistics, and the running statistics
//!   kept are those of device 0 (DDP broadcasts rank 0's buffers);
//! - the teacher keys of all devices are enqueued in rank order, which is the batch's order, so
//!   the queue is exactly that of one device holding the whole batch.

use crate::setup::Student;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::prelude::*;

/// A copy of `student` on `device` for one step: its own parameters under the same ids (so that
/// gradients line up) and its own BatchNorm running state (which is discarded).
pub(crate) fn replica(student: &Student, device: &Device) -> Student {
    // `valid()` gives fresh running-state cells; `fork` alone would move the shared ones.
    student.valid().train().fork(&device.clone().autodiff())
}

/// `work(rank)` for every rank, results in rank order. Rank 0 runs on this thread: it owns the
/// main model, whose BatchNorm running state Burn records per thread. Ranks on a device other
/// than rank 0's run on threads of their own; replicas sharing rank 0's device run here after it.
pub(crate) fn for_each_rank<T: Send>(
    devices: &[Device],
    work: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let work = &work;
    std::thread::scope(|scope| {
        let spawned: Vec<_> = (1..devices.len())
            .filter(|&rank| devices[rank] != devices[0])
            .map(|rank| (rank, scope.spawn(move || work(rank))))
            .collect();
        let mut results: Vec<Option<T>> = (0..devices.len()).map(|_| None).collect();
        results[0] = Some(work(0));
        for rank in 1..devices.len() {
            if devices[rank] == devices[0] {
                results[rank] = Some(work(rank));
            }
        }
        for (rank, handle) in spawned {
            let result = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            results[rank] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.expect("every rank ran"))
            .collect()
    })
}

/// The sum of every device's gradients, on `device` (the main one), for `model`'s parameters.
pub(crate) fn sum_gradients<M: Module>(
    model: &M,
    mut parts: Vec<(GradientsParams, Device)>,
    device: &Device,
) -> GradientsParams {
    if parts.len() == 1 {
        return parts.pop().expect("one part").0;
    }
    struct Gather<'a> {
        sources: MultiGradientsParams,
        summed: GradientsParams,
        device: &'a Device,
    }
    impl ModuleVisitor for Gather<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some((grad, _)) = self.sources.remove::<D>(param.id) {
                self.summed
                    .register::<D>(param.id, grad.to_device(self.device));
            }
        }
    }
    let mut gather = Gather {
        sources: MultiGradientsParams { grads: parts },
        summed: GradientsParams::new(),
        device,
    };
    model.visit(&mut gather);
    gather.summed
}
