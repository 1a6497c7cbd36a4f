//! `prepare`: the arena for a plan, and every batch size the run will use planned and tuned
//! before the first image (see `conv.rs` for the ladders and the tuning).

use std::sync::Arc;

use half::f16;

use super::conv::{self, BatchLadder, ConvKey, EventPair, Fp8Tuning, TuneArena, LADDER_STEPS};
use super::device::{drv_err, gpu_oom, verbose};
use super::forward_plan::{prefix_end, stage_dims, Prefix};
use super::fp8::{next_fp8_convs, Fp8State};
use super::weights::upload_model;
use super::{CudaBackend, Prepared, CPAD};
use crate::backend::{Plan, Precision};
use crate::error::{Error, Result};
use crate::model::{Vgg, POOLED};

/// cuDNN's legacy descriptors address tensors with 32-bit element counts.
const CUDNN_MAX_ELEMS: usize = i32::MAX as usize;

/// Sub-batch sizes tried for blocks 1–2 (their activations, ≈ 6.4 MB per 224² image at the
/// first convs, stay in the 50 MB L2 for a few images at a time).
const PREFIX_ROWS: [usize; 4] = [4, 8, 16, 32];

impl CudaBackend {
    pub(super) fn prepare_plan(&mut self, model: &Arc<Vgg>, plan: Plan) -> Result<()> {
        let s = plan.input_size;
        if plan.max_images == 0 || plan.max_masks == 0 || s == 0 {
            return Err(Error::Invalid(format!("prepare: empty plan {plan:?}")));
        }
        model.validate().map_err(Error::Invalid)?;
        if plan.capture.stage >= model.features.len() {
            return Err(Error::Invalid(format!(
                "capture stage {} out of range ({} feature stages)",
                plan.capture.stage,
                model.features.len()
            )));
        }
        let dims = stage_dims(model, s)?;
        let last = *dims.last().expect("validated models have feature stages");
        let (h, w, c) = (last.out_h, last.out_w, last.out_c);
        let capture = model.capture_shape(plan.capture, s);
        if capture.c != dims[plan.capture.stage].out_c || capture.c == 3 {
            return Err(Error::Invalid(format!(
                "layer {}: capturing a {}-channel map is not supported by the CUDA backend",
                model.capture_name(plan.capture),
                capture.c
            )));
        }
        let rows_max = plan.max_images.max(plan.max_masks);
        let mut per_row = s * s * CPAD;
        for d in &dims {
            per_row = per_row.max(d.out_len());
            if rows_max.saturating_mul(d.in_len().max(d.out_len())) > CUDNN_MAX_ELEMS {
                return Err(gpu_oom(format!(
                    "a batch of {rows_max} × {} elements exceeds cuDNN's 2^31-element tensor limit",
                    d.in_len().max(d.out_len())
                )));
            }
        }
        per_row = per_row.max(c * POOLED * POOLED);
        for l in &model.classifier {
            per_row = per_row.max(l.fout);
        }

        // Free the old plan (and the graphs that point into it) before allocating the new one:
        // the caller may be retrying smaller.
        self.graphs.clear();
        self.prep = None;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| drv_err("prepare", e))?;
        self.uploads.synchronized();
        // Where set-up time goes (the report's `setup_s`): phase, seconds.
        let mut setup: Vec<(&'static str, f64)> = Vec::new();
        let mut lap = {
            let mut last = std::time::Instant::now();
            move |setup: &mut Vec<(&'static str, f64)>, phase: &'static str| {
                let now = std::time::Instant::now();
                setup.push((phase, now.duration_since(last).as_secs_f64()));
                last = now;
            }
        };
        if !self
            .model
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(&m.model, model))
        {
            self.model = None;
            let pack_wg = self.kernels.has_conv_wg();
            self.model = Some(upload_model(&self.dev, model, pack_wg)?);
        }
        lap(&mut setup, "weights");

        let buf_len = rows_max.checked_mul(per_row).ok_or_else(|| {
            gpu_oom(format!(
                "activation buffers of {rows_max} × {per_row} elements"
            ))
        })?;
        let dev = &self.dev;
        let mut bufs = [
            dev.alloc::<f16>(buf_len, "activation buffer A")?,
            dev.alloc::<f16>(buf_len, "activation buffer B")?,
        ];
        // Small buffers at their steady-state sizes; scores pending from the old plan are dropped.
        let sc = &mut self.scratch;
        sc.pending_len = 0;
        sc.staging.get(dev, s * s * 3, "image staging buffer")?;
        sc.scores.get(dev, rows_max, "scores")?;
        sc.pending
            .get(dev, plan.max_images * capture.c * 2, "pending scores")?;
        sc.weights.get(dev, capture.c, "channel weights")?;
        sc.low
            .get(dev, capture.h * capture.w, "low-resolution map")?;
        sc.map.get(dev, s * s, "map")?;
        sc.flat.get(dev, 1, "flat flag")?;

        // Every batch size the run will use, and blocks 1–2's sub-batch candidates.
        let masks = BatchLadder::new(plan.max_masks, LADDER_STEPS);
        let images = BatchLadder::new(plan.max_images, LADDER_STEPS);
        let end = prefix_end(model, &dims);
        // Under FP8 only sub-batches of a mask-ladder size: FP8 plans exist only at those, and
        // the prefix is timed before any FP8 scales exist, so a smaller sub-batch would win that
        // timing in FP16 and then keep blocks 1–2 out of FP8.
        let subs: Vec<usize> = match end {
            Some(_) => PREFIX_ROWS
                .iter()
                .copied()
                .filter(|&r| r < plan.max_masks && plan.max_masks.is_multiple_of(r))
                .filter(|r| self.precision != Precision::Fp8 || masks.sizes().contains(r))
                .collect(),
            None => Vec::new(),
        };
        let dm = self.model.as_ref().expect("uploaded above");
        let mut keys = Vec::new();
        for (i, conv) in dm.convs.iter().enumerate() {
            if conv.is_none() {
                continue;
            }
            let pre = plan.capture.stage == i && plan.capture.pre_relu;
            for &rows in masks.sizes() {
                keys.push(ConvKey {
                    stage: i,
                    rows,
                    identity: false,
                });
            }
            for &rows in images.sizes() {
                keys.push(ConvKey {
                    stage: i,
                    rows,
                    identity: pre,
                });
            }
            if end.is_some_and(|e| i < e) {
                for &rows in &subs {
                    keys.push(ConvKey {
                        stage: i,
                        rows,
                        identity: false,
                    });
                }
            }
        }
        // The full mask batch first (most of the masked forwards run at it), then blocks 1–2's
        // sub-batch sizes (they run it when sub-batched): the graph API's time budget (FP16 and
        // FP8 plans) goes to them before the remainder sizes.
        let priority = |k: &ConvKey| match k.rows {
            r if r == plan.max_masks => 0,
            r if subs.contains(&r) && end.is_some_and(|e| k.stage < e) => 1,
            _ => 2,
        };
        keys.sort_by_key(|k| (priority(k), *k));
        keys.dedup();

        // Tune on random data in [0, 1) (post-ReLU activations are non-negative): zero-filled
        // buffers draw less power and time optimistically.
        for (i, b) in bufs.iter_mut().enumerate() {
            let n = b.len();
            self.kernels.fill_uniform_f16(
                &dev.stream,
                &mut b.slice_mut(..),
                n,
                0x5EED + i as u64,
                0.0,
                1.0,
            )?;
        }
        let mut fp8 = match self.precision {
            Precision::Fp8 => Some(Fp8State::new(
                dev,
                model,
                &dm.convs,
                rows_max,
                |i| dims[i].in_len(),
                (self.prefer_fp8, self.kernels.has_conv_wg()),
            )?),
            Precision::Fp16 => None,
        };
        // The workspace grows during the tuning to what each timed candidate needs, within what
        // is free once everything else is allocated.
        let next_fp8 = fp8.as_ref().map_or_else(Vec::new, |f| {
            let is_conv: Vec<bool> = dm.convs.iter().map(Option::is_some).collect();
            let fp8: Vec<bool> = f.filters.iter().map(Option::is_some).collect();
            next_fp8_convs(&is_conv, &fp8)
        });
        let ws_limit = conv::ws_cap(dev)?;
        let mut workspace = dev.alloc::<u8>(0, "cuDNN workspace")?;
        lap(&mut setup, "arena");
        let (mut convs, ws_used) = conv::plan_all(
            dev,
            &self.dnn,
            &dm.convs,
            &dims,
            &keys,
            (&self.relu, &self.identity),
            TuneArena {
                bufs: &bufs,
                workspace: &mut workspace,
            },
            ws_limit,
            (self.graph_use, plan.max_masks),
            (self.direct_use, &mut self.direct_check),
            &self.kernels,
            fp8.as_mut().map(|state| Fp8Tuning {
                state,
                rows: masks.sizes(),
                next_fp8: &next_fp8,
                keep_fp16: &self.keep_fp16,
            }),
            &mut self.plan_cache,
        )?;
        // The tuning's passes, then the rest of it (the lap covers the passes too: not summed).
        setup.extend(convs.pass_s);
        lap(&mut setup, "conv tuning in all (not to add to its passes)");
        conv::plan_fused_pools(
            dev,
            &self.kernels,
            &dm.convs,
            &dims,
            plan.max_masks,
            (self.direct_use, &mut self.pool_check),
            &mut bufs,
            &mut convs,
        )?;
        lap(&mut setup, "fused conv + pool timing");
        conv::plan_fused_block(
            dev,
            &self.kernels,
            &dm.convs,
            &dims,
            plan.max_masks,
            (self.direct_use, &mut self.block_check),
            &mut bufs,
            &mut convs,
        )?;
        lap(&mut setup, "fused first block timing");
        if let Some(state) = fp8.as_mut() {
            conv::time_fp8_passes(
                dev,
                &self.kernels,
                (&dm.convs, &dims),
                (masks.sizes(), plan.max_masks),
                (self.direct_use, &mut self.direct_check),
                (state, &next_fp8),
                &mut bufs,
                &mut convs,
            )?;
            lap(&mut setup, "FP8 conversion, pool and fused pool timing");
        }
        // A cache that cannot be written costs the next run its plan search, nothing more.
        self.plan_cache_error = self.plan_cache.save().err();
        if let (Some(e), true) = (&self.plan_cache_error, verbose()) {
            eprintln!("cuda: the plan cache was not saved: {e}");
        }
        let workspace = if ws_used < workspace.len() / 2 {
            // Give back what the tuning needed but the chosen configurations do not.
            drop(workspace);
            dev.alloc::<u8>(ws_used, "cuDNN workspace")?
        } else {
            workspace
        };
        lap(&mut setup, "plan cache written, workspace trimmed");
        self.prep = Some(Prepared {
            plan,
            rows_max,
            feat: (h, w, c),
            dims,
            capture,
            bufs,
            workspace,
            convs,
            masks,
            images,
            prefix: None,
            prefix_ms: Vec::new(),
            fp8,
            setup_s: Vec::new(),
        });
        if let Some(rows) = self.forced_prefix {
            // Tests of the sub-batched path: no timing, and no silent fallback either.
            let prep = self.prep.as_mut().expect("prepared above");
            match end.filter(|_| subs.contains(&rows)) {
                Some(end) => prep.prefix = Some(Prefix { end, rows }),
                None => {
                    self.graphs.clear();
                    self.prep = None;
                    return Err(Error::Invalid(format!(
                        "blocks 1–2 cannot run in sub-batches of {rows} rows here (sizes that \
                         apply: {subs:?})"
                    )));
                }
            }
        } else if let Some(end) = end.filter(|_| !subs.is_empty()) {
            match self.choose_prefix(end, &subs) {
                // No room for the timing input: blocks 1–2 run whole, the plan still stands.
                Err(Error::OutOfMemory(m)) if verbose() => {
                    eprintln!("cuda: blocks 1–2 not timed in sub-batches ({m})")
                }
                Err(Error::OutOfMemory(_)) => {}
                Err(e) => {
                    // A failed prepare leaves the backend unprepared.
                    self.graphs.clear();
                    self.prep = None;
                    return Err(e);
                }
                Ok(()) => {}
            }
        }
        lap(&mut setup, "blocks 1–2 sub-batch timing");
        if let Some(p) = self.prep.as_mut() {
            p.setup_s = setup;
        }
        Ok(())
    }

    /// Time blocks 1–2 on a full mask batch of random inputs, whole and in each sub-batch size;
    /// keep the fastest (sub-batching only when it wins).
    fn choose_prefix(&mut self, end: usize, subs: &[usize]) -> Result<()> {
        let prep = self.prep.as_ref().expect("prepared above");
        let rows = prep.plan.max_masks;
        let s = prep.plan.input_size;
        let op = "timing blocks 1–2 in sub-batches";
        let len = rows * s * s * CPAD;
        let mut x = self.dev.alloc::<f16>(len, "prefix timing input")?;
        self.kernels.fill_uniform_f16(
            &self.dev.stream,
            &mut x.slice_mut(..),
            len,
            0xF00D,
            -2.0,
            2.0,
        )?;
        let timer = EventPair::new(&self.dev)?;
        let mut results: Vec<(usize, f32)> = Vec::new();
        for sub in std::iter::once(None).chain(subs.iter().copied().map(Some)) {
            let (mut pass, _) = self.pass()?;
            let dev = pass.dev;
            let ms = conv::time_launch(dev, &timer, op, || pass.prefix_stages(&x, rows, end, sub))?;
            results.push((sub.unwrap_or(0), ms));
        }
        let whole = results[0].1;
        let best = results[1..]
            .iter()
            .copied()
            .filter(|&(_, ms)| ms < whole)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if verbose() {
            eprintln!("cuda: blocks 1–2 at batch {rows}: {results:?} (rows 0 = whole batch)");
        }
        let prep = self.prep.as_mut().expect("prepared above");
        prep.prefix = best.map(|(r, _)| Prefix { end, rows: r });
        prep.prefix_ms = results;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vgg16_prefix_is_blocks_one_and_two() {
        let m = Vgg::random_vgg16(1);
        let dims = stage_dims(&m, 224).unwrap();
        // conv conv pool conv conv pool | ...
        assert_eq!(prefix_end(&m, &dims), Some(6));
        assert_eq!(dims[5].out_len(), 56 * 56 * 128);
        assert_eq!(dims[0].in_c, CPAD);
        assert!(stage_dims(&m, 16).is_err());
    }
}
