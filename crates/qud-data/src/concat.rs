//! Several training sources read as one set: samples of each part in turn, in the given order.

use crate::{DataError, FaceDataset, FingerprintMode, Fnv, Sample};
use std::sync::Arc;

/// Parts appended one after another. Labelled only when every part is: identity labels of part
/// k are shifted past the identities of parts 0..k, so identities never merge across parts.
pub struct ConcatDataset {
    parts: Vec<Arc<dyn FaceDataset>>,
    /// First global index of each part, plus the total at the end.
    starts: Vec<usize>,
    /// First identity of each part, when every part is labelled.
    label_starts: Option<Vec<u32>>,
}

impl ConcatDataset {
    pub fn new(parts: Vec<Arc<dyn FaceDataset>>) -> Self {
        let mut starts = vec![0];
        for part in &parts {
            starts.push(starts.last().copied().unwrap_or(0) + part.len());
        }
        let label_starts = parts
            .iter()
            .map(|p| p.num_identities())
            .collect::<Option<Vec<usize>>>()
            .map(|counts| {
                let mut first = 0u32;
                counts
                    .into_iter()
                    .map(|k| {
                        let here = first;
                        first += k as u32;
                        here
                    })
                    .collect()
            });
        Self {
            parts,
            starts,
            label_starts,
        }
    }
}

impl ConcatDataset {
    /// `(part, index within it)` of sample `index`.
    fn locate(&self, index: usize) -> Result<(usize, usize), DataError> {
        if index >= self.len() {
            return Err(DataError::OutOfRange {
                index,
                len: self.len(),
            });
        }
        let part = self.starts.partition_point(|&s| s <= index) - 1;
        Ok((part, index - self.starts[part]))
    }

    /// A part's label as a label of the whole (identities numbered after the earlier parts').
    fn global_label(&self, part: usize, label: Option<u32>) -> Option<u32> {
        match &self.label_starts {
            Some(first) => label.map(|l| l + first[part]),
            None => None,
        }
    }
}

impl FaceDataset for ConcatDataset {
    fn len(&self) -> usize {
        *self.starts.last().unwrap_or(&0)
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (part, local) = self.locate(index)?;
        let mut sample = self.parts[part].get(local)?;
        sample.label = self.global_label(part, sample.label);
        Ok(sample)
    }

    fn get_into(
        &self,
        index: usize,
        flip: bool,
        out: &mut [f32],
    ) -> Result<Option<u32>, DataError> {
        let (part, local) = self.locate(index)?;
        let label = self.parts[part].get_into(local, flip, out)?;
        Ok(self.global_label(part, label))
    }

    fn num_identities(&self) -> Option<usize> {
        self.label_starts
            .as_ref()
            .map(|_| self.parts.iter().filter_map(|p| p.num_identities()).sum())
    }

    fn fingerprint(&self, mode: FingerprintMode) -> Result<u64, DataError> {
        let mut h = Fnv::default().bytes(b"concat").u64(self.parts.len() as u64);
        for part in &self.parts {
            h = h.u64(part.fingerprint(mode)?);
        }
        Ok(h.finish())
    }

    fn describe(&self) -> String {
        let parts: Vec<String> = self.parts.iter().map(|p| p.describe()).collect();
        format!("{} samples from [{}]", self.len(), parts.join("; "))
    }
}
