//! Convolution plans: which cuDNN configuration runs each conv layer at each batch size.
//!
//! Every batch size a run uses is planned at `prepare`, never in the timed hot path: the batch
//! ladders below fix the sizes (a batch of n rows runs at the smallest planned size ≥ n, the
//! extra rows computed and ignored), and each (layer, size) is tuned by timing cuDNN's top
//! candidates on random data (median of several runs, after a warm-up). Layers of the same shape
//! share one tuning (VGG16 repeats 5 of its 13 shapes). A size nobody planned (a caller's
//! buffer too small for the ladder's size) is planned on first use and counted, so `bench`
//! shows it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use half::f16;

use super::conv_direct::{self, DirectKernel, DirectOut, DirectUse};
use super::cudnn::{self, ActDesc, Candidate, ConvDesc, ConvPlan, ConvPtrs, TensorDesc};
use super::cudnn_graph::{config_name, ConvGraph, GraphForm, GraphPlan, GraphPtrs, PlanSearch};
use super::device::{dnn_err, drv_err, gpu_oom, ptr, verbose, Dev};
use super::forward_plan::{ConvCosts, Fp8Forms, StageCosts, StageDims, StageRoute};
use super::fp8::Fp8State;
use super::kernels::{ConvPoolVariant, ConvWgBuild, Kernels};
use super::plan_cache::{self, Choice, PlanCache};
use super::profile::new_event;
use super::weights::DevConv;
use crate::backend::median;
use crate::error::{Error, Result};

/// Largest workspace a single convolution candidate may ask for.
pub(super) const WS_CAP: usize = 1 << 30;

/// Heuristic candidates timed per (layer shape, batch size), fused and unfused each. The full
/// mask batch (most of the work) times every candidate cuDNN offers, as `cudnnFind` would: a
/// configuration its heuristics rank low (e.g. Winograd) may still be the fastest there.
const TIMED_CANDIDATES: usize = 3;

/// Timed runs per candidate (after one warm-up); the median counts.
pub(super) const TIMED_RUNS: usize = 3;

/// The graph API is not tried for a shape where the hand-written conv is this many times faster
/// than the legacy API: its plans gained at most 17 % over the legacy API per layer on the H200.
const GRAPH_CANNOT_CATCH_UP: f32 = 2.0;

/// Whether the hand-written conv's `direct` ms beat the legacy API's `legacy` by
/// [`GRAPH_CANNOT_CATCH_UP`] (no graph plan is worth trying then).
fn far_ahead(direct: Option<f32>, legacy: Option<f32>) -> bool {
    direct
        .zip(legacy)
        .is_some_and(|(d, l)| d * GRAPH_CANNOT_CATCH_UP < l)
}

/// Wall time `prepare` may spend building and timing graph-API plans (their finalization can
/// compile kernels) before the remaining layers keep the legacy API; FP8 plans have as much
/// again. `SCORECAM_GRAPH_BUDGET_S` sets another (seconds, e.g. shorter for tests).
const GRAPH_API_BUDGET: Duration = Duration::from_secs(20);

/// [`GRAPH_API_BUDGET`], or `SCORECAM_GRAPH_BUDGET_S` when it is a number of seconds ≥ 0.
fn graph_api_budget() -> Duration {
    parse_budget(std::env::var("SCORECAM_GRAPH_BUDGET_S").ok().as_deref())
}

fn parse_budget(v: Option<&str>) -> Duration {
    v.and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(GRAPH_API_BUDGET, Duration::from_secs_f64)
}

/// Steps of a batch ladder: a remainder batch wastes at most `max / LADDER_STEPS` rows.
pub(super) const LADDER_STEPS: usize = 8;

/// The workspace a candidate may use: at most [`WS_CAP`], at most a quarter of the free memory.
pub(super) fn ws_cap(dev: &Dev) -> Result<usize> {
    let (free, _) = dev
        .ctx
        .mem_get_info()
        .map_err(|e| drv_err("cuMemGetInfo", e))?;
    Ok(WS_CAP.min(free / 4))
}

/// The batch sizes planned for one kind of forward (masked inputs, or images): `max` and
/// `steps − 1` evenly spaced sizes below it. A batch of `n` rows runs at the smallest planned
/// size ≥ n, so a remainder wastes less than `max / steps` rows and no size is planned late.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLadder {
    sizes: Vec<usize>,
}

impl BatchLadder {
    /// `⌈max·i/steps⌉` for i = 1..=steps, deduplicated, ascending (`max` is always last).
    pub fn new(max: usize, steps: usize) -> Self {
        let steps = steps.clamp(1, max.max(1));
        let mut sizes: Vec<usize> = (1..=steps).map(|i| (max * i).div_ceil(steps)).collect();
        sizes.dedup();
        sizes.retain(|&s| s > 0);
        BatchLadder { sizes }
    }

    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The planned size a batch of `n` rows runs at when the buffers hold `cap` rows: the
    /// smallest planned size in `n..=cap`; `None` when there is none (run at `n`, unplanned).
    pub fn rows_for(&self, n: usize, cap: usize) -> Option<usize> {
        self.sizes.iter().copied().find(|&s| s >= n && s <= cap)
    }
}

/// One conv layer at one batch size; `identity`: the activation is left out (a pre-ReLU capture).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ConvKey {
    pub stage: usize,
    pub rows: usize,
    pub identity: bool,
}

/// What a tuning depends on: layers with equal shapes share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConvShape {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    rows: usize,
    identity: bool,
}

/// One chosen configuration, for `bench --json` and `SCORECAM_CUDA_VERBOSE`.
#[derive(Clone, Debug)]
pub struct PlanChoice {
    pub stage: usize,
    pub rows: usize,
    pub identity: bool,
    /// e.g. `IMPLICIT_PRECOMP_GEMM/TENSOR_OP_MATH fused`.
    pub algo: String,
    pub workspace: usize,
    /// Median of the timed runs (None: planned on first use, untimed).
    pub ms: Option<f32>,
    /// How many legacy candidates were timed.
    pub timed: usize,
    /// The fastest legacy configuration's and graph-API plan's times, when timed.
    pub legacy_ms: Option<f32>,
    pub graph_ms: Option<f32>,
    /// The hand-written conv's time, where it runs ([`super::conv_direct`]).
    pub direct_ms: Option<f32>,
    /// The wgmma conv's time on half the SMs, at the full mask batch ([`half_grid`]).
    pub direct_half_grid_ms: Option<f32>,
    /// `--precision fp8`: the fastest FP8 plan's time with an FP16 output (its input already
    /// E4M3), and whether the key has FP8 plans a masked forward's route may run.
    pub fp8_ms: Option<f32>,
    pub fp8: bool,
    /// The fastest plan with an E4M3 output (the next conv's input quantized here: an FP8 conv,
    /// or an FP16 one before the first FP8 conv), and whether it is kept. See
    /// [`super::forward_plan::route`] for which plan a forward runs.
    pub e4m3_out_ms: Option<f32>,
    /// The hand-written conv's time with an E4M3 output (an FP16 layer before an FP8 one).
    pub direct_e4m3_ms: Option<f32>,
    pub e4m3_out: bool,
    /// An FP8 layer's input conversion passes, FP16 → E4M3 and E4M3 → FP16 (ms), what the
    /// route weighs against keeping a conv FP16 or its output E4M3.
    pub convert_ms: Option<[f32; 2]>,
    /// What runs the kept FP8 forms (a graph-API plan or the wgmma conv), when any is kept:
    /// the E4M3-output form's engine where it has one; the FP16-output form's apart.
    pub fp8_algo: Option<String>,
    pub fp8_half_algo: Option<String>,
}

/// Short name of a candidate: `IMPLICIT_PRECOMP_GEMM/TENSOR_OP_MATH fused`.
pub(super) fn candidate_name(c: &Candidate) -> String {
    let algo = format!("{:?}", c.algo);
    let math = format!("{:?}", c.math);
    format!(
        "{}/{}{}",
        algo.trim_start_matches("CUDNN_CONVOLUTION_FWD_ALGO_"),
        math.trim_start_matches("CUDNN_"),
        if c.fused { " fused" } else { " + bias kernel" }
    )
}

/// Every conv plan of the prepared model.
#[derive(Default)]
pub(super) struct ConvPlans {
    plans: HashMap<ConvKey, Planned>,
    /// FP8 plans of the keys where FP8 was chosen (used once scales exist), with an FP16 and
    /// with an E4M3 output; FP16 plans with an E4M3 output where they won.
    fp8: HashMap<ConvKey, Fp8Engine>,
    fp8_e4m3: HashMap<ConvKey, Fp8Engine>,
    fp16_e4m3: HashMap<ConvKey, Fp8Engine>,
    /// Keys whose E4M3 output (an FP16 layer before an FP8 one) the hand-written conv writes.
    direct_e4m3: HashSet<ConvKey>,
    choices: Vec<PlanChoice>,
    /// Plans made on first use in the hot path (0 when the ladders cover every batch).
    pub built_on_first_use: usize,
    /// Layer shapes that kept the legacy API untried because the graph API's time budget ran out.
    pub graph_skipped: usize,
    /// Layer shapes the graph API was not tried on because the hand-written conv was far ahead.
    pub graph_left_to_direct: usize,
    /// What the FP16 and the FP8 graph-API plan searches met.
    pub graph_search: PlanSearch,
    pub fp8_search: PlanSearch,
    /// Seconds of each pass of [`plan_all`], for the report.
    pub pass_s: [(&'static str, f64); 3],
    /// The convs tried with their max-pool fused ([`plan_fused_pools`]), kept or not.
    pub fused_pools: Vec<FusedPool>,
    /// The first block tried as one kernel ([`plan_fused_block`]), kept or not.
    pub fused_block: Option<FusedBlock>,
    /// `--precision fp8`, per masked-forward key: what each way of running it costs (ms), the
    /// input of [`forward_plan::route`].
    fp8_costs: HashMap<ConvKey, ConvCosts>,
    /// `--precision fp8`, per (pool stage, rows): the max-pool's ms on FP16 values and on E4M3
    /// codes ([`time_fp8_passes`]).
    pool_ms: HashMap<(usize, usize), [f32; 2]>,
    /// `--precision fp8`: the FP8 convs tried with their max-pool in one kernel
    /// ([`time_fp8_passes`]), kept or not.
    pub fp8_fused_pools: Vec<Fp8FusedPool>,
}

impl ConvPlans {
    pub fn choices(&self) -> &[PlanChoice] {
        &self.choices
    }

    /// The build of the fused conv + pool that runs conv stage `stage` with the max-pool after
    /// it, where forwards use it.
    pub fn pool_fused(&self, stage: usize) -> Option<ConvPoolVariant> {
        self.fused_pools
            .iter()
            .find(|f| f.stage == stage && f.kept)
            .map(|f| f.variant)
    }

    /// Whether conv stage `stage`, the conv after it and the max-pool after that run as one
    /// kernel ([`FusedBlock`]) where forwards allow.
    pub fn block_fused(&self, stage: usize) -> bool {
        self.fused_block
            .as_ref()
            .is_some_and(|b| b.stage == stage && b.kept)
    }

    /// What running feature stage `stage` at `rows` rows each way costs a forward (ms): a conv's
    /// forms as timed (the fused conv + pool's saving included, scaled from the batch it was
    /// timed at), a pool's two formats. None where the tuning left it untimed.
    pub fn route_costs(&self, stage: usize, rows: usize, conv: bool) -> Option<StageCosts> {
        if !conv {
            let [f16, e4m3] = *self.pool_ms.get(&(stage, rows))?;
            return Some(StageCosts::Pool { f16, e4m3 });
        }
        let key = ConvKey {
            stage,
            rows,
            identity: false,
        };
        let mut costs = *self.fp8_costs.get(&key)?;
        // A fused kernel's saving, timed at `timed` rows, at these rows. (Negative where it is
        // kept though slower: preferred, in tests.)
        let at_rows = |saves: f32, timed: usize| saves * rows as f32 / timed as f32;
        if let Some(f) = self.fused_pools.iter().find(|f| f.stage == stage && f.kept) {
            costs.fused_pool_saves = at_rows(f.conv_ms + f.pool_ms - f.ms, f.rows);
        }
        if let Some(b) = self
            .fused_block
            .as_ref()
            .filter(|b| b.stage == stage && b.kept)
        {
            costs.block_saves = Some(at_rows(b.apart_ms - b.ms, b.rows));
        }
        if let Some(f) = self.fp8_fused_pools.iter().find(|f| f.stage == stage) {
            for (saves, out) in costs.fp8_pool_saves.iter_mut().zip(&f.outs) {
                if let Some(o) = out.as_ref().filter(|o| o.kept) {
                    *saves = at_rows(o.apart_ms - o.ms, f.rows);
                }
            }
        }
        Some(StageCosts::Conv(costs))
    }

    /// The pooled E4M3 build that runs FP8 conv stage `stage` with its max-pool, per output
    /// format (FP16, E4M3), where it was kept.
    pub fn fp8_pool_fused(&self, stage: usize) -> [Option<ConvWgBuild>; 2] {
        let f = self.fp8_fused_pools.iter().find(|f| f.stage == stage);
        [0, 1].map(|i| {
            let out = f.and_then(|f| f.outs[i].as_ref());
            out.filter(|o| o.kept).map(|o| o.build)
        })
    }

    /// The FP8 plans of `key` a forward may run.
    pub fn fp8_forms(&self, key: ConvKey) -> Fp8Forms {
        Fp8Forms {
            half_out: self.fp8.contains_key(&key),
            e4m3_out: self.fp8_e4m3.contains_key(&key),
            fp16_e4m3_out: self.fp16_e4m3.contains_key(&key) || self.direct_e4m3.contains(&key),
        }
    }
}

/// The arena the tuning launches on: both ping-pong buffers (random data in, garbage out) and
/// the workspace (grown for a graph plan that needs more).
pub(super) struct TuneArena<'a> {
    pub bufs: &'a [CudaSlice<f16>; 2],
    pub workspace: &'a mut CudaSlice<u8>,
}

/// How one (layer, batch size) runs.
pub(super) enum Planned {
    /// The legacy API: its descriptors and the chosen algorithm.
    Legacy(ConvPlan),
    /// A graph-API execution plan (conv + bias + ReLU in one), shared by layers of one shape.
    Graph(Rc<GraphConv>),
    /// The hand-written conv ([`super::conv_direct`]), in the build the tuning kept.
    Direct(DirectKernel),
}

/// Which engine runs a (layer, batch size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Legacy,
    Graph,
    Direct,
}

/// The engine to keep, from the timed milliseconds of each (None: it does not run here): a
/// preferred one (tests) wherever it runs, else the fastest; another engine replaces the legacy
/// API only when strictly faster.
fn pick_engine(
    [legacy, graph, direct]: [Option<f32>; 3],
    prefer_graph: bool,
    prefer_direct: bool,
) -> Engine {
    if prefer_direct && direct.is_some() {
        return Engine::Direct;
    }
    if prefer_graph && graph.is_some() {
        return Engine::Graph;
    }
    let mut best = (Engine::Legacy, legacy.unwrap_or(f32::INFINITY));
    for (e, ms) in [(Engine::Graph, graph), (Engine::Direct, direct)] {
        if let Some(ms) = ms.filter(|&m| m < best.1) {
            best = (e, ms);
        }
    }
    best.0
}

/// A graph and the execution plan chosen for it (the plan refers to the graph's descriptors).
pub(super) struct GraphConv {
    plan: GraphPlan,
    /// Declared after `plan`, so dropped after it: cuDNN may not copy what a plan refers to.
    _graph: ConvGraph,
}

/// Which keys also try the graph API (`SCORECAM_CONV_GRAPH`): `off`, `full` (default: the full
/// mask batch, >97 % of the masked forwards; finalizing graph plans can compile kernels, so
/// not every ladder size pays for it), `all` (every post-ReLU key), or `prefer` (every
/// post-ReLU key, and a graph plan wins whenever one runs: for tests of the graph path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphUse {
    Off,
    FullBatch,
    All,
    Prefer,
}

impl GraphUse {
    pub fn from_env() -> GraphUse {
        match std::env::var("SCORECAM_CONV_GRAPH").as_deref() {
            Ok("off") | Ok("0") => GraphUse::Off,
            Ok("all") => GraphUse::All,
            Ok("prefer") => GraphUse::Prefer,
            _ => GraphUse::FullBatch,
        }
    }
}

/// What the tuning of one shape found.
#[derive(Clone)]
struct Tuned {
    legacy: Candidate,
    legacy_ms: Option<f32>,
    timed: usize,
    graph: Option<(Rc<GraphConv>, f32, String)>,
    /// The fastest hand-written build of the layer's ([`DirectKernel::candidates`]) and its time.
    direct: Option<DirectKernel>,
    direct_ms: Option<f32>,
    /// The wgmma conv's fastest build at the full mask batch on half the SMs ([`half_grid`]).
    direct_half_grid_ms: Option<f32>,
}

/// What the FP8 tuning of one shape found, for inputs arriving E4M3 or FP16 (the timing
/// includes the quantize pass for FP16): the fastest plan of each form and its time. The outer
/// None: not tried yet (each form is tried when a layer of the shape first wants it).
#[derive(Clone, Default)]
struct Fp8Tuned {
    /// FP8 with an FP16 output, FP8 with an E4M3 output.
    half: Option<Option<(Rc<GraphConv>, f32)>>,
    e4m3: Option<Option<(Rc<GraphConv>, f32)>>,
    /// FP16 with an E4M3 output (an FP16 layer before an FP8 one).
    fp16_e4m3: Option<Option<(Rc<GraphConv>, f32)>>,
    /// The same through the hand-written conv: its time.
    direct_e4m3: Option<Option<f32>>,
    /// FP8 with an FP16 output, FP8 with an E4M3 output, by the wgmma conv: its time.
    wg_half: Option<Option<(ConvWgBuild, f32)>>,
    wg_e4m3: Option<Option<(ConvWgBuild, f32)>>,
}

/// How a key's FP8 form (or FP16 form with an E4M3 output) runs: a graph-API plan, or the
/// wgmma conv's E4M3 builds ([`conv_direct::launch_fp8`]).
#[derive(Clone)]
pub(super) enum Fp8Engine {
    Graph(Rc<GraphConv>),
    /// The build the tuning timed fastest.
    Wg(ConvWgBuild),
}

impl Fp8Engine {
    /// Workspace bytes it needs.
    fn ws(&self) -> usize {
        match self {
            Fp8Engine::Graph(g) => g.plan.ws,
            Fp8Engine::Wg(_) => 0,
        }
    }

    /// How reports name it.
    fn name(&self) -> String {
        match self {
            Fp8Engine::Graph(g) => format!("graph API {}", config_name(g.plan.origin)),
            Fp8Engine::Wg(build) => format!("{} E4M3 {build:?}", conv_direct::WG_NAME),
        }
    }
}

/// The faster of a graph-API plan's and the wgmma conv's timings of one form (the hand-written
/// one wherever it runs, if `prefer_direct`).
fn fp8_best(
    graph: Option<(Rc<GraphConv>, f32)>,
    wg: Option<(ConvWgBuild, f32)>,
    prefer_direct: bool,
) -> Option<(Fp8Engine, f32)> {
    let graph = graph.map(|(g, ms)| (Fp8Engine::Graph(g), ms));
    match (graph, wg) {
        (Some(g), Some(w)) if !prefer_direct && g.1 <= w.1 => Some(g),
        (g, w) => w.map(|(build, ms)| (Fp8Engine::Wg(build), ms)).or(g),
    }
}

/// `--precision fp8`'s share of the planning: the state whose filters and scales the timing
/// uses, the batch sizes FP8 is tried at (the masked forwards'), and per feature stage the next
/// conv stage when that one may run FP8 too (the E4M3-output form is tried only there).
pub(super) struct Fp8Tuning<'a> {
    pub state: &'a mut Fp8State,
    pub rows: &'a [usize],
    pub next_fp8: &'a [Option<usize>],
    /// Stages kept FP16, with no FP8 or E4M3-output plan (tests of the routes around them).
    pub keep_fp16: &'a [usize],
}

/// Plan every key at prepare, in three passes: (1) once per distinct shape, cuDNN's legacy
/// candidates (ranked by cuDNN) and the hand-written conv where it applies, timed; (2) where
/// `graph` says, the graph API's plans, the costliest shapes first within the time budget
/// ([`graph_search_order`]); (3) per key, the fastest engine ([`pick_engine`]) and, under
/// `--precision fp8`, the FP8 forms. Returns the largest workspace a chosen configuration needs.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_all(
    dev: &Dev,
    dnn: &cudnn::Handle,
    convs: &[Option<DevConv>],
    dims: &[super::StageDims],
    keys: &[ConvKey],
    acts: (&ActDesc, &ActDesc),
    mut arena: TuneArena<'_>,
    ws_limit: usize,
    graph: (GraphUse, usize),
    (direct, direct_check): (DirectUse, &mut DirectChecks),
    kernels: &Kernels,
    mut fp8: Option<Fp8Tuning<'_>>,
    cache: &mut PlanCache,
) -> Result<(ConvPlans, usize)> {
    let mut out = ConvPlans::default();
    let mut tuned: HashMap<ConvShape, Tuned> = HashMap::new();
    let mut fp8_tuned: HashMap<(ConvShape, bool), Fp8Tuned> = HashMap::new();
    let mut ws_used = 0;
    let timer = EventPair::new(dev)?;
    // Time spent finalizing and timing graph-API plans is counted per kind (`PlanSearch::spent`):
    // FP16 and FP8 each have the budget, so FP16 graphs never use up `--precision fp8`'s.
    let budget = graph_api_budget();
    let layer_of = |stage: usize| {
        convs[stage]
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("features stage {stage} is not a convolution")))
    };
    let shape_of = |key: ConvKey| -> Result<ConvShape> {
        let layer = layer_of(key.stage)?;
        let d = dims[key.stage];
        Ok(ConvShape {
            cin: layer.cin_s,
            cout: layer.cout,
            h: d.in_h,
            w: d.in_w,
            rows: key.rows,
            identity: key.identity,
        })
    };
    // Key `key`'s graph-API plans of `form` (FP8 ones with `run` and whether its input arrives
    // E4M3), their time counted against their kind's budget.
    let time_graph = |key: ConvKey,
                      arena: &mut TuneArena<'_>,
                      run: Option<(Fp8Run, bool)>,
                      form: GraphForm,
                      (search, cache): (&mut PlanSearch, &mut PlanCache)| {
        let started = Instant::now();
        let deadline = started + budget.saturating_sub(search.spent);
        let timed = time_graph_plans(
            dev,
            dnn,
            &timer,
            layer_of(key.stage)?,
            (dims[key.stage], key.rows),
            arena,
            (ws_limit, deadline),
            run,
            form,
            (&mut *search, cache),
        );
        search.spent += started.elapsed();
        timed
    };

    let started = Instant::now();
    // 1. Per distinct shape: cuDNN's legacy candidates and the hand-written conv, timed.
    let mut shapes: Vec<(ConvShape, ConvKey)> = Vec::new();
    // Keys (layers at a batch size) per shape: how often a forward runs the shape's plan.
    let mut layers_of: HashMap<ConvShape, usize> = HashMap::new();
    for &key in keys {
        let shape = shape_of(key)?;
        *layers_of.entry(shape).or_default() += 1;
        if tuned.contains_key(&shape) {
            continue;
        }
        let layer = layer_of(key.stage)?;
        let d = dims[key.stage];
        let (op, (xd, yd, cd)) = key_descriptors(layer, d, key)?;
        let mut cands = cudnn::candidates(dnn, &xd, &layer.wdesc, &cd, &yd, key.identity, ws_limit)
            .map_err(|e| dnn_err(&op, e))?;
        let take = if key.rows == graph.1 {
            usize::MAX
        } else {
            TIMED_CANDIDATES
        };
        let need = timed_subset(&cands, take).map(|c| c.ws).max().unwrap_or(0);
        if let Err(e) = grow_workspace(dev, arena.workspace, need) {
            // Memory is tight: time only the candidates the workspace already holds (the
            // workhorse needs little); none left is the out-of-memory error.
            let have = arena.workspace.len();
            cands.retain(|c| c.ws <= have);
            if !matches!(e, Error::OutOfMemory(_)) || cands.is_empty() {
                return Err(e);
            }
        }
        let act = if key.identity { acts.1 } else { acts.0 };
        let (legacy, legacy_ms, timed) = time_candidates(
            dev,
            dnn,
            &timer,
            (&cands, take),
            (&xd, &yd, &cd),
            act,
            layer,
            &arena,
            &op,
        )?;
        // The hand-written conv where it runs: each of its builds timed, the fastest kept.
        let mut fastest: Option<(DirectKernel, f32)> = None;
        let dims = [key.rows, d.in_h, d.in_w];
        let out = DirectOut::Half {
            identity: key.identity,
        };
        for candidate in direct_builds(direct, direct_check, dev, kernels, layer)? {
            let ms = time_direct(
                dev,
                &timer,
                (kernels, candidate),
                layer,
                dims,
                out,
                &arena,
                None,
            )?;
            if fastest.is_none_or(|(_, best)| ms < best) {
                fastest = Some((candidate, ms));
            }
        }
        let (direct_kind, direct_ms) = (fastest.map(|f| f.0), fastest.map(|f| f.1));
        // At the full mask batch, the wgmma conv's fastest build again on half the SMs: what
        // limits it (each SM's own work, or the L2 or memory the SMs share).
        let wgmma = direct_kind.and_then(DirectKernel::build).is_some();
        let direct_half_grid_ms = match (direct_kind, half_grid(kernels)) {
            (Some(kind), Some(blocks)) if wgmma && key.rows == graph.1 => {
                let arena = &arena;
                Some(time_direct(
                    dev,
                    &timer,
                    (kernels, kind),
                    layer,
                    dims,
                    out,
                    arena,
                    Some(blocks),
                )?)
            }
            _ => None,
        };
        tuned.insert(
            shape,
            Tuned {
                legacy,
                legacy_ms,
                timed,
                graph: None,
                direct: direct_kind,
                direct_ms,
                direct_half_grid_ms,
            },
        );
        shapes.push((shape, key));
    }

    out.pass_s[0] = (
        "conv tuning: legacy API and hand-written conv",
        started.elapsed().as_secs_f64(),
    );
    let started = Instant::now();
    // 2. The graph API, where `graph` says, shape by shape in order of the time the layers of
    // the shape take per forward (so that a budget that runs out leaves the least on the table),
    // except where the hand-written conv already beats the legacy API by more than any graph
    // plan has (the graph API gained at most 17 % per layer on the H200).
    let wanted = |shape: &ConvShape| {
        !shape.identity
            && match graph.0 {
                GraphUse::Off => false,
                GraphUse::FullBatch => shape.rows == graph.1,
                GraphUse::All | GraphUse::Prefer => true,
            }
    };
    let graph_shapes: Vec<_> = shapes
        .iter()
        .filter(|(shape, _)| wanted(shape))
        .map(|&(shape, key)| {
            let t = &tuned[&shape];
            ((shape, key), layers_of[&shape], t.legacy_ms, t.direct_ms)
        })
        .collect();
    let wanted_shapes = graph_shapes.len();
    let order = graph_search_order(graph_shapes, graph.0 == GraphUse::Prefer);
    out.graph_left_to_direct = wanted_shapes - order.len();
    for (shape, key) in order {
        // Finalizing graph plans may compile kernels: past the budget, the remaining shapes keep
        // the legacy API (counted in the report).
        if out.graph_search.spent >= budget {
            out.graph_skipped += 1;
            continue;
        }
        let found = time_graph(
            key,
            &mut arena,
            None,
            GraphForm::FP16,
            (&mut out.graph_search, &mut *cache),
        )?;
        tuned.get_mut(&shape).expect("tuned in pass 1").graph = found.map(|(g, ms)| {
            let name = format!("graph API {} (conv+bias+ReLU)", config_name(g.plan.origin));
            (g, ms, name)
        });
    }

    out.pass_s[1] = (
        "conv tuning: FP16 graph-API plans",
        started.elapsed().as_secs_f64(),
    );
    let started = Instant::now();
    // 3. Per key: the fastest engine, and the FP8 forms.
    for &key in keys {
        let layer = layer_of(key.stage)?;
        let d = dims[key.stage];
        let shape = shape_of(key)?;
        let t = tuned[&shape].clone();
        // FP8 (masked-forward sizes): for a capable layer the E4M3-output form where the next
        // conv may run FP8 too, the FP16-output form where that is not so or offers nothing; for
        // an FP16 layer before a capable one, the FP16 form with an E4M3 output. Each form's plans
        // are shared by the layers of one shape whose input arrives the same way; it is tried
        // when one first wants it.
        let fp8_key = fp8
            .as_ref()
            .filter(|f| !key.identity && f.rows.contains(&key.rows))
            .filter(|f| !f.keep_fp16.contains(&key.stage))
            .map(|f| (f.state.filters[key.stage].is_some(), f.next_fp8[key.stage]));
        let fp8_next = fp8_key.filter(|k| k.0).map(|k| k.1);
        // A capable layer's FP8 forms are timed on an input already E4M3 (its quantize pass,
        // where the route needs one, is timed apart); an FP16 layer's on its FP16 input.
        let input_e4m3 = fp8_next.is_some();
        let mut f8 = fp8_tuned
            .get(&(shape, input_e4m3))
            .cloned()
            .unwrap_or_default();
        let engine = pick_engine(
            [t.legacy_ms, t.graph.as_ref().map(|g| g.1), t.direct_ms],
            graph.0 == GraphUse::Prefer,
            direct == DirectUse::Prefer,
        );
        let (planned, algo, ws, ms) = match (engine, &t.graph) {
            (Engine::Graph, Some((g, ms, name))) => (
                Planned::Graph(Rc::clone(g)),
                name.clone(),
                g.plan.ws,
                Some(*ms),
            ),
            (Engine::Direct, _) => match t.direct {
                Some(kind) => (Planned::Direct(kind), kind.name(), 0, t.direct_ms),
                None => {
                    return Err(Error::Invalid(format!(
                        "conv stage {}: the hand-written conv chosen without a timed build",
                        key.stage
                    )))
                }
            },
            _ => {
                // The legacy API's descriptors, made for the plans that use them only.
                let (_, (x, y, conv)) = key_descriptors(layer, d, key)?;
                let choice = t.legacy;
                let plan = ConvPlan { x, y, conv, choice };
                let name = candidate_name(&choice);
                (Planned::Legacy(plan), name, choice.ws, t.legacy_ms)
            }
        };
        ws_used = ws_used.max(ws);
        if verbose() {
            eprintln!(
                "cuda: conv stage {} batch {}{}: {algo} ({ws} B workspace){} \
                 [legacy {:?} ms, graph {:?} ms, hand-written {:?} ms]",
                key.stage,
                key.rows,
                if key.identity { " (pre-ReLU)" } else { "" },
                ms.map(|m| format!(", {m:.3} ms")).unwrap_or_default(),
                t.legacy_ms,
                t.graph.as_ref().map(|g| g.1),
                t.direct_ms
            );
        }
        // Every FP8 form that has a plan joins the FP16 plan (kept for base forwards and before
        // any scales exist), with its time: which ones a forward runs is the route's choice, the
        // least time over the whole forward, conversion passes and pools counted
        // ([`forward_plan::route`], from [`ConvPlans::route_costs`]).
        let prefer_direct = direct == DirectUse::Prefer;
        if let (Some((capable, next)), Some(f)) = (fp8_key, fp8.as_mut()) {
            // Forms in order until one offers a plan.
            let mut try_forms =
                |arena: &mut TuneArena<'_>, state: &mut Fp8State, forms: &[GraphForm]| {
                    if out.fp8_search.spent >= budget {
                        out.fp8_search.skipped += 1;
                        return Ok(None);
                    }
                    for &form in forms {
                        let run = Fp8Run {
                            kernels,
                            state: &mut *state,
                            stage: key.stage,
                            next,
                        };
                        let run = Some((run, input_e4m3));
                        let searched = (&mut out.fp8_search, &mut *cache);
                        if let Some(p) = time_graph(key, arena, run, form, searched)? {
                            return Ok(Some(p));
                        }
                    }
                    Ok::<_, Error>(None)
                };
            // FP16 bias first; should no engine take it, an f32 bias.
            let fp8_forms = |e4m3_out| [false, true].map(|b| GraphForm::fp8(b, e4m3_out));
            if capable && next.is_some() && f8.e4m3.is_none() {
                f8.e4m3 = Some(try_forms(&mut arena, f.state, &fp8_forms(true))?);
            }
            // The wgmma conv's E4M3 builds that run here and passed their device checks.
            let wg_builds = match capable {
                true => fp8_wg_builds(
                    direct,
                    direct_check,
                    dev,
                    kernels,
                    layer,
                    f.state,
                    key.stage,
                    false,
                )?,
                false => Vec::new(),
            };
            let wg = !wg_builds.is_empty();
            let wg_timing = |e4m3_out: bool, state: &mut Fp8State, arena: &TuneArena<'_>| {
                let run = Fp8Run {
                    kernels,
                    state,
                    stage: key.stage,
                    next,
                };
                let shape = ([key.rows, d.in_h, d.in_w], input_e4m3, (e4m3_out, false));
                time_wg_fp8(dev, &timer, (&wg_builds, layer), run, shape, arena.bufs)
            };
            if let (true, Some(_), None) = (wg, next, f8.wg_e4m3) {
                f8.wg_e4m3 = Some(wg_timing(true, f.state, &arena)?);
            }
            if let (false, Some(next), None) = (capable, next, f8.direct_e4m3) {
                let e4m3_kind = DirectKernel::of(layer, kernels).filter(|k| k.writes_e4m3());
                f8.direct_e4m3 = Some(match e4m3_kind {
                    Some(kind)
                        if direct_builds(direct, direct_check, dev, kernels, layer)?
                            .contains(&kind) =>
                    {
                        let dims = [key.rows, d.in_h, d.in_w];
                        let m = f.state.multiplier(next);
                        let out = DirectOut::E4m3(&m);
                        let with = (kernels, kind);
                        Some(time_direct(
                            dev, &timer, with, layer, dims, out, &arena, None,
                        )?)
                    }
                    _ => None,
                });
                // A graph plan does not catch up with a hand-written conv that far ahead.
                if far_ahead(f8.direct_e4m3.flatten(), t.legacy_ms) {
                    f8.fp16_e4m3 = Some(None);
                }
            }
            if !capable && next.is_some() && f8.fp16_e4m3.is_none() {
                f8.fp16_e4m3 = Some(try_forms(&mut arena, f.state, &[GraphForm::FP16_E4M3_OUT])?);
            }
            // The graph API's FP16-output form only where there is no E4M3 one (no next conv
            // that may run FP8, or no plan; the shape's E4M3 plan, tried for another layer,
            // does not serve a last conv): elsewhere it would spare a route only the dequantize
            // pass of an FP16 next conv, not worth the search time it takes from the other
            // layers' FP8 plans (the budget ran out in the H200 run).
            let no_e4m3 = next.is_none() || f8.e4m3.as_ref().is_none_or(Option::is_none);
            if capable && f8.half.is_none() && no_e4m3 {
                f8.half = Some(try_forms(&mut arena, f.state, &fp8_forms(false))?);
            }
            if let (true, None) = (wg, f8.wg_half) {
                f8.wg_half = Some(wg_timing(false, f.state, &arena)?);
            }
            fp8_tuned.insert((shape, input_e4m3), f8.clone());
        }
        let half = fp8_best(
            f8.half.clone().flatten(),
            f8.wg_half.flatten(),
            prefer_direct,
        )
        .filter(|_| fp8_next.is_some());
        let e4m3 = fp8_best(
            f8.e4m3.clone().flatten(),
            f8.wg_e4m3.flatten(),
            prefer_direct,
        )
        .filter(|_| fp8_next.is_some_and(|n| n.is_some()));
        let before_fp8 = fp8_key.is_some_and(|(capable, next)| !capable && next.is_some());
        let fp16_e4m3 = (f8.fp16_e4m3.clone().flatten())
            .filter(|_| before_fp8)
            .map(|(g, ms)| (Fp8Engine::Graph(g), ms));
        let direct_e4m3 = f8.direct_e4m3.flatten().filter(|_| before_fp8);
        type Timed = Option<(Fp8Engine, f32)>;
        let mut kept = |plans: &mut HashMap<ConvKey, Fp8Engine>, p: &Timed| match p {
            Some((e, _)) => {
                ws_used = ws_used.max(e.ws());
                plans.insert(key, e.clone());
                true
            }
            None => false,
        };
        let half_kept = kept(&mut out.fp8, &half);
        let e4m3_kept = kept(&mut out.fp8_e4m3, &e4m3);
        // An FP16 layer's E4M3 output: the faster of the graph API's and the hand-written conv's
        // (the hand-written one wherever it runs, if preferred) competes.
        let direct_first = direct_e4m3.is_some_and(|d| {
            direct == DirectUse::Prefer || fp16_e4m3.as_ref().is_none_or(|g| d < g.1)
        });
        let fp16_e4m3_ms = match direct_e4m3.filter(|_| direct_first) {
            Some(d) => {
                out.direct_e4m3.insert(key);
                Some(d)
            }
            None => kept(&mut out.fp16_e4m3, &fp16_e4m3)
                .then(|| fp16_e4m3.as_ref().map(|p| p.1))
                .flatten(),
        };
        // The engines of the FP8 forms, for the report: the E4M3-output one's first.
        let half_algo = half.as_ref().map(|p| p.0.name());
        let fp8_algo = (e4m3.as_ref().map(|p| p.0.name())).or_else(|| half_algo.clone());
        // What the route weighs (the conversion passes are timed after: [`time_fp8_passes`]).
        // Every masked-forward key at an FP8 batch size, FP16-only where it has no FP8 forms.
        let fp8_rows = fp8.as_ref().is_some_and(|f| f.rows.contains(&key.rows));
        if let (true, false, Some(fp16)) = (fp8_rows, key.identity, ms) {
            let costs = ConvCosts {
                fp16,
                fp16_e4m3_out: fp16_e4m3_ms,
                fp8: half.as_ref().map(|p| p.1),
                fp8_e4m3_out: e4m3.as_ref().map(|p| p.1),
                convert: None,
                fused_pool_saves: 0.0,
                fp8_pool_saves: [0.0; 2],
                block_saves: None,
            };
            out.fp8_costs.insert(key, costs);
        }
        out.choices.push(PlanChoice {
            stage: key.stage,
            rows: key.rows,
            identity: key.identity,
            algo,
            workspace: ws,
            ms,
            timed: t.timed,
            legacy_ms: t.legacy_ms,
            graph_ms: t.graph.as_ref().map(|g| g.1),
            direct_ms: t.direct_ms,
            direct_half_grid_ms: t.direct_half_grid_ms,
            fp8_ms: half.as_ref().map(|p| p.1),
            fp8: half_kept || e4m3_kept,
            e4m3_out_ms: e4m3.as_ref().or(fp16_e4m3.as_ref()).map(|p| p.1),
            direct_e4m3_ms: direct_e4m3,
            e4m3_out: e4m3_kept || fp16_e4m3_ms.is_some(),
            convert_ms: None,
            fp8_algo,
            fp8_half_algo: half_algo,
        });
        out.plans.insert(key, planned);
    }
    out.pass_s[2] = (
        "conv tuning: choices and FP8 plans",
        started.elapsed().as_secs_f64(),
    );
    Ok((out, ws_used))
}

/// What an FP8 execution needs besides the graph: the quantize kernel, the filters and scales,
/// which stage's, and the next conv stage (whose multiplier an E4M3 output is scaled by).
pub(super) struct Fp8Run<'a> {
    pub kernels: &'a Kernels,
    pub state: &'a mut Fp8State,
    pub stage: usize,
    pub next: Option<usize>,
}

/// Where a conv's input is.
pub(super) enum ConvInput<'v, 'a> {
    /// FP16 activations (all of the view); an FP8 plan quantizes them into the FP8 input
    /// buffer first, at the stage's multiplier (the tuning; a forward's plan quantizes in a
    /// step of its own and passes the codes).
    Half(&'v CudaView<'a, f16>),
    /// E4M3 codes already at the stage's multiplier, at this device address (an FP8 plan only):
    /// the previous conv's output, or the FP8 input buffer.
    E4m3(u64),
}

impl Fp8Run<'_> {
    /// The device address of the stage's E4M3 input: an FP16 `input` quantized into the FP8
    /// input buffer at the stage's multiplier, or the codes as they came.
    fn e4m3_input(&mut self, dev: &Dev, input: ConvInput<'_, '_>) -> Result<u64> {
        match input {
            ConvInput::Half(x) => {
                let s = &dev.stream;
                self.state.quantize_input(self.kernels, s, self.stage, x)?;
                Ok(ptr(&self.state.x8, s))
            }
            ConvInput::E4m3(x) => Ok(x),
        }
    }

    /// The stage whose multiplier an E4M3 output is scaled by: the next FP8 conv's.
    fn out_scale_stage(&self) -> Result<usize> {
        self.next.ok_or_else(|| {
            Error::Invalid(format!(
                "features stage {}: an E4M3 output with no FP8 conv after it to read it",
                self.stage
            ))
        })
    }

    /// Run the wgmma conv's E4M3 `build` (the stage's packed FP8 filter) on `input` into `y` (FP16
    /// or, with `e4m3_out`, E4M3 at the next stage's multiplier; with `pool`, its 2×2 max-pool);
    /// an FP16 input is quantized first.
    ///
    /// # Safety
    /// `input` must hold the layer's input and `y` its output at `dims` in their types, apart.
    pub(super) unsafe fn execute_wg(
        &mut self,
        dev: &Dev,
        (build, layer): (ConvWgBuild, &DevConv),
        input: ConvInput<'_, '_>,
        y: u64,
        dims: [usize; 3],
        (e4m3_out, pool): (bool, bool),
    ) -> Result<()> {
        let i = self.stage;
        let x = self.e4m3_input(dev, input)?;
        // (The multiplier is not read without an E4M3 output.)
        let scaled_by = if e4m3_out { self.out_scale_stage()? } else { i };
        let st = &*self.state;
        let Some(wpack) = st.wg_filters[i].as_ref() else {
            return Err(Error::Invalid(format!(
                "features stage {i} has no FP8 filter packed for the wgmma conv"
            )));
        };
        let scales = (&st.descale(i), &st.multiplier(scaled_by));
        // SAFETY: the caller's, passed on; the FP8 input buffer holds the quantized input.
        unsafe {
            let io = (x, (e4m3_out, pool), y);
            conv_direct::launch_fp8(dev, self.kernels, layer, (build, wpack), dims, scales, io)
        }
    }

    /// Run `plan` on `input` into `y` (FP16 or, for an E4M3-output plan, E4M3 at the next
    /// stage's multiplier). An FP8 plan quantizes an FP16 input first; an FP16 plan (with an
    /// E4M3 output) reads FP16 only.
    ///
    /// # Safety
    /// `input` must hold the layer's input and `y` its output for the plan's rows in the plan's
    /// types, `ws` ≥ `plan.ws` bytes, and an FP8 plan's stage must have an FP8 filter.
    #[allow(clippy::too_many_arguments)]
    unsafe fn execute(
        &mut self,
        dev: &Dev,
        dnn: &cudnn::Handle,
        plan: &GraphPlan,
        layer: &DevConv,
        input: ConvInput<'_, '_>,
        y: u64,
        ws: &CudaSlice<u8>,
    ) -> Result<std::result::Result<(), cudarc::cudnn::CudnnError>> {
        let s = &dev.stream;
        let i = self.stage;
        let fp8 = plan.form.fp8;
        let x = match input {
            input if fp8 => self.e4m3_input(dev, input)?,
            ConvInput::Half(x) => ptr(x, s),
            ConvInput::E4m3(_) => {
                return Err(Error::Invalid(format!(
                    "features stage {i}: an FP16 plan given E4M3 input"
                )))
            }
        };
        let st = &*self.state;
        let w = match (fp8, st.filters[i].as_ref()) {
            (true, Some(filter)) => ptr(filter, s),
            (true, None) => {
                return Err(Error::Invalid(format!(
                    "features stage {i} has no FP8 filter"
                )))
            }
            (false, _) => ptr(&layer.filter, s),
        };
        let scale_y = match plan.form.e4m3_out {
            true => ptr(&st.multiplier(self.out_scale_stage()?), s),
            false => 0,
        };
        let p = GraphPtrs {
            x,
            w,
            bias: if plan.form.bias_f32 {
                ptr(&layer.bias32, s)
            } else {
                ptr(&layer.bias, s)
            },
            y,
            ws: ptr(ws, s),
            descale: if fp8 { ptr(&st.descale(i), s) } else { 0 },
            scale_y,
        };
        Ok(plan.execute(dnn, p))
    }
}

/// The shapes the graph API is tried on, in order: most milliseconds per forward first (the
/// layers of the shape × the faster of the legacy API and the hand-written conv), leaving out
/// those where the hand-written conv beats the legacy API by [`GRAPH_CANNOT_CATCH_UP`] (unless
/// the graph API is preferred). Each item: (what, layers, legacy ms, hand-written ms).
fn graph_search_order<T>(
    shapes: Vec<(T, usize, Option<f32>, Option<f32>)>,
    prefer_graph: bool,
) -> Vec<T> {
    let mut by_time: Vec<(T, f32)> = shapes
        .into_iter()
        .filter(|&(_, _, legacy, direct)| prefer_graph || !far_ahead(direct, legacy))
        .map(|(what, layers, legacy, direct)| {
            // Untimed (never so after pass 1): last.
            let best = [legacy, direct].into_iter().flatten().reduce(f32::min);
            (what, best.unwrap_or(0.0) * layers as f32)
        })
        .collect();
    // Stable: equal times keep the keys' order.
    by_time.sort_by(|a, b| b.1.total_cmp(&a.1));
    by_time.into_iter().map(|(what, _)| what).collect()
}

/// A hand-written kernel's check on the device: None before any layer it could run, else passed
/// (`Ok`) or why it was refused. Kept by the backend: the kernel and the device do not change
/// between prepares.
pub(super) type DirectCheck = Option<std::result::Result<(), String>>;

/// Device checks of hand-written kernels, once per backend and key: a build of the fused conv +
/// pool, a layer shape (input → output channels) of the hand-written conv. A key the device
/// disagrees with leaves the others used.
#[derive(Debug)]
pub(super) struct Checks<K>(BTreeMap<K, DirectCheck>);

impl<K: Ord + Copy> Default for Checks<K> {
    fn default() -> Self {
        Checks(BTreeMap::new())
    }
}

impl<K: Ord + Copy> Checks<K> {
    fn of(&mut self, key: K) -> &mut DirectCheck {
        self.0.entry(key).or_default()
    }

    /// Each checked key's outcome, in key order.
    pub fn outcomes(&self) -> impl Iterator<Item = (K, &DirectCheck)> {
        self.0
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(&k, c)| (k, c))
    }

    /// All checked keys together: None when none was checked, Ok when every one passed, else
    /// the failures.
    pub fn overall(&self) -> DirectCheck {
        let failed: Vec<String> = self
            .0
            .values()
            .filter_map(|c| c.as_ref().and_then(|r| r.clone().err()))
            .collect();
        match (self.0.values().any(Option::is_some), failed.is_empty()) {
            (false, _) => None,
            (true, true) => Some(Ok(())),
            (true, false) => Some(Err(failed.join("; "))),
        }
    }
}

/// The fused conv + pool's checks, per build.
pub(super) type PoolChecks = Checks<ConvPoolVariant>;
/// The hand-written conv's checks, per kind, layer shape and build ([`CheckedAs`], stored input
/// channels, output channels, the wgmma build or None for the first conv's kernel): a build the
/// device disagrees with leaves the others used.
pub(super) type DirectChecks = Checks<(CheckedAs, usize, usize, Option<ConvWgBuild>)>;

/// What a hand-written conv's device check covers: FP16 input; E4M3 input (the wgmma conv's
/// FP8 builds); E4M3 input with the 2×2 max-pool (their pooled kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum CheckedAs {
    Half,
    E4m3,
    E4m3Pool,
}

/// The hand-written conv's builds that may run `layer` ([`DirectKernel::candidates`]): not
/// turned off, the layer's shape and the device their own, and each one's device check for
/// layers of that shape passed. A check runs on the first layer of the shape, and its outcome
/// (a refusal's reason) is kept in `checks`.
fn direct_builds(
    direct: DirectUse,
    checks: &mut DirectChecks,
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
) -> Result<Vec<DirectKernel>> {
    let kind = DirectKernel::of(layer, kernels).filter(|_| direct != DirectUse::Off);
    let mut passed = Vec::new();
    for candidate in kind
        .map(|k| k.candidates(layer, kernels))
        .unwrap_or_default()
    {
        let key = (CheckedAs::Half, layer.cin_s, layer.cout, candidate.build());
        let fallback = format!("{} is not used", candidate.name());
        if checked(checks.of(key), &fallback, || {
            conv_direct::check_on_device(dev, kernels, layer, candidate)
        })? {
            passed.push(candidate);
        }
    }
    Ok(passed)
}

/// The wgmma conv's E4M3 builds ([`ConvWgBuild::E4M3`]) that may run `layer`'s FP8 forms
/// (feature stage `stage`; `pool`: with the 2×2 max-pool after it): not turned off, the device
/// runs them, the stage has its packed FP8 filter, and each one's device check (of that kernel)
/// for layers of this shape passed (once per shape and build, kept in `checks`).
#[allow(clippy::too_many_arguments)]
fn fp8_wg_builds(
    direct: DirectUse,
    checks: &mut DirectChecks,
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    state: &Fp8State,
    stage: usize,
    pool: bool,
) -> Result<Vec<ConvWgBuild>> {
    let (Some(wpack), Some(codes)) = (&state.wg_filters[stage], &state.filters[stage]) else {
        return Ok(Vec::new());
    };
    let mut passed = Vec::new();
    let runs = ConvWgBuild::E4M3
        .into_iter()
        .filter(|&b| kernels.runs_conv_wg(b));
    let kind = if pool {
        CheckedAs::E4m3Pool
    } else {
        CheckedAs::E4m3
    };
    for build in runs.filter(|_| direct != DirectUse::Off) {
        let key = (kind, layer.cin_s, layer.cout, Some(build));
        let fallback = format!("the FP8 wgmma conv {build:?} ({kind:?}) is not used");
        if checked(checks.of(key), &fallback, || {
            let io = ((build, wpack), pool);
            conv_direct::check_fp8_on_device(dev, kernels, layer, io, codes)
        })? {
            passed.push(build);
        }
    }
    Ok(passed)
}

/// The fastest of the wgmma conv's E4M3 `builds` (those that passed their checks) and its
/// milliseconds, on `dims` rows of the arena buffers `bufs` (random data), FP16 or (`e4m3_out`)
/// E4M3 out (with `pool`, the pooled kernels), with the quantize pass of its input unless that
/// arrives E4M3 (`input_e4m3`: then quantized once before), as the graph API's FP8 plans are
/// timed. None: no builds.
fn time_wg_fp8(
    dev: &Dev,
    timer: &EventPair,
    (builds, layer): (&[ConvWgBuild], &DevConv),
    mut run: Fp8Run<'_>,
    (dims, input_e4m3, out): ([usize; 3], bool, (bool, bool)),
    bufs: &[CudaSlice<f16>; 2],
) -> Result<Option<(ConvWgBuild, f32)>> {
    let [bx, by] = bufs;
    let x = bx.slice(..dims.iter().product::<usize>() * layer.cin_s);
    if input_e4m3 {
        run.state
            .quantize_input(run.kernels, &dev.stream, run.stage, &x)?;
    }
    let (x8, y) = (ptr(&run.state.x8, &dev.stream), ptr(by, &dev.stream));
    let mut best: Option<(ConvWgBuild, f32)> = None;
    for &build in builds {
        let pooled = if out.1 { " + pool" } else { "" };
        let op = format!(
            "timing the FP8 wgmma conv{pooled} {build:?} (batch {})",
            dims[0]
        );
        let ms = time_launch(dev, timer, &op, || {
            let input = match input_e4m3 {
                true => ConvInput::E4m3(x8),
                false => ConvInput::Half(&x),
            };
            // SAFETY: the arena's buffers hold ≥ rows rows of the stage's input and output
            // (FP16, so an E4M3 output fits too), apart; the FP8 input buffer holds ≥ rows rows
            // of it.
            unsafe { run.execute_wg(dev, (build, layer), input, y, dims, out) }
        })?;
        if best.is_none_or(|b| ms < b.1) {
            best = Some((build, ms));
        }
    }
    Ok(best)
}

/// Whether a hand-written kernel's device check passed, running `run` (None: it matched; else
/// why not) the first time only and keeping its outcome in `check`; a refusal is printed under
/// `SCORECAM_CUDA_VERBOSE` with what happens instead (`fallback`).
fn checked(
    check: &mut DirectCheck,
    fallback: &str,
    run: impl FnOnce() -> Result<Option<String>>,
) -> Result<bool> {
    if check.is_none() {
        *check = Some(match run()? {
            None => Ok(()),
            Some(why) => {
                if verbose() {
                    eprintln!("cuda: {why}; {fallback}");
                }
                Err(why)
            }
        });
    }
    Ok(matches!(check, Some(Ok(()))))
}

/// Milliseconds of the hand-written conv writing `out` on `rows` rows of the arena (random
/// input; median of [`TIMED_RUNS`] after a warm-up), as cuDNN's candidates are timed; the wgmma
/// conv on at most `max_blocks` blocks when given.
#[allow(clippy::too_many_arguments)]
fn time_direct(
    dev: &Dev,
    timer: &EventPair,
    (kernels, kind): (&Kernels, DirectKernel),
    layer: &DevConv,
    dims: [usize; 3],
    out: DirectOut<'_, '_>,
    arena: &TuneArena<'_>,
    max_blocks: Option<u32>,
) -> Result<f32> {
    let [bx, by] = arena.bufs;
    let op = format!("timing the hand-written conv {kind:?} (batch {})", dims[0]);
    time_launch(dev, timer, &op, || {
        // SAFETY: the arena's buffers are apart and hold ≥ rows rows of every stage's input and
        // output; nothing else runs on them during the tuning.
        let xy = (bx, by);
        unsafe { conv_direct::launch(dev, kernels, layer, kind, dims, out, xy, max_blocks) }
    })
}

/// The blocks of a half-grid timing: half the SMs. A persistent kernel that takes about twice
/// as long there is held back by each SM's own work; one that takes much less than twice as
/// long, by something the SMs share (L2 or memory bandwidth). None where the device has too
/// few SMs for the figure to mean anything.
pub(super) fn half_grid(kernels: &Kernels) -> Option<u32> {
    let sms = kernels.sm_count();
    (sms >= 8).then_some(sms / 2)
}

/// Milliseconds of `launch` (median of [`TIMED_RUNS`] after a warm-up).
pub(super) fn time_launch(
    dev: &Dev,
    timer: &EventPair,
    op: &str,
    mut launch: impl FnMut() -> Result<()>,
) -> Result<f32> {
    let mut once = || launch().map(Ok::<(), std::convert::Infallible>);
    let Ok(()) = once()?; // warm-up
    let Ok(ms) = timer.median_ms(dev, op, &mut once)?;
    Ok(ms)
}

/// A 64 → 64 conv tried with the 2×2 max-pool after it in the same kernel
/// ([`conv_direct::launch_pool`]), at the full mask batch.
#[derive(Clone, Debug)]
pub(super) struct FusedPool {
    pub stage: usize,
    /// The batch it was timed at.
    pub rows: usize,
    /// The fastest build and its time, and each timed build's time (the builds the device runs
    /// and passed its check, in [`ConvPoolVariant::ALL`]'s order).
    pub variant: ConvPoolVariant,
    pub ms: f32,
    pub builds_ms: Vec<(ConvPoolVariant, f32)>,
    /// The conv's chosen plan's time and the pool's, apart.
    pub conv_ms: f32,
    pub pool_ms: f32,
    /// Forwards run it: faster than the two apart, or preferred (`SCORECAM_CONV_DIRECT=prefer`).
    pub kept: bool,
}

/// A VGG's first block (conv stage `stage`, the 64 → 64 conv after it, the 2×2 max-pool after
/// that) tried as one kernel ([`conv_direct::launch_block1`]), at `rows` rows (the full mask
/// batch).
#[derive(Clone, Copy, Debug)]
pub(super) struct FusedBlock {
    pub stage: usize,
    pub rows: usize,
    pub ms: f32,
    /// The three stages as the tuning runs them otherwise: the first conv's chosen plan, and the
    /// second conv with its pool (fused where that was kept, else apart).
    pub apart_ms: f32,
    /// Forwards run it: faster than apart, or preferred (`SCORECAM_CONV_DIRECT=prefer`).
    pub kept: bool,
    /// Its time on half the SMs ([`half_grid`]).
    pub half_grid_ms: Option<f32>,
}

/// An FP8 conv tried with the max-pool after it in one kernel (the pooled E4M3 wgmma build), at
/// `rows` rows (the full mask batch), per output format (FP16, E4M3).
#[derive(Clone, Debug)]
pub(super) struct Fp8FusedPool {
    pub stage: usize,
    pub rows: usize,
    pub outs: [Option<Fp8FusedOut>; 2],
}

/// One output format of an [`Fp8FusedPool`]: the fastest build and its time, the conv's FP8 form
/// of that output plus the pool on it apart, and whether forwards may run it (faster, or the
/// hand-written convs preferred).
#[derive(Clone, Copy, Debug)]
pub(super) struct Fp8FusedOut {
    pub build: ConvWgBuild,
    pub ms: f32,
    pub apart_ms: f32,
    pub kept: bool,
}

/// After [`plan_all`]: every post-ReLU conv followed by a max-pool that the fused kernel can run
/// is timed in each build at `rows` rows (the full mask batch) against its chosen plan's time
/// plus the pool's, on the arena `bufs` (random input in the first), and recorded in
/// `plans.fused_pools`; a forward's plan then runs the pair as one step where the FP16 route
/// and its captures allow (`forward_plan.rs`). The kernel's device checks run first, once per
/// backend (`checks`, as for the hand-written first conv): only builds that pass are timed.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_fused_pools(
    dev: &Dev,
    kernels: &Kernels,
    convs: &[Option<DevConv>],
    dims: &[super::StageDims],
    rows: usize,
    (direct, checks): (DirectUse, &mut PoolChecks),
    bufs: &mut [CudaSlice<f16>; 2],
    plans: &mut ConvPlans,
) -> Result<()> {
    if direct == DirectUse::Off {
        return Ok(());
    }
    let timer = EventPair::new(dev)?;
    for (stage, layer) in convs.iter().enumerate() {
        let Some(layer) = layer else { continue };
        let pooled = convs.get(stage + 1).is_some_and(Option::is_none);
        if !pooled || !conv_direct::pool_applies(layer, kernels) {
            continue;
        }
        let chosen = plans
            .choices
            .iter()
            .find(|c| c.stage == stage && c.rows == rows && !c.identity);
        let Some(conv_ms) = chosen.and_then(|c| c.ms) else {
            continue;
        };
        // The builds that passed their check (each one's runs on the first such layer).
        let mut builds = Vec::new();
        for build in conv_direct::pool_builds(layer, kernels) {
            let fallback = format!("the {build:?} build is not used");
            if checked(checks.of(build), &fallback, || {
                conv_direct::check_pool_on_device(dev, kernels, layer, build)
            })? {
                builds.push(build);
            }
        }
        if builds.is_empty() {
            return Ok(());
        }
        let d = dims[stage];
        let pool_ms = time_pool(
            dev,
            &timer,
            kernels,
            (stage + 1, dims[stage + 1]),
            rows,
            bufs,
        )?;
        let [bx, by] = &mut *bufs;
        let mut builds_ms = Vec::new();
        for variant in builds {
            let op = format!("timing the fused conv + pool {variant:?} (batch {rows})");
            let dims = [rows, d.in_h, d.in_w];
            let ms = time_launch(dev, &timer, &op, || {
                // SAFETY: as in `time_direct`.
                unsafe {
                    conv_direct::launch_pool(dev, kernels, layer, variant, dims, (&*bx, &*by), None)
                }
            })?;
            builds_ms.push((variant, ms));
        }
        let (variant, ms, kept) =
            fused_choice(&builds_ms, conv_ms + pool_ms, direct == DirectUse::Prefer);
        if verbose() {
            eprintln!(
                "cuda: conv stage {stage} + max-pool, batch {rows}: fused {variant:?} {ms:.3} ms, \
                 apart {conv_ms:.3} + {pool_ms:.3} ms: {}",
                if kept { "fused" } else { "apart" }
            );
        }
        plans.fused_pools.push(FusedPool {
            stage,
            rows,
            variant,
            ms,
            builds_ms,
            conv_ms,
            pool_ms,
            kept,
        });
    }
    Ok(())
}

/// Milliseconds of the 2×2 max-pool of feature stage `stage` (geometry `d`) on `rows` rows of
/// FP16 values, from the arena's first buffer (random data) into its second.
fn time_pool(
    dev: &Dev,
    timer: &EventPair,
    kernels: &Kernels,
    (stage, d): (usize, StageDims),
    rows: usize,
    bufs: &mut [CudaSlice<f16>; 2],
) -> Result<f32> {
    let [bx, by] = &mut *bufs;
    let (n, m) = (rows * d.in_len(), rows * d.out_len());
    let op = format!("timing the max-pool of stage {stage} (batch {rows})");
    time_launch(dev, timer, &op, || {
        let (x, mut y) = (bx.slice(..n), by.slice_mut(..m));
        kernels.maxpool2(&dev.stream, &x, rows, d.in_h, d.in_w, d.in_c, &mut y)
    })
}

/// After [`plan_fused_pools`]: the first conv stage whose block the whole-first-block kernel
/// can run (a conv of at most 4 real input channels → 64, a 64 → 64 conv, a max-pool) is timed
/// as one kernel at `rows` rows (the full mask batch) on the arena `bufs` against the three
/// stages as planned (the first conv's chosen plan; the second with its pool fused where kept,
/// else its plan plus the pool), and recorded in `plans.fused_block`; a forward's plan then runs
/// the block as one step where its route runs all three FP16 and nothing in it is captured. The
/// kernel's device check runs first, once per backend (`check`).
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_fused_block(
    dev: &Dev,
    kernels: &Kernels,
    convs: &[Option<DevConv>],
    dims: &[StageDims],
    rows: usize,
    (direct, check): (DirectUse, &mut DirectCheck),
    bufs: &mut [CudaSlice<f16>; 2],
    plans: &mut ConvPlans,
) -> Result<()> {
    if direct == DirectUse::Off {
        return Ok(());
    }
    let block = (0..convs.len().saturating_sub(2)).find_map(|stage| {
        let (first, second) = (convs[stage].as_ref()?, convs[stage + 1].as_ref()?);
        let pooled = convs[stage + 2].is_none();
        (pooled && conv_direct::block1_applies(first, second, kernels))
            .then_some((stage, [first, second]))
    });
    let Some((stage, layers)) = block else {
        return Ok(());
    };
    let chosen_ms = |stage: usize| {
        plans
            .choices
            .iter()
            .find(|c| c.stage == stage && c.rows == rows && !c.identity)
            .and_then(|c| c.ms)
    };
    let (Some(first_ms), Some(second_ms)) = (chosen_ms(stage), chosen_ms(stage + 1)) else {
        return Ok(());
    };
    let fallback = "the first block runs as its convs and pool";
    if !checked(check, fallback, || {
        conv_direct::check_block1_on_device(dev, kernels, layers)
    })? {
        return Ok(());
    }
    let timer = EventPair::new(dev)?;
    let d = dims[stage];
    let pooled = plans.fused_pools.iter().find(|f| f.stage == stage + 1);
    let rest_ms = match pooled {
        Some(f) if f.kept => f.ms,
        Some(f) => f.conv_ms + f.pool_ms,
        None => {
            let pool = (stage + 2, dims[stage + 2]);
            second_ms + time_pool(dev, &timer, kernels, pool, rows, bufs)?
        }
    };
    let [bx, by] = &mut *bufs;
    let op = format!("timing the whole first block (batch {rows})");
    let dims3 = [rows, d.in_h, d.in_w];
    let ms = time_launch(dev, &timer, &op, || {
        // SAFETY: as in `time_direct`.
        unsafe { conv_direct::launch_block1(dev, kernels, layers, dims3, (&*bx, &*by), None) }
    })?;
    let half_grid_ms = match half_grid(kernels) {
        Some(blocks) => Some(time_launch(dev, &timer, &op, || {
            // SAFETY: as above.
            let xy = (&*bx, &*by);
            unsafe { conv_direct::launch_block1(dev, kernels, layers, dims3, xy, Some(blocks)) }
        })?),
        None => None,
    };
    let apart_ms = first_ms + rest_ms;
    let kept = direct == DirectUse::Prefer || ms < apart_ms;
    if verbose() {
        eprintln!(
            "cuda: first block (stages {stage}–{}), batch {rows}: one kernel {ms:.3} ms, apart \
             {apart_ms:.3} ms: {}",
            stage + 2,
            if kept { "one kernel" } else { "apart" }
        );
    }
    plans.fused_block = Some(FusedBlock {
        stage,
        rows,
        ms,
        apart_ms,
        kept,
        half_grid_ms,
    });
    Ok(())
}

/// The fused conv + pool's fastest build of `builds_ms` (at least one; the first on a tie), its
/// time, and whether forwards use it: strictly faster than the conv and the pool apart
/// (`apart_ms`), or `prefer`red.
fn fused_choice(
    builds_ms: &[(ConvPoolVariant, f32)],
    apart_ms: f32,
    prefer: bool,
) -> (ConvPoolVariant, f32, bool) {
    let &(variant, ms) = builds_ms
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("at least one build");
    (variant, ms, prefer || ms < apart_ms)
}

/// After [`plan_all`] and [`plan_fused_pools`], under `--precision fp8`: the passes a route
/// weighs besides the convs, timed at every masked-forward batch size `rows` on the arena `bufs`
/// (random data) — each FP8 layer's input quantized (FP16 → E4M3) and dequantized (E4M3 →
/// FP16), each max-pool on FP16 values and on E4M3 codes — into the keys' route costs (and their
/// plan choices, for the report) and `plans.pool_ms`; then, at the full mask batch `rows_max`,
/// each FP8 conv before a pool in the pooled E4M3 builds that passed their checks, against its
/// FP8 form and the pool apart (`plans.fp8_fused_pools`). `next_fp8`: per stage, the next conv
/// that may run FP8 (whose multiplier an E4M3 output is at).
#[allow(clippy::too_many_arguments)]
pub(super) fn time_fp8_passes(
    dev: &Dev,
    kernels: &Kernels,
    (convs, dims): (&[Option<DevConv>], &[StageDims]),
    (rows, rows_max): (&[usize], usize),
    (direct, checks): (DirectUse, &mut DirectChecks),
    (state, next_fp8): (&mut Fp8State, &[Option<usize>]),
    bufs: &mut [CudaSlice<f16>; 2],
    plans: &mut ConvPlans,
) -> Result<()> {
    let timer = EventPair::new(dev)?;
    time_conversions(
        dev,
        &timer,
        kernels,
        (convs, dims),
        rows,
        state,
        bufs,
        plans,
    )?;
    for (stage, layer) in convs.iter().enumerate() {
        let Some(layer) = layer else { continue };
        let key = ConvKey {
            stage,
            rows: rows_max,
            identity: false,
        };
        // (Pool timings exist for pool stages only: a conv followed by one.)
        let (Some(costs), Some(&pool_ms)) = (
            plans.fp8_costs.get(&key),
            plans.pool_ms.get(&(stage + 1, rows_max)),
        ) else {
            continue;
        };
        let forms = [costs.fp8, costs.fp8_e4m3_out];
        if forms.iter().all(Option::is_none) {
            continue;
        }
        let builds = fp8_wg_builds(direct, checks, dev, kernels, layer, state, stage, true)?;
        if builds.is_empty() {
            continue;
        }
        let d = dims[stage];
        let mut outs = [None; 2];
        for (i, out) in outs.iter_mut().enumerate() {
            let Some(form_ms) = forms[i] else { continue };
            let run = Fp8Run {
                kernels,
                state: &mut *state,
                stage,
                next: next_fp8.get(stage).copied().flatten(),
            };
            let shape = ([rows_max, d.in_h, d.in_w], true, (i == 1, true));
            let timed = time_wg_fp8(dev, &timer, (&builds, layer), run, shape, bufs)?;
            if let Some((build, ms)) = timed {
                let apart_ms = form_ms + pool_ms[i];
                let kept = ms < apart_ms || direct == DirectUse::Prefer;
                *out = Some(Fp8FusedOut {
                    build,
                    ms,
                    apart_ms,
                    kept,
                });
            }
        }
        plans.fp8_fused_pools.push(Fp8FusedPool {
            stage,
            rows: rows_max,
            outs,
        });
    }
    Ok(())
}

/// [`time_fp8_passes`]'s conversion passes and pools.
#[allow(clippy::too_many_arguments)]
fn time_conversions(
    dev: &Dev,
    timer: &EventPair,
    kernels: &Kernels,
    (convs, dims): (&[Option<DevConv>], &[StageDims]),
    rows: &[usize],
    state: &mut Fp8State,
    bufs: &mut [CudaSlice<f16>; 2],
    plans: &mut ConvPlans,
) -> Result<()> {
    for &r in rows {
        for (stage, d) in dims.iter().enumerate() {
            if convs[stage].is_none() {
                // The pool's input is the conv's output before it: the arena holds it either way.
                let f16_ms = time_pool(dev, timer, kernels, (stage, *d), r, bufs)?;
                let [bx, by] = &mut *bufs;
                let (n, m) = (r * d.in_len(), r * d.out_len());
                let op = format!("timing the max-pool of stage {stage} on E4M3 (batch {r})");
                let e4m3_ms = time_launch(dev, timer, &op, || {
                    let (x, mut y) = (bx.slice(..n), by.slice_mut(..m));
                    // SAFETY: the first n (m) bytes of buffers of n (m) FP16 values; any byte is
                    // a valid u8.
                    let (x, mut y) = unsafe { (x.transmute::<u8>(n), y.transmute_mut::<u8>(m)) };
                    let (Some(x), Some(y)) = (x, y.as_mut()) else {
                        return Err(Error::Invalid(format!("{op}: the arena is too small")));
                    };
                    kernels.maxpool2_e4m3(&dev.stream, &x, r, d.in_h, d.in_w, d.in_c, y)
                })?;
                plans.pool_ms.insert((stage, r), [f16_ms, e4m3_ms]);
                continue;
            }
            let [bx, by] = &mut *bufs;
            let key = ConvKey {
                stage,
                rows: r,
                identity: false,
            };
            if state.filters[stage].is_none() || !plans.fp8_costs.contains_key(&key) {
                continue;
            }
            let n = r * d.in_len();
            let op = format!("timing the FP8 conversion passes of stage {stage} (batch {r})");
            let quantize = time_launch(dev, timer, &op, || {
                state.quantize_input(kernels, &dev.stream, stage, &bx.slice(..n))
            })?;
            let dequantize = time_launch(dev, timer, &op, || {
                let codes = state.x8.slice(..n);
                let mut y = by.slice_mut(..n);
                let m = state.multiplier(stage);
                kernels.dequantize_e4m3(&dev.stream, &codes, n, &m, &mut y)
            })?;
            let convert = [quantize, dequantize];
            if let Some(c) = plans.fp8_costs.get_mut(&key) {
                c.convert = Some(convert);
            }
            for c in plans.choices.iter_mut() {
                if (c.stage, c.rows, c.identity) == (stage, r, false) {
                    c.convert_ms = Some(convert);
                }
            }
        }
    }
    Ok(())
}

/// Build the graph of `rows` rows of `layer` (stage geometry `d`) in `form` — conv+bias+ReLU in
/// FP16, or an FP8 one (or one with an E4M3 output) with `fp8`: its run and whether its input
/// arrives E4M3 — and time its plans (see [`time_plans`]). An FP8 plan is timed with the
/// quantization of its input unless that input arrives E4M3 (then quantized once before). `None` when the graph API offers nothing for it (the FP16 legacy
/// path stays).
#[allow(clippy::too_many_arguments)]
fn time_graph_plans(
    dev: &Dev,
    dnn: &cudnn::Handle,
    timer: &EventPair,
    layer: &DevConv,
    (d, rows): (super::StageDims, usize),
    arena: &mut TuneArena<'_>,
    (ws_limit, deadline): (usize, Instant),
    fp8: Option<(Fp8Run<'_>, bool)>,
    form: GraphForm,
    (search, cache): (&mut PlanSearch, &mut PlanCache),
) -> Result<Option<(Rc<GraphConv>, f32)>> {
    let (mut fp8, input_e4m3) = match fp8 {
        Some((run, e4m3)) => (Some(run), e4m3),
        None => (None, false),
    };
    if (form.fp8 || form.e4m3_out) != fp8.is_some() {
        return Err(Error::Invalid(format!(
            "timing {form:?} graph plans {} FP8 state",
            if fp8.is_some() { "with" } else { "without" }
        )));
    }
    let dims = [rows, layer.cin_s, layer.cout, d.in_h, d.in_w];
    // The plan a complete search of this graph chose before, on this device and cuDNN.
    let key = plan_cache::graph_key(&format!("{form:?}"), dims);
    let remembered = cache.get(&key);
    let build = |search: &mut PlanSearch| match ConvGraph::conv_bias_relu(dnn, dims, form) {
        Ok(g) => {
            search.graphs += 1;
            Some(g)
        }
        Err(e) => {
            search.graph_failed += 1;
            search.error(format!(
                "building the {form:?} graph {dims:?} (rows, cin, cout, h, w): {e}"
            ));
            None
        }
    };
    let Some(graph) = build(search) else {
        return Ok(None);
    };
    let n = rows * d.in_len();
    // An input that arrives E4M3: the arena's, quantized once.
    let pre_quantized = match fp8.as_mut() {
        Some(run) if input_e4m3 => {
            let x = arena.bufs[0].slice(..n);
            run.state
                .quantize_input(run.kernels, &dev.stream, run.stage, &x)?;
            Some(ptr(&run.state.x8, &dev.stream))
        }
        _ => None,
    };
    let op = format!("timing {form:?} graph-API plans (batch {rows})");
    let mut exec = |plan: &GraphPlan, [bx, by]: &[CudaSlice<f16>; 2], ws: &CudaSlice<u8>| {
        // SAFETY: the arena buffers hold ≥ rows rows of this stage's input and output (FP16,
        // so an E4M3 output of the same rows fits too); the workspace holds ≥ plan.ws bytes;
        // FP8 runs only on capable stages (with filters), the FP8 input buffer holds ≥ rows
        // rows of their inputs.
        unsafe {
            match fp8.as_mut() {
                Some(run) => {
                    let x = bx.slice(..n);
                    let input = match pre_quantized {
                        Some(x8) => ConvInput::E4m3(x8),
                        None => ConvInput::Half(&x),
                    };
                    let y = ptr(by, &dev.stream);
                    run.execute(dev, dnn, plan, layer, input, y, ws)
                }
                None => Ok(plan.execute(dnn, conv_ptrs(dev, layer, bx, by, ws).into())),
            }
        }
    };
    let limits = (ws_limit, deadline);
    // The remembered configuration alone; should it no longer give a plan that runs, forget it
    // (unless the budget or the workspace stopped it: neither says the plan is bad) and search
    // again.
    let graph = match remembered {
        Some(Choice { fallback, pos, .. }) => {
            let only = Some((fallback, pos));
            let stops = (search.skipped, search.over_workspace);
            let found = time_plans(
                dev, dnn, timer, graph, arena, limits, &op, search, only, &mut exec,
            )?;
            if found.is_some() {
                search.cached += 1;
                return Ok(found);
            }
            if search.skipped != stops.0 {
                return Ok(None);
            }
            if search.over_workspace == stops.1 {
                cache.forget(&key);
            }
            match build(search) {
                Some(g) => g,
                None => return Ok(None),
            }
        }
        None => graph,
    };
    let before = (search.skipped, search.over_workspace, search.execute_failed);
    let found = time_plans(
        dev, dnn, timer, graph, arena, limits, &op, search, None, &mut exec,
    )?;
    // Remember the winner of a complete search: not one the budget cut short, nor one where a
    // plan was passed over for workspace or failed to run (either may differ next time).
    let complete = search.skipped == before.0;
    let clean = (search.over_workspace, search.execute_failed) == (before.1, before.2);
    if let (Some((g, ms)), true) = (&found, complete && clean) {
        let (fallback, pos) = g.plan.origin;
        cache.put(
            key,
            Choice {
                fallback,
                pos,
                ms: *ms,
            },
        );
    }
    Ok(found)
}

/// Time every plan cuDNN finalizes for `graph` (before `deadline`; with `only`, just that
/// configuration, see [`ConvGraph::plans`]) with `exec` on the arena (a warm-up that also tells
/// whether it runs, then the median of [`TIMED_RUNS`]) and keep the fastest. The arena's workspace grows (up to `ws_limit`) for a plan that needs more.
#[allow(clippy::too_many_arguments)]
fn time_plans(
    dev: &Dev,
    dnn: &cudnn::Handle,
    timer: &EventPair,
    graph: ConvGraph,
    arena: &mut TuneArena<'_>,
    (ws_limit, deadline): (usize, Instant),
    op: &str,
    search: &mut PlanSearch,
    only: Option<(bool, usize)>,
    mut exec: impl FnMut(
        &GraphPlan,
        &[CudaSlice<f16>; 2],
        &CudaSlice<u8>,
    ) -> Result<std::result::Result<(), cudarc::cudnn::CudnnError>>,
) -> Result<Option<(Rc<GraphConv>, f32)>> {
    let mut best: Option<(GraphPlan, f32)> = None;
    for plan in graph.plans(dnn, ws_limit, search, deadline, only) {
        match grow_workspace(dev, arena.workspace, plan.ws) {
            Ok(()) => {}
            // An optional plan: one whose workspace does not fit is passed over.
            Err(Error::OutOfMemory(_)) => {
                search.over_workspace += 1;
                continue;
            }
            Err(e) => return Err(e),
        }
        let (bufs, ws) = (arena.bufs, &*arena.workspace);
        let mut once = || exec(&plan, bufs, ws);
        let ran = match once()? {
            Ok(()) => timer.median_ms(dev, op, &mut once)?,
            Err(e) => Err(e),
        };
        let ms = match ran {
            Ok(ms) => ms,
            Err(e) => {
                search.execute_failed += 1;
                let name = config_name(plan.origin);
                search.error(format!("executing engine {name}: {e}"));
                continue;
            }
        };
        search.timed += 1;
        if best.as_ref().is_none_or(|b| ms < b.1) {
            best = Some((plan, ms));
        }
    }
    // An execution error may be asynchronous: surface it here.
    dev.stream.synchronize().map_err(|e| drv_err(op, e))?;
    Ok(best.map(|(plan, ms)| {
        (
            Rc::new(GraphConv {
                _graph: graph,
                plan,
            }),
            ms,
        )
    }))
}

/// The legacy descriptors of `key` (input, output, convolution) and the name of its planning
/// step for errors.
fn key_descriptors(
    layer: &DevConv,
    d: super::StageDims,
    key: ConvKey,
) -> Result<(String, (TensorDesc, TensorDesc, ConvDesc))> {
    let op = format!(
        "planning conv (features stage {}, batch {})",
        key.stage, key.rows
    );
    let descs = cudnn::descriptors(key.rows, layer.cin_s, layer.cout, d.in_h, d.in_w)
        .map_err(|e| dnn_err(&op, e))?;
    Ok((op, descs))
}

/// Make the cuDNN workspace hold at least `need` bytes. The new one is allocated before the old
/// is freed, so a failure (out of memory) leaves the old one, and the plans sized for it, intact.
fn grow_workspace(dev: &Dev, ws: &mut CudaSlice<u8>, need: usize) -> Result<()> {
    if need > ws.len() {
        *ws = dev.alloc::<u8>(need, "cuDNN workspace")?;
    }
    Ok(())
}

/// The candidates that get timed: cuDNN's top `take` fused ones, then (only used if no fused
/// one launches) the top `take` unfused ones.
fn timed_subset(cands: &[Candidate], take: usize) -> impl Iterator<Item = &Candidate> {
    cands
        .iter()
        .filter(|c| c.fused)
        .take(take)
        .chain(cands.iter().filter(|c| !c.fused).take(take))
}

/// Two events for timing one launch.
pub(super) struct EventPair {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
}

impl EventPair {
    pub fn new(dev: &Dev) -> Result<Self> {
        Ok(EventPair {
            start: new_event(dev)?,
            end: new_event(dev)?,
        })
    }

    /// Milliseconds of the work `f` enqueues (waits for it).
    pub fn time<E>(
        &self,
        dev: &Dev,
        op: &str,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<f32, E>> {
        self.start
            .record(&dev.stream)
            .map_err(|e| Error::cuda(op, e))?;
        if let Err(e) = f() {
            return Ok(Err(e));
        }
        self.end
            .record(&dev.stream)
            .map_err(|e| Error::cuda(op, e))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| drv_err(op, e))?;
        Ok(Ok(ms))
    }
}

impl EventPair {
    /// Milliseconds per launch of `f`: the median of [`TIMED_RUNS`] timed runs, each of as many
    /// launches back to back as take [`TIMED_RUN_MIN_MS`] (sized by one launch first). A single
    /// launch on an idle GPU would also time its host side — a graph plan's variant pack, an FP8
    /// plan's quantize launch — which the CUDA graphs of the masked forwards do not pay, and
    /// which for a small layer is a fair part of its time. `f`'s outer error is returned as is;
    /// its inner one, the launch refusing, ends the timing.
    pub fn median_ms<E>(
        &self,
        dev: &Dev,
        op: &str,
        mut f: impl FnMut() -> Result<std::result::Result<(), E>>,
    ) -> Result<std::result::Result<f32, E>> {
        let single = match self.launches(dev, op, 1, &mut f)? {
            Ok(ms) => ms,
            Err(e) => return Ok(Err(e)),
        };
        let reps = launches_per_run(single);
        let mut runs = Vec::with_capacity(TIMED_RUNS);
        for _ in 0..TIMED_RUNS {
            match self.launches(dev, op, reps, &mut f)? {
                Ok(ms) => runs.push(ms / reps as f32),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(median(runs)))
    }

    /// Milliseconds of `reps` launches of `f`, back to back.
    fn launches<E>(
        &self,
        dev: &Dev,
        op: &str,
        reps: usize,
        f: &mut impl FnMut() -> Result<std::result::Result<(), E>>,
    ) -> Result<std::result::Result<f32, E>> {
        let mut outer = None;
        let timed = self.time(dev, op, || {
            for _ in 0..reps {
                match f() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => {
                        outer = Some(e);
                        return Ok(());
                    }
                }
            }
            Ok(())
        })?;
        match outer {
            Some(e) => Err(e),
            None => Ok(timed),
        }
    }
}

/// A timed run lasts at least this long (see [`EventPair::median_ms`]).
const TIMED_RUN_MIN_MS: f32 = 0.5;
/// The most launches in one timed run.
const MAX_LAUNCHES_PER_RUN: usize = 16;

/// Launches per timed run, from one launch's milliseconds.
fn launches_per_run(single_ms: f32) -> usize {
    if single_ms.is_nan() || single_ms <= 0.0 {
        return MAX_LAUNCHES_PER_RUN;
    }
    let n = (TIMED_RUN_MIN_MS / single_ms).ceil();
    (n.min(MAX_LAUNCHES_PER_RUN as f32) as usize).max(1)
}

/// Time the candidates worth timing on the arena (random data): a warm-up launch (which also
/// tells whether cuDNN accepts it), then [`TIMED_RUNS`] timed ones; the fastest median wins.
/// Fused candidates first; unfused ones only when no fused one launches.
#[allow(clippy::too_many_arguments)]
fn time_candidates(
    dev: &Dev,
    dnn: &cudnn::Handle,
    timer: &EventPair,
    (cands, take): (&[Candidate], usize),
    (xd, yd, cd): (&TensorDesc, &TensorDesc, &ConvDesc),
    act: &ActDesc,
    layer: &DevConv,
    arena: &TuneArena<'_>,
    op: &str,
) -> Result<(Candidate, Option<f32>, usize)> {
    let [bx, by] = arena.bufs;
    let p = conv_ptrs(dev, layer, bx, by, arena.workspace);
    let mut best: Option<(f32, Candidate)> = None;
    let mut last_err = None;
    let mut timed = 0;
    for fused in [true, false] {
        for &c in timed_subset(cands, take).filter(|c| c.fused == fused) {
            // SAFETY: the arena buffers hold rows_max ≥ rows rows of every stage's input and
            // output; the workspace holds ≥ c.ws bytes (grown to the timed candidates' need).
            let launch =
                || unsafe { cudnn::launch(dnn, xd, &layer.wdesc, cd, yd, &layer.bdesc, act, c, p) };
            if let Err(e) = launch() {
                last_err = Some(e);
                continue;
            }
            let ms = match timer.median_ms(dev, op, || Ok(launch()))? {
                Ok(ms) => ms,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            timed += 1;
            if best.is_none_or(|(t, _)| ms < t) {
                best = Some((ms, c));
            }
        }
        if best.is_some() {
            break;
        }
    }
    // A launch error may be asynchronous (e.g. a kernel fault): surface it here.
    dev.stream.synchronize().map_err(|e| drv_err(op, e))?;
    match best {
        Some((ms, c)) => Ok((c, Some(ms), timed)),
        None => Err(match last_err {
            Some(e) => dnn_err(op, e),
            None => Error::cuda(op, "cuDNN offers no forward algorithm for this convolution"),
        }),
    }
}

pub(super) fn conv_ptrs<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
    dev: &Dev,
    layer: &DevConv,
    x: &X,
    y: &Y,
    ws: &CudaSlice<u8>,
) -> ConvPtrs {
    let s = &dev.stream;
    ConvPtrs {
        x: ptr(x, s),
        w: ptr(&layer.filter, s),
        bias: ptr(&layer.bias, s),
        y: ptr(y, s),
        ws: ptr(ws, s),
        ws_len: ws.len(),
    }
}

/// An FP16 graph-API execution uses the legacy launch's addresses (and no descale).
impl From<ConvPtrs> for GraphPtrs {
    fn from(p: ConvPtrs) -> GraphPtrs {
        GraphPtrs {
            x: p.x,
            w: p.w,
            bias: p.bias,
            y: p.y,
            ws: p.ws,
            descale: 0,
            scale_y: 0,
        }
    }
}

/// Everything one conv launch needs besides its data.
pub(super) struct ConvRun<'a> {
    pub dev: &'a Dev,
    pub dnn: &'a cudnn::Handle,
    pub kernels: &'a Kernels,
    pub plans: &'a mut ConvPlans,
    pub workspace: &'a mut CudaSlice<u8>,
    pub act: &'a ActDesc,
    /// The FP8 state when this forward may run FP8 plans (scales measured, not a base forward).
    pub fp8: Option<&'a mut Fp8State>,
}

impl ConvRun<'_> {
    /// Run conv stage `key.stage` on `key.rows` rows of `x` into `y` with the plan made at
    /// prepare, in FP8 as `route` says (an E4M3 output in the first bytes of `y`); a key nobody
    /// planned is planned now (counted in `built_on_first_use`).
    pub fn run(
        &mut self,
        layer: &DevConv,
        key: ConvKey,
        d: super::StageDims,
        x: ConvInput<'_, '_>,
        y: &mut CudaViewMut<'_, f16>,
        route: StageRoute,
    ) -> Result<()> {
        // Named only when an error needs it: this runs for every layer of every batch.
        let op = || format!("conv (features stage {}, batch {})", key.stage, key.rows);
        if !route.fp8 && route.e4m3_out && self.plans.direct_e4m3.contains(&key) {
            let (Some(state), ConvInput::Half(x), Some(next)) =
                (self.fp8.as_deref(), &x, route.next)
            else {
                return Err(Error::Invalid(format!(
                    "{}: an E4M3 output needs the FP8 scales, an FP16 input and a next FP8 conv",
                    op()
                )));
            };
            let dims = [key.rows, d.in_h, d.in_w];
            let m = state.multiplier(next);
            // Only the first conv's kernel writes E4M3 (direct_e4m3 holds its keys only).
            let kind = DirectKernel::Cin8;
            // SAFETY: x holds rows·in_len FP16 values and y rows·out_len bytes (the forward
            // plan's spans, checked against the buffers), apart from each other.
            return unsafe {
                conv_direct::launch(
                    self.dev,
                    self.kernels,
                    layer,
                    kind,
                    dims,
                    DirectOut::E4m3(&m),
                    (*x, &*y),
                    None,
                )
            };
        }
        if route.fp8 || route.e4m3_out {
            let plans = match (route.fp8, route.e4m3_out) {
                (true, true) => &self.plans.fp8_e4m3,
                (true, false) => &self.plans.fp8,
                (false, _) => &self.plans.fp16_e4m3,
            };
            let (Some(state), Some(engine)) = (self.fp8.as_deref_mut(), plans.get(&key)) else {
                return Err(Error::Invalid(format!(
                    "{}: routed to FP8 or an E4M3 output without such a plan",
                    op()
                )));
            };
            let mut run = Fp8Run {
                kernels: self.kernels,
                state,
                stage: key.stage,
                next: route.next,
            };
            let y = ptr(y, &self.dev.stream);
            // SAFETY: x holds rows·in_len values and y rows·out_len in the plan's types (the
            // forward plan's spans, checked against the buffers); the workspace was sized at
            // prepare for every chosen plan; FP8 plans exist only for capable stages.
            return match engine {
                Fp8Engine::Graph(g) => unsafe {
                    run.execute(self.dev, self.dnn, &g.plan, layer, x, y, self.workspace)
                }?
                .map_err(|e| dnn_err(&op(), e)),
                Fp8Engine::Wg(build) if route.fp8 => unsafe {
                    let dims = [key.rows, d.in_h, d.in_w];
                    let out = (route.e4m3_out, false);
                    run.execute_wg(self.dev, (*build, layer), x, y, dims, out)
                },
                Fp8Engine::Wg(_) => Err(Error::Invalid(format!(
                    "{}: the FP8 wgmma conv routed to an FP16 form",
                    op()
                ))),
            };
        }
        let ConvInput::Half(x) = x else {
            return Err(Error::Invalid(format!(
                "{}: an FP16 plan given E4M3 input",
                op()
            )));
        };
        if !self.plans.plans.contains_key(&key) {
            self.plan_on_first_use(layer, key, d, x, y)?;
        }
        let p = conv_ptrs(self.dev, layer, x, y, self.workspace);
        match &self.plans.plans[&key] {
            Planned::Legacy(plan) => {
                // SAFETY: the caller checked x holds ≥ rows·in_len and y ≥ rows·out_len elements;
                // the plan's candidate needs ≤ the workspace, which never shrinks below a live
                // plan's need.
                unsafe {
                    cudnn::launch(
                        self.dnn,
                        &plan.x,
                        &layer.wdesc,
                        &plan.conv,
                        &plan.y,
                        &layer.bdesc,
                        self.act,
                        plan.choice,
                        p,
                    )
                }
                .map_err(|e| dnn_err(&op(), e))?;
                if !plan.choice.fused {
                    add_bias_act(self.dev, self.kernels, layer, d, key.rows, key.identity, y)?;
                }
            }
            Planned::Graph(g) => {
                // SAFETY: as above; graph plans are made for post-ReLU keys only, with the
                // workspace sized for them at prepare.
                unsafe { g.plan.execute(self.dnn, p.into()) }.map_err(|e| dnn_err(&op(), e))?;
            }
            Planned::Direct(kind) => {
                let dims = [key.rows, d.in_h, d.in_w];
                // SAFETY: as above; y is this layer's output span, apart from x.
                let out = DirectOut::Half {
                    identity: key.identity,
                };
                let (dev, kernels) = (self.dev, self.kernels);
                let xy = (x, &*y);
                unsafe { conv_direct::launch(dev, kernels, layer, *kind, dims, out, xy, None) }?;
            }
        }
        Ok(())
    }

    /// The slow path: cuDNN's candidates in ranking order until one launches. A candidate whose
    /// workspace cannot be allocated is skipped for the next (smaller) one rather than failing
    /// the run; out of memory is returned only when none fits.
    fn plan_on_first_use(
        &mut self,
        layer: &DevConv,
        key: ConvKey,
        d: super::StageDims,
        x: &CudaView<'_, f16>,
        y: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let op = format!("conv (features stage {}, batch {})", key.stage, key.rows);
        let (xd, yd, cd) = cudnn::descriptors(key.rows, layer.cin_s, layer.cout, d.in_h, d.in_w)
            .map_err(|e| dnn_err(&op, e))?;
        let cap = ws_cap(self.dev)?.max(self.workspace.len());
        let cands = cudnn::candidates(self.dnn, &xd, &layer.wdesc, &cd, &yd, key.identity, cap)
            .map_err(|e| dnn_err(&op, e))?;
        let mut last_err: Option<Error> = None;
        for c in cands {
            match grow_workspace(self.dev, self.workspace, c.ws) {
                Ok(()) => {}
                Err(e @ Error::OutOfMemory(_)) => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let p = conv_ptrs(self.dev, layer, x, y, self.workspace);
            // SAFETY: as in `run`; the workspace holds ≥ c.ws bytes.
            let r = unsafe {
                cudnn::launch(
                    self.dnn,
                    &xd,
                    &layer.wdesc,
                    &cd,
                    &yd,
                    &layer.bdesc,
                    self.act,
                    c,
                    p,
                )
            };
            match r {
                Ok(()) => {
                    if verbose() {
                        eprintln!(
                            "cuda: conv stage {} batch {} planned on first use: {}",
                            key.stage,
                            key.rows,
                            candidate_name(&c)
                        );
                    }
                    self.plans.built_on_first_use += 1;
                    self.plans.choices.push(PlanChoice {
                        stage: key.stage,
                        rows: key.rows,
                        identity: key.identity,
                        algo: candidate_name(&c),
                        workspace: c.ws,
                        ms: None,
                        timed: 0,
                        legacy_ms: None,
                        graph_ms: None,
                        direct_ms: None,
                        direct_half_grid_ms: None,
                        fp8_ms: None,
                        fp8: false,
                        e4m3_out_ms: None,
                        direct_e4m3_ms: None,
                        e4m3_out: false,
                        convert_ms: None,
                        fp8_algo: None,
                        fp8_half_algo: None,
                    });
                    self.plans.plans.insert(
                        key,
                        Planned::Legacy(ConvPlan {
                            x: xd,
                            y: yd,
                            conv: cd,
                            choice: c,
                        }),
                    );
                    // The launch above ran the convolution; `run` launches again (same result:
                    // the output is overwritten, not accumulated).
                    return Ok(());
                }
                Err(e) => last_err = Some(dnn_err(&op, e)),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            gpu_oom(format!(
                "{op}: no cuDNN algorithm fits the workspace memory available"
            ))
        }))
    }
}

/// The unfused path's epilogue: `y += bias` per channel, then ReLU unless `identity`.
fn add_bias_act(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    d: super::StageDims,
    n: usize,
    identity: bool,
    y: &mut CudaViewMut<'_, f16>,
) -> Result<()> {
    let rows = n * d.out_h * d.out_w;
    kernels.bias_act_f16(
        &dev.stream,
        &mut y.slice_mut(..rows * layer.cout),
        &layer.bias.as_view(),
        rows,
        layer.cout,
        !identity,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_pool_is_kept_only_when_faster_than_the_two_apart() {
        use ConvPoolVariant::{Wg, W4, W8};
        let two = |a, b| [(W4, a), (W8, b)];
        assert_eq!(fused_choice(&two(1.5, 1.2), 2.0, false), (W8, 1.2, true));
        assert_eq!(fused_choice(&two(1.1, 1.2), 2.0, false), (W4, 1.1, true));
        assert_eq!(
            fused_choice(&two(1.2, 1.2), 2.0, false),
            (W4, 1.2, true),
            "a tie: the first"
        );
        assert_eq!(fused_choice(&two(2.5, 2.1), 2.0, false), (W8, 2.1, false));
        assert!(
            !fused_choice(&two(2.0, 2.0), 2.0, false).2,
            "equal is not faster"
        );
        assert_eq!(
            fused_choice(&two(2.5, 2.1), 2.0, true),
            (W8, 2.1, true),
            "preferred"
        );
        // The wgmma build competes where it ran; alone (its check passed, the others' did not).
        let three = [(W4, 1.5), (W8, 1.4), (Wg, 1.1)];
        assert_eq!(fused_choice(&three, 2.0, false), (Wg, 1.1, true));
        assert_eq!(fused_choice(&[(Wg, 2.2)], 2.0, false), (Wg, 2.2, false));
    }

    #[test]
    fn the_graph_api_tries_the_costliest_shapes_first_and_not_where_the_direct_conv_won() {
        // (name, layers of the shape, legacy ms, hand-written ms), in key order.
        let shapes = vec![
            ("conv1_1", 1, Some(1.85), Some(0.5)),
            ("conv1_2", 1, Some(2.0), None),
            ("conv2_1", 1, Some(0.89), None),
            ("conv3_2", 2, Some(1.38), None),
            ("conv5", 3, Some(0.37), None),
            ("untimed", 1, None, None),
            ("close", 1, Some(1.0), Some(0.6)),
        ];
        assert_eq!(
            graph_search_order(shapes.clone(), false),
            ["conv3_2", "conv1_2", "conv5", "conv2_1", "close", "untimed"]
        );
        // Preferred (tests): every shape, the direct conv's too.
        let all = graph_search_order(shapes, true);
        assert_eq!(all.len(), 7);
        assert_eq!(all[..2], ["conv3_2", "conv1_2"]);
    }

    #[test]
    fn the_fastest_engine_is_kept_and_a_preferred_one_wherever_it_runs() {
        use Engine::*;
        let pick = |ms: [Option<f32>; 3]| pick_engine(ms, false, false);
        assert_eq!(pick([Some(2.0), Some(1.7), Some(0.6)]), Direct);
        assert_eq!(pick([Some(2.0), Some(1.7), Some(1.9)]), Graph);
        assert_eq!(pick([Some(1.0), Some(1.7), Some(1.9)]), Legacy);
        assert_eq!(pick([Some(2.0), None, Some(1.9)]), Direct);
        // Ties keep the legacy API (then the graph API).
        assert_eq!(pick([Some(1.0), Some(1.0), Some(1.0)]), Legacy);
        assert_eq!(pick([Some(2.0), Some(1.0), Some(1.0)]), Graph);
        assert_eq!(pick([None, None, None]), Legacy);
        // Preferences (tests of a path) win wherever their engine runs; the direct one first.
        let fast = [Some(0.1), Some(5.0), Some(9.0)];
        assert_eq!(pick_engine(fast, true, false), Graph);
        assert_eq!(pick_engine(fast, false, true), Direct);
        assert_eq!(pick_engine(fast, true, true), Direct);
        assert_eq!(pick_engine([Some(0.1), Some(5.0), None], true, true), Graph);
        assert_eq!(pick_engine([Some(0.1), None, None], true, true), Legacy);
    }

    #[test]
    fn ladders_cover_every_batch_with_bounded_waste() {
        let l = BatchLadder::new(256, LADDER_STEPS);
        assert_eq!(l.sizes(), [32, 64, 96, 128, 160, 192, 224, 256]);
        for n in 1..=256 {
            let r = l.rows_for(n, 256).unwrap();
            assert!(r >= n && r - n < 32, "{n} → {r}");
        }
        // A buffer smaller than the ladder's size: unplanned.
        assert_eq!(l.rows_for(100, 100), None);
        assert_eq!(l.rows_for(100, 127), None);
        assert_eq!(l.rows_for(100, 128), Some(128));
        assert_eq!(l.rows_for(257, 1000), None);
        // Image batches: every size below 8, then even steps.
        assert_eq!(
            BatchLadder::new(8, LADDER_STEPS).sizes(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(BatchLadder::new(3, LADDER_STEPS).sizes(), [1, 2, 3]);
        assert_eq!(
            BatchLadder::new(32, LADDER_STEPS).sizes(),
            [4, 8, 12, 16, 20, 24, 28, 32]
        );
        // Uneven maxima keep the maximum and never exceed it.
        let l = BatchLadder::new(100, LADDER_STEPS);
        assert_eq!(l.sizes(), [13, 25, 38, 50, 63, 75, 88, 100]);
        assert_eq!(BatchLadder::new(1, LADDER_STEPS).sizes(), [1]);
        assert!(BatchLadder::new(0, LADDER_STEPS).sizes().is_empty());
    }

    #[test]
    fn the_full_batch_times_every_candidate_the_others_the_top_three() {
        use cudarc::cudnn::sys::{cudnnConvolutionFwdAlgo_t as A, cudnnMathType_t as M};
        let algos = [
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        ];
        let cands: Vec<Candidate> = [true, false]
            .iter()
            .flat_map(|&fused| {
                algos.iter().map(move |&algo| Candidate {
                    algo,
                    math: M::CUDNN_TENSOR_OP_MATH,
                    ws: 0,
                    fused,
                })
            })
            .collect();
        let top: Vec<_> = timed_subset(&cands, TIMED_CANDIDATES).collect();
        assert_eq!(top.len(), 6);
        assert!(top[..3].iter().all(|c| c.fused) && top[3..].iter().all(|c| !c.fused));
        assert_eq!(top[2].algo, algos[2]);
        let all: Vec<_> = timed_subset(&cands, usize::MAX).collect();
        assert_eq!(all.len(), cands.len());
        assert_eq!(all[4].algo, A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING);
    }

    #[test]
    fn short_launches_are_timed_several_to_a_run() {
        assert_eq!(launches_per_run(2.0), 1);
        assert_eq!(launches_per_run(0.5), 1);
        assert_eq!(launches_per_run(0.2), 3);
        assert_eq!(launches_per_run(0.04), 13);
        assert_eq!(launches_per_run(0.001), MAX_LAUNCHES_PER_RUN);
        assert_eq!(launches_per_run(0.0), MAX_LAUNCHES_PER_RUN);
        assert_eq!(launches_per_run(f32::NAN), MAX_LAUNCHES_PER_RUN);
        assert_eq!(launches_per_run(f32::INFINITY), 1);
    }

    #[test]
    fn the_graph_budget_reads_seconds_and_ignores_the_rest() {
        assert_eq!(parse_budget(None), GRAPH_API_BUDGET);
        assert_eq!(parse_budget(Some(" 8 ")), Duration::from_secs(8));
        assert_eq!(parse_budget(Some("0.5")), Duration::from_millis(500));
        assert_eq!(parse_budget(Some("0")), Duration::ZERO);
        for bad in ["", "-1", "ten", "inf", "NaN"] {
            assert_eq!(parse_budget(Some(bad)), GRAPH_API_BUDGET, "{bad:?}");
        }
    }
}
