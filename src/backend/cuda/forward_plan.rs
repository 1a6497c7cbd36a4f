//! The feature stages of one forward as data: which kernel or convolution reads and writes
//! which bytes of which buffer, in order. `forward.rs` turns each [`Step`] into a launch; the
//! tests (`tests/forward_plan.rs`) run the same steps on the CPU, the kernels through their
//! emulation, so the routing of the data — the ping-pong arena, blocks 1–2 in sub-batches, FP8
//! activations as E4M3 codes in the first bytes of their FP16 rows, the quantized-input buffer,
//! the activations captured by a base forward — is checked on every machine, GPU or not.
//!
//! Nothing here touches the device: the plan is a pure function of the model's stages, their
//! geometry, the batch and the FP8 route.

use std::ops::Range;

use super::CPAD;
use crate::error::{Error, Result};
use crate::model::{FeatureStage, Vgg};

/// Input/output geometry of one feature stage (stored channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageDims {
    pub in_h: usize,
    pub in_w: usize,
    pub in_c: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub out_c: usize,
}

impl StageDims {
    /// Values of one row (image) of the stage's input.
    pub fn in_len(&self) -> usize {
        self.in_h * self.in_w * self.in_c
    }

    /// Values of one row of the stage's output.
    pub fn out_len(&self) -> usize {
        self.out_h * self.out_w * self.out_c
    }
}

/// The geometry of every feature stage for input side `s` (stored channels; the first conv reads
/// [`CPAD`] channels).
pub fn stage_dims(model: &Vgg, s: usize) -> Result<Vec<StageDims>> {
    // The model's own shapes; only the stored channels differ (the input's 3 are stored as
    // CPAD, which a pool straight after it would keep).
    let mut dims = Vec::with_capacity(model.features.len());
    let (mut h, mut w, mut c) = (s, s, CPAD);
    for (stage, out) in model.features.iter().zip(model.stage_shapes(s)) {
        if out.h == 0 || out.w == 0 {
            return Err(Error::Invalid(format!(
                "input size {s} is too small for this model's max-pools"
            )));
        }
        let oc = match stage {
            FeatureStage::Conv(_) => out.c,
            FeatureStage::MaxPool { .. } => c,
        };
        dims.push(StageDims {
            in_h: h,
            in_w: w,
            in_c: c,
            out_h: out.h,
            out_w: out.w,
            out_c: oc,
        });
        (h, w, c) = (out.h, out.w, oc);
    }
    Ok(dims)
}

/// Where blocks 1–2 end (the stage after the second max-pool), if sub-batching them is safe:
/// every stage before writes rows at least as long as the last one's, so a sub-batch never
/// overwrites an earlier sub-batch's output in the ping-pong buffers.
pub fn prefix_end(model: &Vgg, dims: &[StageDims]) -> Option<usize> {
    let end = model
        .features
        .iter()
        .enumerate()
        .filter(|(_, st)| matches!(st, FeatureStage::MaxPool { .. }))
        .nth(1)
        .map(|(i, _)| i + 1)?;
    let last = dims[end - 1].out_len();
    (end < dims.len() && dims[..end].iter().all(|d| d.out_len() >= last)).then_some(end)
}

/// Blocks 1–2 (`end` feature stages) run `rows` rows at a time: their activations (the largest
/// of the network) then stay in L2 between a conv and the next layer. Chosen at `prepare` by
/// timing, only when faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub end: usize,
    pub rows: usize,
}

/// How one feature stage of an FP8 forward runs: in FP8 or not, and in which format its input
/// and output activations are (E4M3 codes, one byte each at the start of the FP16 rows they
/// replace, or FP16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageRoute {
    /// The stage is a conv (else a pool).
    pub conv: bool,
    /// The conv runs an FP8 plan.
    pub fp8: bool,
    /// The input is E4M3 at this stage's multiplier (for a conv: already quantized).
    pub e4m3_in: bool,
    /// The output is E4M3: a conv's at the multiplier of conv stage `next`, a pool's as its input.
    pub e4m3_out: bool,
    /// The next conv stage (after any pools), whose multiplier an E4M3 conv output is at.
    pub next: Option<usize>,
}

impl StageRoute {
    /// A conv that runs FP16 on an E4M3 input: its input is dequantized first (a pool works on
    /// the codes).
    pub fn dequantizes(&self) -> bool {
        self.conv && self.e4m3_in && !self.fp8
    }
}

/// The plans a conv key has for an FP8 forward: FP8 with an FP16 output, FP8 with an E4M3
/// output, FP16 with an E4M3 output (an FP16 layer before an FP8 one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fp8Forms {
    pub half_out: bool,
    pub e4m3_out: bool,
    pub fp16_e4m3_out: bool,
}

impl Fp8Forms {
    /// Costs that make [`route`] run FP8 wherever a form exists, then keep activations E4M3
    /// between FP8 convs (FP8 preferred, and tests of the routes): an FP8 conv costs nothing, an
    /// FP16 conv 3, a conversion pass 1 (so an FP8 conv beats an FP16 one even with a pass on
    /// each side, and writing E4M3 beats a quantize pass). `capable`: the conv has FP8 filters
    /// (its input is measured, so it may arrive E4M3).
    pub fn preferred_costs(self, capable: bool) -> ConvCosts {
        let free = |has: bool| has.then_some(0.0);
        ConvCosts {
            fp16: 3.0,
            fp16_e4m3_out: self.fp16_e4m3_out.then_some(3.0),
            fp8: free(self.half_out),
            fp8_e4m3_out: free(self.e4m3_out),
            convert: capable.then_some([1.0, 1.0]),
            fused_pool_saves: 0.0,
            fp8_pool_saves: [0.0; 2],
            block_saves: None,
        }
    }
}

/// What each way of running one conv stage costs a forward, in milliseconds as the tuning timed
/// them (any unit that adds up will do). `None`: no such plan.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConvCosts {
    /// FP16 in and out (always possible).
    pub fp16: f32,
    /// FP16 conv, E4M3 out at the next conv's multiplier.
    pub fp16_e4m3_out: Option<f32>,
    /// FP8 conv (E4M3 in, already quantized), FP16 out.
    pub fp8: Option<f32>,
    /// FP8 conv, E4M3 out.
    pub fp8_e4m3_out: Option<f32>,
    /// The passes that convert its input: FP16 → E4M3 before an FP8 run, E4M3 → FP16 before
    /// an FP16 one. None where the input can never be E4M3 (no FP8 filters: no measured scale).
    pub convert: Option<[f32; 2]>,
    /// What running it with the max-pool after it as one kernel saves (FP16 in and out, where
    /// that kernel was kept).
    pub fused_pool_saves: f32,
    /// The same for the FP8 conv, by output format (FP16, E4M3): the pooled E4M3 build.
    pub fp8_pool_saves: [f32; 2],
    /// What running it, the conv after it and the max-pool after that as one kernel saves
    /// against the three apart (the second conv's fused pool counted), all FP16 in and out,
    /// where that kernel was kept (None: not kept; negative where kept though slower).
    pub block_saves: Option<f32>,
}

/// What running one feature stage costs in each way (see [`route`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StageCosts {
    Conv(ConvCosts),
    /// A 2×2 max-pool on FP16 values, on E4M3 codes.
    Pool {
        f16: f32,
        e4m3: f32,
    },
}

impl StageCosts {
    /// The costs of running it `k` times (a stage of blocks 1–2 run in sub-batches).
    pub fn times(self, k: f32) -> StageCosts {
        let x = |v: Option<f32>| v.map(|v| v * k);
        match self {
            StageCosts::Pool { f16, e4m3 } => StageCosts::Pool {
                f16: f16 * k,
                e4m3: e4m3 * k,
            },
            StageCosts::Conv(c) => StageCosts::Conv(ConvCosts {
                fp16: c.fp16 * k,
                fp16_e4m3_out: x(c.fp16_e4m3_out),
                fp8: x(c.fp8),
                fp8_e4m3_out: x(c.fp8_e4m3_out),
                convert: c.convert.map(|[q, d]| [q * k, d * k]),
                fused_pool_saves: c.fused_pool_saves * k,
                fp8_pool_saves: c.fp8_pool_saves.map(|v| v * k),
                block_saves: x(c.block_saves),
            }),
        }
    }
}

/// What every stage run FP16 costs (the fused conv + pool's and the fused block's savings
/// counted): the route [`route`] never does worse than.
pub fn fp16_cost(stages: &[StageCosts]) -> f32 {
    stages
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            StageCosts::Pool { f16, .. } => *f16,
            StageCosts::Conv(c) => {
                let pooled = matches!(stages.get(i + 1), Some(StageCosts::Pool { .. }));
                let block = block_saves(stages, i).unwrap_or(0.0);
                c.fp16 - if pooled { c.fused_pool_saves } else { 0.0 } - block
            }
        })
        .sum()
}

/// The saving of the fused block that starts at stage `i` (a conv with `block_saves`, then a
/// conv, then a pool), if one does.
pub fn block_saves(stages: &[StageCosts], i: usize) -> Option<f32> {
    match stages.get(i..i + 3)? {
        [StageCosts::Conv(c), StageCosts::Conv(_), StageCosts::Pool { .. }] => c.block_saves,
        _ => None,
    }
}

/// The route of one forward's feature stages that costs least in all, by dynamic programming
/// over the two formats an activation can have between stages (FP16, or E4M3 at the next conv's
/// multiplier). Each conv runs FP16 or FP8 and writes either format where it has such a plan;
/// an input in the other format costs its conversion pass; a pool keeps its input's format at
/// that format's cost; a conv + pool may save a fused kernel's time (FP16 on FP16, or FP8 into
/// either format), and so may a whole first block run FP16 (conv, conv, pool: a third state,
/// "FP16 inside the block", carries its start to the pool, so that every all-FP16 path through
/// a kept block counts it, as the plan then runs it). An E4M3
/// activation only enters a conv that has FP8 filters (its scale is measured), an FP8 conv has
/// them too, and the features end FP16 (the head reads them). Returns the routes and their total
/// cost; of equal costs into one state, the first offered stays (FP16 input first, then the
/// FP16 conv before the FP8 ones).
pub fn route(stages: &[StageCosts]) -> (Vec<StageRoute>, f32) {
    const F16: usize = 0;
    const E4M3: usize = 1;
    // FP16, every stage since a fused block's first conv run FP16 (that block then runs).
    const BLOCK: usize = 2;
    // A choice at one stage: (state in, state out, runs FP8).
    type Choice = (usize, usize, bool);
    let n = stages.len();
    // best[b][state]: the least cost to reach boundary b (before stage b) in that state, and
    // the choice at stage b − 1 that got there.
    let mut best: Vec<[Option<(f32, Choice)>; 3]> = vec![[None, None, None]; n + 1];
    best[0][F16] = Some((0.0, (F16, F16, false)));
    for (i, stage) in stages.iter().enumerate() {
        for state in [F16, E4M3, BLOCK] {
            let Some((at, _)) = best[i][state] else {
                continue;
            };
            // The activation's format (BLOCK is FP16).
            let fin = if state == E4M3 { E4M3 } else { F16 };
            let mut offer = |fout: usize, fp8: bool, cost: f32| {
                let total = at + cost;
                let slot = &mut best[i + 1][fout];
                if slot.is_none_or(|(c, _)| total < c) {
                    *slot = Some((total, (state, fout, fp8)));
                }
            };
            // The FP16 conv's way out: into (or on in) a kept block, else plain FP16.
            let starts_block = state == F16 && block_saves(stages, i).is_some();
            let in_block = state == BLOCK && i >= 1 && block_saves(stages, i - 1).is_some();
            let f16_out = if starts_block || in_block { BLOCK } else { F16 };
            match *stage {
                StageCosts::Pool { f16, e4m3 } => {
                    // A block's pool: the block's saving, back to plain FP16.
                    let saves = match state == BLOCK && i >= 2 {
                        true => block_saves(stages, i - 2).unwrap_or(0.0),
                        false => 0.0,
                    };
                    offer(fin, false, [f16, e4m3][fin] - saves)
                }
                StageCosts::Conv(c) => {
                    if fin == E4M3 && c.convert.is_none() {
                        continue;
                    }
                    let [quantize, dequantize] = c.convert.unwrap_or([0.0; 2]);
                    let into_fp16 = if fin == E4M3 { dequantize } else { 0.0 };
                    let into_fp8 = if fin == F16 { quantize } else { 0.0 };
                    let pooled_next = matches!(stages.get(i + 1), Some(StageCosts::Pool { .. }));
                    let fused = if fin == F16 && pooled_next {
                        c.fused_pool_saves
                    } else {
                        0.0
                    };
                    offer(f16_out, false, into_fp16 + c.fp16 - fused);
                    if let Some(ms) = c.fp16_e4m3_out {
                        offer(E4M3, false, into_fp16 + ms);
                    }
                    // (FP8 quantizes its input at its own scale: only with FP8 filters.)
                    let fused8 = |fout: usize| match pooled_next {
                        true => c.fp8_pool_saves[fout],
                        false => 0.0,
                    };
                    if let (Some(ms), true) = (c.fp8, c.convert.is_some()) {
                        offer(F16, true, into_fp8 + ms - fused8(F16));
                    }
                    if let (Some(ms), true) = (c.fp8_e4m3_out, c.convert.is_some()) {
                        offer(E4M3, true, into_fp8 + ms - fused8(E4M3));
                    }
                }
            }
        }
    }
    // Back from the FP16 end (a block ends at its pool, in plain FP16).
    let mut routes = vec![StageRoute::default(); n];
    let total = best[n][F16].map_or(0.0, |(c, _)| c);
    let mut state = F16;
    for i in (0..n).rev() {
        let (_, (sin, sout, fp8)) = best[i + 1][state].expect("a reached state has a choice");
        let r = &mut routes[i];
        r.conv = matches!(stages[i], StageCosts::Conv(_));
        r.fp8 = fp8;
        r.e4m3_in = sin == E4M3;
        r.e4m3_out = sout == E4M3;
        state = sin;
    }
    // The next conv of each conv: the multiplier its E4M3 output is at.
    let mut next = None;
    for (i, r) in routes.iter_mut().enumerate().rev() {
        if r.conv {
            r.next = next;
            next = Some(i);
        }
    }
    (routes, total)
}

/// The rows stage `stage` of a forward of `rows` rows runs at, and how many times: blocks 1–2
/// (before `prefix.end`) in sub-batches of `prefix.rows`, where the prefix applies.
pub fn stage_runs(prefix: Option<Prefix>, stage: usize, rows: usize) -> (usize, usize) {
    match prefix {
        Some(p) if stage < p.end && p.rows > 0 => (p.rows, rows / p.rows),
        _ => (rows, 1),
    }
}

/// The stage costs of a forward of `rows` rows (blocks 1–2 in sub-batches of `prefix.rows`,
/// where it applies: their costs at that size, times rows / sub-batch), from `timed(stage, rows)`
/// (None: untimed). An untimed stage runs FP16 and its input never arrives E4M3; the flag says
/// whether every stage was timed (else the total is not the forward's).
pub fn forward_costs(
    is_conv: &[bool],
    rows: usize,
    prefix: Option<Prefix>,
    timed: impl Fn(usize, usize) -> Option<StageCosts>,
) -> (Vec<StageCosts>, bool) {
    let mut complete = true;
    let costs = (0..is_conv.len())
        .map(|stage| {
            let (rows, times) = stage_runs(prefix, stage, rows);
            match timed(stage, rows) {
                Some(c) => c.times(times as f32),
                None => {
                    complete = false;
                    match is_conv[stage] {
                        true => StageCosts::Conv(ConvCosts::default()),
                        false => StageCosts::Pool {
                            f16: 0.0,
                            e4m3: 0.0,
                        },
                    }
                }
            }
        })
        .collect();
    (costs, complete)
}

/// [`route`] with every conv's [`Fp8Forms::preferred_costs`] (pools cost nothing): FP8
/// wherever a plan exists. `capable`: per stage, the conv has FP8 filters.
pub fn route_preferring(forms: &[Option<Fp8Forms>], capable: &[bool]) -> Vec<StageRoute> {
    let stages: Vec<StageCosts> = forms
        .iter()
        .enumerate()
        .map(|(i, f)| match f {
            Some(f) => StageCosts::Conv(f.preferred_costs(capable.get(i) == Some(&true))),
            None => StageCosts::Pool {
                f16: 0.0,
                e4m3: 0.0,
            },
        })
        .collect();
    route(&stages).0
}

/// Whether stages `stage` and `stage + 1` both run FP16 under `routes` (None: every stage does):
/// in, out and the conv itself. Only then may a conv and the max-pool after it run as one kernel.
pub fn pair_runs_fp16(routes: Option<&[StageRoute]>, stage: usize) -> bool {
    let fp16 = |s: usize| routes.is_none_or(|r| !r[s].fp8 && !r[s].e4m3_in && !r[s].e4m3_out);
    fp16(stage) && fp16(stage + 1)
}

/// Whether stages `stage` … `stage + 2` all run FP16 under `routes`: only then may a conv, the
/// conv after it and the max-pool after that run as one kernel (a fused first block).
pub fn block_runs_fp16(routes: Option<&[StageRoute]>, stage: usize) -> bool {
    pair_runs_fp16(routes, stage) && pair_runs_fp16(routes, stage + 1)
}

/// A buffer a step reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buf {
    /// The forward's input (read only).
    Input,
    /// Arena buffer 0 or 1 (FP16 elements; E4M3 codes are stored in its bytes).
    Arena(usize),
    /// `--precision fp8`'s quantized-input buffer (bytes), read by the FP8 conv after the
    /// quantize step that writes it.
    Fp8Input,
}

/// The type of a span's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F16,
    /// One byte per value.
    E4m3,
}

impl Format {
    pub fn size(self) -> usize {
        match self {
            Format::F16 => 2,
            Format::E4m3 => 1,
        }
    }
}

/// `len` values of `format` from byte `at` of `buf`. Spans start at an even byte (E4M3 rows sit
/// at the start of FP16 rows, or packed after whole FP16-aligned rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub buf: Buf,
    pub at: usize,
    pub len: usize,
    pub format: Format,
}

impl Span {
    /// `rows` rows of `row_len` values from row `row0` of `buf`, at their FP16 place (E4M3
    /// values in the first bytes of those rows).
    fn rows(buf: Buf, format: Format, row0: usize, rows: usize, row_len: usize) -> Span {
        Span {
            buf,
            at: 2 * row0 * row_len,
            len: rows * row_len,
            format,
        }
    }

    /// The bytes it covers.
    pub fn bytes(&self) -> Range<usize> {
        self.at..self.at + self.len * self.format.size()
    }

    /// Its first `len` values (`len` ≤ its length: `features` checks the captured rows).
    fn first(self, len: usize) -> Span {
        debug_assert!(len <= self.len);
        Span { len, ..self }
    }
}

/// One launch (or copy) of a forward's feature stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A base forward: fold the FP16 values of `x` (the real images' rows of stage `stage`'s
    /// input) into the stage's amax.
    Amax { stage: usize, x: Span },
    /// FP16 `x` → E4M3 `y` at stage `stage`'s multiplier (an FP8 conv's input).
    Quantize { stage: usize, x: Span, y: Span },
    /// E4M3 `x` at stage `stage`'s multiplier → FP16 `y` (an FP16 conv's input).
    Dequantize { stage: usize, x: Span, y: Span },
    /// Conv stage `stage` (+ bias, + ReLU unless `identity`) on `rows` rows: `x` in the format
    /// its plan reads (E4M3 for an FP8 plan), `y` in the one it writes (E4M3 at stage
    /// `route.next`'s multiplier where `route.e4m3_out`).
    Conv {
        stage: usize,
        rows: usize,
        identity: bool,
        route: StageRoute,
        x: Span,
        y: Span,
    },
    /// Conv stage `stage` (+ bias, + ReLU) and the 2×2 max-pool of stage `stage + 1` in one
    /// kernel, on `rows` rows, as `route` says: FP16 `x`, the pooled FP16 `y`; or (an FP8 route)
    /// E4M3 `x`, `y` FP16 or E4M3 at stage `route.next`'s multiplier.
    ConvPool {
        stage: usize,
        rows: usize,
        route: StageRoute,
        x: Span,
        y: Span,
    },
    /// Conv stage `stage` (+ bias, ReLU), conv stage `stage + 1` (+ bias, ReLU) and the 2×2
    /// max-pool of stage `stage + 2` in one kernel on `rows` rows: FP16 `x`, the pooled FP16
    /// `y` (a VGG's first block).
    BlockPool {
        stage: usize,
        rows: usize,
        x: Span,
        y: Span,
    },
    /// 2×2 max-pool of `rows` rows, FP16 or E4M3 codes (both spans alike).
    Pool {
        stage: usize,
        rows: usize,
        x: Span,
        y: Span,
    },
    /// Copy `y` (the captured rows of stage `stage`'s output) into the activations.
    Capture { stage: usize, y: Span },
    /// ReLU in place (a conv captured before its ReLU).
    Relu { y: Span },
    /// A base forward is done: the FP8 scales from the amaxes.
    Fp8Scales,
    /// Stage `stage` of the full batch is done (where per-layer timing marks).
    StageDone { stage: usize },
}

/// What a forward's plan is built from.
#[derive(Clone, Copy, Debug)]
pub struct PlanShape<'a> {
    /// Per feature stage: a conv (else a 2×2 max-pool).
    pub is_conv: &'a [bool],
    pub dims: &'a [StageDims],
    /// Per feature stage: it has an FP8 filter, so a base forward measures its input (empty
    /// without `--precision fp8`).
    pub fp8_filters: &'a [bool],
    /// Per feature stage: a conv that runs with the max-pool after it in one kernel where the
    /// forward allows (FP16 in and out, neither captured); empty: none.
    pub fused_pool: &'a [bool],
    /// Per feature stage: a conv that runs FP8 with the max-pool after it in one kernel where
    /// its route writes FP16 (`[0]`) or E4M3 (`[1]`); empty: none.
    pub fp8_fused_pool: &'a [[bool; 2]],
    /// Per feature stage: a conv that runs with the conv and the max-pool after it in one
    /// kernel where the forward allows (all three FP16, none captured); empty: none.
    pub fused_block: &'a [bool],
}

/// The activations a base forward keeps: stage `stage`'s output (before the ReLU when
/// `pre_relu`) for the first `rows` rows (the real images).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureAt {
    pub stage: usize,
    pub pre_relu: bool,
    pub rows: usize,
}

/// The steps of a forward's feature stages, and the arena buffer holding their output (None
/// when there are no stages).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeaturePlan {
    pub steps: Vec<Step>,
    pub out: Option<usize>,
}

/// The feature stages of a forward of `rows` rows: blocks 1–2 in sub-batches when `prefix`
/// says (`rows` a multiple of its rows), routed by `routes` (None: FP16 everywhere), measuring
/// the FP8 layers' inputs and capturing activations when `capture` says (a base forward).
pub fn features(
    shape: &PlanShape<'_>,
    rows: usize,
    prefix: Option<Prefix>,
    routes: Option<&[StageRoute]>,
    capture: Option<CaptureAt>,
) -> Result<FeaturePlan> {
    let stages = shape.dims.len();
    check_shape(shape, routes)?;
    if capture.is_some() && routes.is_some() {
        return Err(Error::Invalid(
            "a base forward runs FP16 (it captures activations): no FP8 route".into(),
        ));
    }
    if let Some(c) = capture.filter(|c| c.rows > rows || c.stage >= stages) {
        return Err(Error::Invalid(format!(
            "capturing {c:?} from a forward of {rows} rows and {stages} stages"
        )));
    }
    let mut p = Planner {
        shape,
        steps: Vec::new(),
        packed_pool: None,
    };
    let mut first = 0;
    let mut cur = None;
    if let Some(pre) = prefix {
        if capture.is_some() {
            return Err(Error::Invalid(
                "a base forward runs blocks 1–2 whole (it captures activations)".into(),
            ));
        }
        cur = p.prefix(rows, pre.end, Some(pre.rows), routes)?;
        first = pre.end;
    }
    let mut stage = first;
    while stage < stages {
        let (out, done) = p.stage(stage, cur, rows, 0, capture, routes, false)?;
        cur = Some(out);
        // A fused pool's stage is done with its conv's (its time is the conv's).
        for s in stage..done {
            p.steps.push(Step::StageDone { stage: s });
        }
        stage = done;
    }
    // (`--precision fp8` only: its state gives the FP8 flags.)
    if capture.is_some() && !shape.fp8_filters.is_empty() {
        p.steps.push(Step::Fp8Scales);
    }
    Ok(FeaturePlan {
        steps: p.steps,
        out: cur,
    })
}

/// Feature stages `0..end` on `rows` rows, in sub-batches of `sub` rows when given (`rows` a
/// multiple of it), routed by `routes` (None: FP16): blocks 1–2 alone, as `prepare` times them.
pub fn prefix(
    shape: &PlanShape<'_>,
    rows: usize,
    end: usize,
    sub: Option<usize>,
    routes: Option<&[StageRoute]>,
) -> Result<FeaturePlan> {
    check_shape(shape, routes)?;
    let mut p = Planner {
        shape,
        steps: Vec::new(),
        packed_pool: None,
    };
    let out = p.prefix(rows, end, sub, routes)?;
    Ok(FeaturePlan {
        steps: p.steps,
        out,
    })
}

fn check_shape(shape: &PlanShape<'_>, routes: Option<&[StageRoute]>) -> Result<()> {
    let n = shape.dims.len();
    let fp8_ok = shape.fp8_filters.is_empty() || shape.fp8_filters.len() == n;
    let fused_ok = (shape.fused_pool.is_empty() || shape.fused_pool.len() == n)
        && (shape.fp8_fused_pool.is_empty() || shape.fp8_fused_pool.len() == n)
        && (shape.fused_block.is_empty() || shape.fused_block.len() == n);
    let routes_ok = routes.is_none_or(|r| {
        r.len() == n && r.iter().zip(shape.is_conv).all(|(r, &conv)| r.conv == conv)
    });
    if shape.is_conv.len() != n || !fp8_ok || !routes_ok || !fused_ok {
        return Err(Error::Invalid(format!(
            "forward plan: {n} stages, {} kinds, {} FP8 flags, {} + {} fused-pool flags, {} \
             fused-block flags, {:?} routes",
            shape.is_conv.len(),
            shape.fp8_filters.len(),
            shape.fused_pool.len(),
            shape.fp8_fused_pool.len(),
            shape.fused_block.len(),
            routes.map(<[_]>::len)
        )));
    }
    Ok(())
}

struct Planner<'s, 'a> {
    shape: &'s PlanShape<'a>,
    steps: Vec<Step>,
    /// The pool stage ending sub-batched blocks 1–2 whose E4M3 output is packed (a fused conv
    /// before it writes there the same way).
    packed_pool: Option<usize>,
}

impl Planner<'_, '_> {
    /// Stages `0..end` in chunks of `sub` rows; the arena buffer of their output.
    fn prefix(
        &mut self,
        rows: usize,
        end: usize,
        sub: Option<usize>,
        routes: Option<&[StageRoute]>,
    ) -> Result<Option<usize>> {
        if end > self.shape.dims.len() {
            return Err(Error::Invalid(format!(
                "blocks 1–2 end at stage {end} of {}",
                self.shape.dims.len()
            )));
        }
        let step = sub.unwrap_or(rows).clamp(1, rows.max(1));
        if !rows.is_multiple_of(step) {
            return Err(Error::Invalid(format!(
                "blocks 1–2: {rows} rows are not a multiple of the sub-batch {step}"
            )));
        }
        // Every chunk starts from the input and ping-pongs alike, so all of them end in the
        // same buffer, each at its own rows; an E4M3 output of the last stage (a pool) is
        // packed instead, the layout the full batch after it reads as one.
        let chunked = step < rows;
        let packed_last = |stage: usize| chunked && routes.is_some_and(|r| r[stage].e4m3_out);
        self.packed_pool = end.checked_sub(1).filter(|&last| packed_last(last));
        let mut cur = None;
        for chunk in 0..rows / step {
            let mut c = None;
            let mut stage = 0;
            while stage < end {
                let packed = stage + 1 == end && packed_last(stage);
                let (out, done) = self.stage(stage, c, step, chunk * step, None, routes, packed)?;
                (c, stage) = (Some(out), done);
            }
            cur = c;
        }
        Ok(cur)
    }

    /// Feature stage `stage` on `rows` rows starting at row `row0`, reading arena buffer `cur`
    /// (None: the input) and writing the other one at the same rows, as `routes` say (None:
    /// FP16). Returns the buffer written and the next stage to plan: `stage + 2` where the conv
    /// ran with its max-pool, else `stage + 1`.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        stage: usize,
        cur: Option<usize>,
        rows: usize,
        row0: usize,
        capture: Option<CaptureAt>,
        routes: Option<&[StageRoute]>,
        packed_out: bool,
    ) -> Result<(usize, usize)> {
        let d = self.shape.dims[stage];
        let (in_len, out_len) = (d.in_len(), d.out_len());
        // The whole first block as one step (never the end of a packed prefix: a pool's
        // E4M3 output, which the block does not write).
        if self.fuses_block(stage, capture, routes) && !packed_out {
            let make = |x, y| Step::BlockPool { stage, rows, x, y };
            return Ok(self.fused_fp16(stage..stage + 3, cur, (rows, row0), capture, make));
        }
        // The conv and the max-pool after it as one step.
        if self.fuses_pool(stage, capture, routes) && !packed_out {
            let route = StageRoute {
                conv: true,
                ..StageRoute::default()
            };
            let make = |x, y| Step::ConvPool {
                stage,
                rows,
                route,
                x,
                y,
            };
            return Ok(self.fused_fp16(stage..stage + 2, cur, (rows, row0), capture, make));
        }
        let route = routes.map(|r| r[stage]).unwrap_or_default();
        let e4m3 = |yes: bool| if yes { Format::E4m3 } else { Format::F16 };
        let source = |cur: Option<usize>| cur.map_or(Buf::Input, Buf::Arena);
        let mut cur = cur;
        // An FP16 conv after an E4M3 output reads it dequantized, from the other buffer.
        if route.dequantizes() {
            let Some(c) = cur else {
                return Err(Error::Invalid(format!(
                    "stage {stage}: an E4M3 input needs an earlier stage"
                )));
            };
            self.steps.push(Step::Dequantize {
                stage,
                x: Span::rows(Buf::Arena(c), Format::E4m3, row0, rows, in_len),
                y: Span::rows(Buf::Arena(1 - c), Format::F16, row0, rows, in_len),
            });
            cur = Some(1 - c);
        }
        if route.e4m3_in && cur.is_none() {
            return Err(Error::Invalid(format!(
                "stage {stage}: an E4M3 input needs an earlier stage"
            )));
        }
        let input = source(cur);
        let next = cur.map_or(0, |c| 1 - c);
        let output = Buf::Arena(next);
        let x16 = Span::rows(input, Format::F16, row0, rows, in_len);
        self.amax(stage, x16, capture);
        let fp8_pooled = self.fuses_fp8_pool(stage, capture, routes);
        let capture = capture.filter(|c| c.stage == stage);
        if self.shape.is_conv[stage] {
            if packed_out {
                return Err(Error::Invalid(format!(
                    "stage {stage}: a sub-batched prefix must end with a pool to pack E4M3 rows"
                )));
            }
            // An FP8 conv reads E4M3: the previous stage's codes, or its FP16 input quantized.
            let x = match (route.fp8, route.e4m3_in) {
                (true, true) => Span::rows(input, Format::E4m3, row0, rows, in_len),
                (true, false) => {
                    let y = Span {
                        buf: Buf::Fp8Input,
                        at: 0,
                        len: rows * in_len,
                        format: Format::E4m3,
                    };
                    self.steps.push(Step::Quantize { stage, x: x16, y });
                    y
                }
                (false, _) => x16,
            };
            if fp8_pooled {
                let pooled = self.shape.dims[stage + 1].out_len();
                let mut y = Span::rows(output, e4m3(route.e4m3_out), row0, rows, pooled);
                if self.packed_pool == Some(stage + 1) {
                    y.at = row0 * pooled;
                }
                self.steps.push(Step::ConvPool {
                    stage,
                    rows,
                    route,
                    x,
                    y,
                });
                return Ok((next, stage + 2));
            }
            let pre = capture.is_some_and(|c| c.pre_relu);
            let y = Span::rows(output, e4m3(route.e4m3_out), row0, rows, out_len);
            self.steps.push(Step::Conv {
                stage,
                rows,
                identity: pre,
                route,
                x,
                y,
            });
            if let Some(c) = capture {
                self.steps.push(Step::Capture {
                    stage,
                    y: y.first(c.rows * out_len),
                });
                if pre {
                    self.steps.push(Step::Relu { y });
                }
            }
        } else {
            let format = e4m3(route.e4m3_in);
            let mut y = Span::rows(output, format, row0, rows, out_len);
            if packed_out {
                y.at = row0 * out_len;
            }
            self.steps.push(Step::Pool {
                stage,
                rows,
                x: Span::rows(input, format, row0, rows, in_len),
                y,
            });
            if let Some(c) = capture {
                self.steps.push(Step::Capture {
                    stage,
                    y: y.first(c.rows * out_len),
                });
            }
        }
        Ok((next, stage + 1))
    }

    /// Stages `stages` as one FP16 kernel (a conv and its pool, or a whole block) on `rows` rows
    /// from `row0`: `make` the step from its input (arena buffer `cur`, None: the input) and its
    /// output (the last stage's, in the other buffer). Returns that buffer and the next stage.
    fn fused_fp16(
        &mut self,
        stages: Range<usize>,
        cur: Option<usize>,
        (rows, row0): (usize, usize),
        capture: Option<CaptureAt>,
        make: impl FnOnce(Span, Span) -> Step,
    ) -> (usize, usize) {
        let next = cur.map_or(0, |c| 1 - c);
        let in_len = self.shape.dims[stages.start].in_len();
        let x = Span::rows(
            cur.map_or(Buf::Input, Buf::Arena),
            Format::F16,
            row0,
            rows,
            in_len,
        );
        let out_len = self.shape.dims[stages.end - 1].out_len();
        let y = Span::rows(Buf::Arena(next), Format::F16, row0, rows, out_len);
        self.amax(stages.start, x, capture);
        self.steps.push(make(x, y));
        (next, stages.end)
    }

    /// Whether conv stage `stage` runs with the max-pool after it: the shape says so, and both
    /// stages run FP16 ([`pair_runs_fp16`]) with neither captured.
    fn fuses_pool(
        &self,
        stage: usize,
        capture: Option<CaptureAt>,
        routes: Option<&[StageRoute]>,
    ) -> bool {
        let sh = self.shape;
        sh.fused_pool.get(stage) == Some(&true)
            && sh.is_conv[stage]
            && sh.is_conv.get(stage + 1) == Some(&false)
            && pair_runs_fp16(routes, stage)
            && sh.fp8_filters.get(stage + 1) != Some(&true)
            && capture.is_none_or(|c| c.stage != stage && c.stage != stage + 1)
    }

    /// Whether conv stage `stage` runs as one kernel with the conv and the max-pool after it:
    /// the shape says so, all three run FP16 ([`block_runs_fp16`]), none is captured, and a base
    /// forward need not measure the second conv's input (the block never stores it).
    fn fuses_block(
        &self,
        stage: usize,
        capture: Option<CaptureAt>,
        routes: Option<&[StageRoute]>,
    ) -> bool {
        let sh = self.shape;
        sh.fused_block.get(stage) == Some(&true)
            && sh.is_conv[stage]
            && sh.is_conv.get(stage + 1) == Some(&true)
            && sh.is_conv.get(stage + 2) == Some(&false)
            && block_runs_fp16(routes, stage)
            && capture.is_none_or(|c| {
                (c.stage < stage || c.stage > stage + 2)
                    && sh.fp8_filters.get(stage + 1) != Some(&true)
            })
    }

    /// Whether conv stage `stage` runs FP8 with the max-pool after it: its route runs it FP8,
    /// the shape has the pooled build for the format it writes, nothing captured.
    fn fuses_fp8_pool(
        &self,
        stage: usize,
        capture: Option<CaptureAt>,
        routes: Option<&[StageRoute]>,
    ) -> bool {
        let sh = self.shape;
        let Some(r) = routes.map(|r| r[stage]) else {
            return false;
        };
        r.conv
            && r.fp8
            && sh.is_conv.get(stage + 1) == Some(&false)
            && sh
                .fp8_fused_pool
                .get(stage)
                .is_some_and(|f| f[r.e4m3_out as usize])
            && capture.is_none()
    }

    /// A base forward measures the FP8 layers' inputs (the real rows only): stage `stage`'s FP16
    /// input `x16`.
    fn amax(&mut self, stage: usize, x16: Span, capture: Option<CaptureAt>) {
        if let Some(c) = capture {
            if self.shape.fp8_filters.get(stage) == Some(&true) {
                let x = x16.first(c.rows * self.shape.dims[stage].in_len());
                self.steps.push(Step::Amax { stage, x });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn forms(half_out: bool, e4m3_out: bool, fp16_e4m3_out: bool) -> Option<Fp8Forms> {
        Some(Fp8Forms {
            half_out,
            e4m3_out,
            fp16_e4m3_out,
        })
    }
    const BOTH: Option<Fp8Forms> = forms(true, true, false);
    const HALF: Option<Fp8Forms> = forms(true, false, false);
    const E4M3: Option<Fp8Forms> = forms(false, true, false);
    const FP16: Option<Fp8Forms> = forms(false, false, false);
    /// An FP16 conv with an E4M3-output plan.
    const FP16_E4M3: Option<Fp8Forms> = forms(false, false, true);
    const POOL: Option<Fp8Forms> = None;

    fn conv(
        fp16: f32,
        fp8: Option<f32>,
        fp8_e4m3_out: Option<f32>,
        convert: [f32; 2],
    ) -> StageCosts {
        StageCosts::Conv(ConvCosts {
            fp16,
            fp16_e4m3_out: None,
            fp8,
            fp8_e4m3_out,
            convert: Some(convert),
            fused_pool_saves: 0.0,
            fp8_pool_saves: [0.0; 2],
            block_saves: None,
        })
    }

    const fn pool(f16: f32, e4m3: f32) -> StageCosts {
        StageCosts::Pool { f16, e4m3 }
    }

    /// The cost of `routes` over `stages` counted stage by stage, or None where the routes are
    /// not a valid forward (a plan missing, E4M3 into a conv without FP8 filters, formats that
    /// do not chain, the features ending E4M3): the check of [`route`]'s search.
    fn cost_of(stages: &[StageCosts], routes: &[StageRoute]) -> Option<f32> {
        let mut e4m3 = false;
        let mut total = 0.0;
        for (i, (s, r)) in stages.iter().zip(routes).enumerate() {
            if r.e4m3_in != e4m3 {
                return None;
            }
            total += match *s {
                StageCosts::Pool { f16, e4m3: e } => {
                    if r.fp8 || r.e4m3_out != r.e4m3_in {
                        return None;
                    }
                    if e4m3 {
                        e
                    } else {
                        f16
                    }
                }
                StageCosts::Conv(c) => {
                    let [q, d] = match (c.convert, e4m3 || r.fp8) {
                        (None, true) => return None,
                        (convert, _) => convert.unwrap_or([0.0; 2]),
                    };
                    let form = match (r.fp8, r.e4m3_out) {
                        (false, false) => Some(c.fp16),
                        (false, true) => c.fp16_e4m3_out,
                        (true, false) => c.fp8,
                        (true, true) => c.fp8_e4m3_out,
                    }?;
                    let convert = match (r.fp8, e4m3) {
                        (true, false) => q,
                        (false, true) => d,
                        _ => 0.0,
                    };
                    let fused = !r.fp8 && !e4m3 && !r.e4m3_out;
                    let pooled = matches!(stages.get(i + 1), Some(StageCosts::Pool { .. }));
                    let saves = match (pooled, r.fp8) {
                        (true, true) => c.fp8_pool_saves[r.e4m3_out as usize],
                        (true, false) if fused => c.fused_pool_saves,
                        _ => 0.0,
                    };
                    form + convert - saves
                }
            };
            // A kept block whose three stages all run FP16 runs as one kernel (the planner's
            // test: `fuses_block`).
            if let Some(saves) = block_saves(stages, i) {
                if block_runs_fp16(Some(routes), i) {
                    total -= saves;
                }
            }
            e4m3 = r.e4m3_out;
        }
        (!e4m3).then_some(total)
    }

    /// Every route over `stages`: each conv one of its four ways, pools passing formats on.
    fn every_route(stages: &[StageCosts]) -> Vec<Vec<StageRoute>> {
        let mut all = vec![Vec::new()];
        for s in stages {
            let mut next = Vec::new();
            for r in &all {
                let e4m3_in = r.last().is_some_and(|x: &StageRoute| x.e4m3_out);
                let ways: &[(bool, bool)] = match s {
                    StageCosts::Pool { .. } => &[(false, e4m3_in)],
                    StageCosts::Conv(_) => {
                        &[(false, false), (false, true), (true, false), (true, true)]
                    }
                };
                for &(fp8, e4m3_out) in ways {
                    let mut r = r.clone();
                    r.push(StageRoute {
                        conv: matches!(s, StageCosts::Conv(_)),
                        fp8,
                        e4m3_in,
                        e4m3_out,
                        next: None,
                    });
                    next.push(r);
                }
            }
            all = next;
        }
        all
    }

    #[test]
    fn the_route_runs_fp8_only_where_it_pays_over_the_whole_forward() {
        // The H200 run's timings at 256 rows (gpu-check-2026-11-29.json): conv1_1 writing E4M3
        // took 2.88 ms against 1.69 FP16; conv2_1 ran FP8 in 1.17 ms against 0.74 FP16; the
        // conversions are bandwidth estimates. The old rule (each form against the FP16 plan
        // plus the quantize pass it saves) ran both FP8; the whole forward's sum does not.
        let conv1_1 = StageCosts::Conv(ConvCosts {
            fp16: 1.69,
            fp16_e4m3_out: Some(2.88),
            ..ConvCosts::default()
        });
        let stages = [
            conv1_1,
            conv(1.96, Some(1.86), Some(1.86), [0.7, 0.5]),
            pool(0.49, 0.38),
            conv(0.74, Some(1.18), Some(1.17), [0.17, 0.12]),
            conv(1.34, Some(1.18), Some(1.19), [0.35, 0.25]),
            pool(0.25, 0.2),
        ];
        let (r, ms) = route(&stages);
        // conv1_1: FP16 out, a quantize pass is cheaper than its E4M3 plan; conv1_2: FP8 saves
        // 0.1 ms, its input's quantize pass costs 0.7; conv2_1: FP8 is slower; conv2_2: FP8
        // (1.18 + 0.35 quantize) does not beat 1.34 either…
        assert!(r.iter().all(|s| !s.fp8 && !s.e4m3_out), "{r:?}");
        assert!((ms - fp16_cost(&stages)).abs() < 1e-4, "{ms}");
        // … until FP8 is faster by more than the quantize pass.
        let mut cheaper = stages;
        cheaper[4] = conv(1.34, Some(0.9), Some(0.9), [0.35, 0.25]);
        let (r, ms) = route(&cheaper);
        assert!(r[4].fp8 && !r[4].e4m3_in && !r[4].e4m3_out, "{r:?}");
        assert!((ms - (fp16_cost(&cheaper) - 1.34 + 0.9 + 0.35)).abs() < 1e-4);
    }

    #[test]
    fn activations_stay_e4m3_where_the_conversions_cost_more_than_they_save() {
        // The third conv alone is slower in FP8 (1.0 + 0.1 quantize against 0.9), but running
        // it FP8 with an E4M3 output spares the fourth's quantize pass (0.3).
        let stages = [
            conv(1.0, Some(1.0), Some(1.0), [0.4, 0.3]),
            pool(0.2, 0.15),
            conv(0.9, Some(1.0), Some(1.0), [0.1, 0.1]),
            conv(2.0, Some(1.0), Some(1.0), [0.3, 0.3]),
        ];
        let (r, _) = route(&stages);
        let runs: Vec<(bool, bool, bool)> =
            r.iter().map(|s| (s.fp8, s.e4m3_in, s.e4m3_out)).collect();
        assert_eq!(
            runs,
            [
                (false, false, false),
                (false, false, false),
                (true, false, true), // quantizes (0.1), writes E4M3 for the next
                (true, true, false),
            ]
        );
        assert_eq!(r[2].next, Some(3));
    }

    #[test]
    fn a_kept_fused_pool_keeps_its_conv_fp16() {
        let mut stages = [
            conv(1.0, Some(0.8), Some(0.8), [0.1, 0.1]),
            pool(0.5, 0.4),
            conv(1.0, Some(1.0), None, [0.1, 0.1]),
        ];
        assert!(route(&stages).0[0].fp8);
        // The fused kernel saves more than FP8 does.
        if let StageCosts::Conv(c) = &mut stages[0] {
            c.fused_pool_saves = 0.45;
        }
        let (r, ms) = route(&stages);
        assert!(!r[0].fp8 && !r[0].e4m3_out, "{r:?}");
        assert!((ms - (1.0 + 0.5 - 0.45 + 1.0)).abs() < 1e-5);
    }

    #[test]
    fn a_kept_first_block_runs_fp16_where_it_saves_more_than_fp8_does() {
        // conv1_1 (no FP8 filters), conv1_2 (FP8 saves 0.3 with its quantize), pool1, conv2_1.
        let conv1_1 = |block_saves| {
            StageCosts::Conv(ConvCosts {
                fp16: 1.0,
                block_saves,
                ..ConvCosts::default()
            })
        };
        let mut stages = [
            conv1_1(None),
            conv(2.0, Some(1.5), None, [0.2, 0.2]),
            pool(0.5, 0.3),
            conv(1.0, None, None, [0.1, 0.1]),
        ];
        let (r, ms) = route(&stages);
        assert!(r[1].fp8, "{r:?}");
        assert!((ms - (1.0 + 0.2 + 1.5 + 0.5 + 1.0)).abs() < 1e-5, "{ms}");
        // The block saves 1.0 against the three apart: all FP16.
        stages[0] = conv1_1(Some(1.0));
        let (r, ms) = route(&stages);
        assert!(
            r.iter().all(|s| !s.fp8 && !s.e4m3_in && !s.e4m3_out),
            "{r:?}"
        );
        assert!((ms - (1.0 + 2.0 + 0.5 - 1.0 + 1.0)).abs() < 1e-5, "{ms}");
        assert!((fp16_cost(&stages) - ms).abs() < 1e-5);
        // Kept though slower (preferred): an all-FP16 path pays it, so FP8 wins here, and the
        // all-FP16 cost counts it.
        stages[0] = conv1_1(Some(-0.5));
        let (r, ms) = route(&stages);
        assert!(r[1].fp8, "{r:?}");
        assert!((ms - 4.2).abs() < 1e-5, "{ms}");
        assert!((fp16_cost(&stages) - 5.0).abs() < 1e-5);
    }

    #[test]
    fn the_route_is_the_cheapest_valid_one() {
        // Random stage lists and costs, some forms missing, some convs without FP8 filters:
        // the search's route is valid, costs what it says, and no route costs less.
        struct Lcg(u64);
        impl Lcg {
            fn below(&mut self, n: u32) -> u32 {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (self.0 >> 33) as u32 % n
            }
            fn ms(&mut self) -> f32 {
                0.1 + self.below(1000) as f32 / 500.0
            }
            /// A time, or none with probability p / 4.
            fn maybe(&mut self, p: u32) -> Option<f32> {
                (self.below(4) >= p).then(|| self.ms())
            }
        }
        let mut g = Lcg(0x5EED);
        for case in 0..400 {
            let n = 1 + g.below(7) as usize;
            let stages: Vec<StageCosts> = (0..n)
                .map(|i| {
                    if i > 0 && g.below(3) == 0 {
                        return pool(g.ms(), g.ms());
                    }
                    let capable = g.below(4) != 0;
                    StageCosts::Conv(ConvCosts {
                        fp16: g.ms(),
                        fp16_e4m3_out: g.maybe(2),
                        fp8: g.maybe(1).filter(|_| capable),
                        fp8_e4m3_out: g.maybe(1).filter(|_| capable),
                        convert: capable.then(|| [g.ms() / 4.0, g.ms() / 4.0]),
                        fused_pool_saves: if g.below(3) == 0 { g.ms() / 4.0 } else { 0.0 },
                        fp8_pool_saves: [g.ms() / 8.0, g.ms() / 8.0],
                        // Kept, now and then though slower (preferred): negative.
                        block_saves: (g.below(3) == 0).then(|| g.ms() - 0.4),
                    })
                })
                .collect();
            let (r, ms) = route(&stages);
            let got = cost_of(&stages, &r).unwrap_or_else(|| panic!("case {case}: invalid {r:?}"));
            assert!((got - ms).abs() < 1e-3, "case {case}: {got} against {ms}");
            assert!(ms <= fp16_cost(&stages) + 1e-4, "case {case}");
            for other in every_route(&stages) {
                if let Some(c) = cost_of(&stages, &other) {
                    assert!(ms <= c + 1e-3, "case {case}: {other:?} costs {c} < {ms}");
                }
            }
            for (i, s) in r.iter().enumerate() {
                let next_conv = (i + 1..n).find(|&j| r[j].conv);
                assert_eq!(s.next, if s.conv { next_conv } else { None }, "case {case}");
            }
        }
    }

    #[test]
    fn blocks_1_2_in_sub_batches_cost_their_runs_and_untimed_stages_run_fp16() {
        // conv pool | conv conv pool: blocks 1–2 end at stage 2, run in sub-batches of 64 of
        // 256 rows (4 runs); stage 3 untimed.
        let is_conv = [true, false, true, true, false];
        let prefix = Some(Prefix { end: 2, rows: 64 });
        let timed = |stage: usize, rows: usize| match (stage, rows) {
            (0, 64) => Some(conv(1.0, Some(0.5), Some(0.25), [0.1, 0.2])),
            (1, 64) => Some(pool(0.5, 0.25)),
            (2, 256) => Some(conv(2.0, Some(4.0), Some(4.0), [0.5, 0.5])),
            (4, 256) => Some(pool(1.0, 0.5)),
            _ => None,
        };
        let (costs, complete) = forward_costs(&is_conv, 256, prefix, timed);
        assert!(!complete);
        assert_eq!(costs[0], conv(4.0, Some(2.0), Some(1.0), [0.4, 0.8]));
        assert_eq!(costs[1], pool(2.0, 1.0));
        assert_eq!(costs[2], conv(2.0, Some(4.0), Some(4.0), [0.5, 0.5]));
        assert_eq!(costs[3], StageCosts::Conv(ConvCosts::default()));
        // Stage 2 cannot write E4M3 for the untimed stage 3, which runs FP16.
        let (r, _) = route(&costs);
        assert!(!r[2].e4m3_out && !r[3].fp8 && !r[3].e4m3_in, "{r:?}");
        // Stage 0: FP8 with an E4M3 output (0.4 + 1.0), the pool on codes (1.0), stage 2
        // dequantizing (0.5 + 2.0): 4.9, against 6.4 through FP8's FP16 output, 8 all FP16.
        assert!(r[0].fp8 && r[0].e4m3_out && r[2].dequantizes(), "{r:?}");
        // Whole, with every stage timed: the sums are the stages' own.
        let timed_all = |stage: usize, _| {
            Some(if is_conv[stage] {
                conv(1.0, None, None, [0.0; 2])
            } else {
                pool(1.0, 1.0)
            })
        };
        let (costs, complete) = forward_costs(&is_conv, 256, None, timed_all);
        assert!(complete);
        assert_eq!(fp16_cost(&costs), 5.0);
    }

    /// The preferring route with every conv capable.
    fn preferring(forms: &[Option<Fp8Forms>]) -> Vec<StageRoute> {
        route_preferring(forms, &vec![true; forms.len()])
    }

    fn summary(r: &[StageRoute]) -> Vec<(bool, bool, bool)> {
        r.iter().map(|s| (s.fp8, s.e4m3_in, s.e4m3_out)).collect()
    }

    #[test]
    fn activations_stay_e4m3_between_fp8_convs_and_through_pools() {
        // conv(FP16) conv pool conv conv pool → head
        let r = preferring(&[FP16, BOTH, POOL, BOTH, BOTH, POOL]);
        assert_eq!(
            summary(&r),
            [
                (false, false, false),
                (true, false, true), // quantizes its FP16 input, writes E4M3
                (false, true, true), // pools the codes
                (true, true, true),
                (true, true, false), // the last conv writes FP16 for the head
                (false, false, false),
            ]
        );
        assert!(!r[2].dequantizes(), "a pool works on the codes");
        assert_eq!(r[1].next, Some(3));
        assert_eq!(r[3].next, Some(4));
        assert_eq!(r[4].next, None);
    }

    #[test]
    fn an_fp16_conv_writes_e4m3_only_for_an_fp8_conv() {
        // conv(FP16, E4M3 out) conv pool conv: the first conv quantizes for the second.
        let r = preferring(&[FP16_E4M3, BOTH, POOL, HALF]);
        assert_eq!(
            summary(&r),
            [
                (false, false, true),
                (true, true, true),
                (false, true, true),
                (true, true, false),
            ]
        );
        assert!(r.iter().all(|s| !s.dequantizes()));
        // Before an FP16 conv it writes FP16.
        let r = preferring(&[FP16_E4M3, FP16, HALF]);
        assert_eq!(
            summary(&r),
            [
                (false, false, false),
                (false, false, false),
                (true, false, false),
            ]
        );
    }

    #[test]
    fn an_fp16_conv_after_an_e4m3_only_conv_reads_its_input_dequantized() {
        // The last conv has no FP8 plan here (say cuDNN refused its FP16-output form): the conv
        // before still runs FP8, writing E4M3, and the last one dequantizes its input.
        let r = preferring(&[BOTH, E4M3, FP16]);
        assert_eq!(
            summary(&r),
            [
                (true, false, true),
                (true, true, true),
                (false, true, false),
            ]
        );
        assert!(r[2].dequantizes() && !r[1].dequantizes());
        // With both forms it writes FP16 for an FP16 next conv instead (no dequantize pass).
        let r = preferring(&[BOTH, POOL, BOTH, FP16]);
        assert_eq!(
            summary(&r),
            [
                (true, false, true),
                (false, true, true),
                (true, true, false),
                (false, false, false),
            ]
        );
        // An E4M3-only last conv has no reader: it runs FP16 (its plan exists only with a next).
        let r = preferring(&[BOTH, E4M3]);
        assert_eq!(summary(&r), [(true, false, false), (false, false, false)]);
        // Every E4M3 output has a conv reading it, every conv reading E4M3 runs FP8 or
        // dequantizes, and the head reads FP16.
        for forms in [
            vec![E4M3, E4M3, E4M3, POOL],
            vec![BOTH, POOL, POOL, BOTH, E4M3],
            vec![HALF, E4M3, BOTH, FP16, E4M3, BOTH, POOL],
            vec![E4M3, FP16, E4M3, POOL, HALF, E4M3, E4M3, FP16, POOL],
            vec![FP16_E4M3, E4M3, FP16_E4M3, POOL, E4M3, FP16_E4M3, HALF],
        ] {
            let r = preferring(&forms);
            for (i, s) in r.iter().enumerate() {
                assert_eq!(s.conv, forms[i].is_some());
                if s.dequantizes() {
                    assert!(s.conv && s.e4m3_in && !s.fp8, "{forms:?}: stage {i}");
                }
                if forms[i].is_none() {
                    assert!(!s.dequantizes() && !s.fp8, "{forms:?}: pool {i}");
                    assert_eq!(s.e4m3_in, s.e4m3_out, "{forms:?}: pool {i}");
                }
                if forms[i].is_some() && s.e4m3_out {
                    let next = s.next.expect("an E4M3 output has a reader");
                    assert!(r[next].e4m3_in, "{forms:?}: stage {i}");
                }
                if let Some(f) = forms[i] {
                    match (s.fp8, s.e4m3_out) {
                        (true, true) => assert!(f.e4m3_out),
                        (true, false) => assert!(f.half_out),
                        (false, true) => assert!(f.fp16_e4m3_out),
                        (false, false) => {}
                    }
                }
            }
            assert!(!r.last().unwrap().e4m3_out, "{forms:?}");
        }
    }
}
