//! Timing on the device timeline with CUDA events: the per-stage breakdown of `bench` and
//! `--profile` (see [`Backend::mark`](crate::backend::Backend::mark)), and the per-layer timing
//! of one forward pass.

use std::collections::BTreeMap;

use cudarc::driver::CudaEvent;

use super::device::Dev;
use crate::backend::Stage;
use crate::error::{Error, Result};

/// A timing event (cuEventCreate with default flags).
pub(super) fn new_event(dev: &Dev) -> Result<CudaEvent> {
    dev.ctx
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| Error::cuda("cuEventCreate", e))
}

/// Stage timing with CUDA events (see [`Backend::mark`]).
#[derive(Default)]
pub(super) struct Profiler {
    pub on: bool,
    /// Events in record order; the work between event i and i+1 belongs to `events[i].0`.
    events: Vec<(Option<Stage>, CudaEvent)>,
    spare: Vec<CudaEvent>,
}

impl Profiler {
    pub(super) fn record(&mut self, dev: &Dev, stage: Option<Stage>) -> Result<()> {
        let ev = match self.spare.pop() {
            Some(e) => e,
            None => new_event(dev)?,
        };
        ev.record(&dev.stream)
            .map_err(|e| Error::cuda("cuEventRecord", e))?;
        self.events.push((stage, ev));
        Ok(())
    }

    pub(super) fn take(&mut self, dev: &Dev) -> Result<Vec<(Stage, f64)>> {
        let Some(&(open, _)) = self.events.last() else {
            return Ok(Vec::new());
        };
        if open.is_some() {
            // Close the running segment now; it continues after this call.
            self.record(dev, open)?;
        }
        let mut acc: BTreeMap<Stage, f64> = BTreeMap::new();
        for pair in self.events.windows(2) {
            if let Some(stage) = pair[0].0 {
                let ms = pair[0]
                    .1
                    .elapsed_ms(&pair[1].1)
                    .map_err(|e| Error::cuda("cuEventElapsedTime", e))?;
                *acc.entry(stage).or_insert(0.0) += ms as f64;
            }
        }
        let last = self.events.pop().expect("non-empty");
        self.spare.extend(self.events.drain(..).map(|(_, e)| e));
        if last.0.is_some() {
            self.events.push(last);
        } else {
            self.spare.push(last.1);
        }
        Ok(Stage::ALL
            .iter()
            .filter_map(|s| acc.get(s).map(|&ms| (*s, ms)))
            .collect())
    }

    pub(super) fn clear(&mut self) {
        self.spare.extend(self.events.drain(..).map(|(_, e)| e));
    }
}

/// Events between the layers of one forward pass: `mark` after each layer (in the order of
/// [`Vgg::layer_costs`](crate::model::Vgg::layer_costs)), then `take` the milliseconds of each.
pub(super) struct LayerEvents {
    events: Vec<CudaEvent>,
    used: usize,
}

impl LayerEvents {
    /// Events for `layers` layers (one more for the start).
    pub(super) fn new(dev: &Dev, layers: usize) -> Result<Self> {
        let events = (0..=layers)
            .map(|_| new_event(dev))
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerEvents { events, used: 0 })
    }

    /// Record the next event (the first marks the start).
    pub(super) fn mark(&mut self, dev: &Dev) -> Result<()> {
        let ev = self.events.get(self.used).ok_or_else(|| {
            Error::Invalid(format!(
                "layer timing: more than {} layers marked",
                self.events.len() - 1
            ))
        })?;
        ev.record(&dev.stream)
            .map_err(|e| Error::cuda("cuEventRecord", e))?;
        self.used += 1;
        Ok(())
    }

    /// Milliseconds of each layer marked since `new` (waits for them), and starts over.
    pub(super) fn take(&mut self) -> Result<Vec<f64>> {
        let used = std::mem::take(&mut self.used);
        self.events[..used]
            .windows(2)
            .map(|p| {
                p[0].elapsed_ms(&p[1])
                    .map(f64::from)
                    .map_err(|e| Error::cuda("cuEventElapsedTime", e))
            })
            .collect()
    }
}
