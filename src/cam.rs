//! Score-CAM orchestration, backend-agnostic: base forward → masks → masked forwards (batched,
//! across images) → scores → channel weights → combined maps. The two semantics, exactly, are in
//! the README ("The two semantics") and on [`Semantics`]; the target layers in "Target layers".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::cpu::{min_max, softmax, upsample_bilinear};
use crate::backend::grad::grad_from_capture;
use crate::backend::{Backend, MaskItem, MaskStyle, Plan, Precision, Semantics, Stage};
use crate::error::{Error, Result};
pub use crate::methods::Method;
use crate::methods::{gradcam_pp_weights, gradcam_weights, top_std_channels, torchcam_scale};
use crate::model::{MapShape, Vgg};

/// Most images explained together. Beyond a few dozen the masked batches are full anyway, and
/// the per-image buffers (input, activations) grow with it.
pub const MAX_IMAGE_BATCH: usize = 256;

/// Which classes to explain for an image. All of them share the image's masked passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// The `k` classes with the highest logits on the unmasked input, best first.
    Top(usize),
    /// These classes, in this order, each once.
    Classes(Vec<usize>),
}

impl Default for Targets {
    fn default() -> Self {
        Targets::Top(1)
    }
}

impl Targets {
    /// Classes in the given order with repeats removed (`--class 3,3` explains class 3 once).
    pub fn classes(list: impl IntoIterator<Item = usize>) -> Targets {
        let mut seen = std::collections::HashSet::new();
        Targets::Classes(list.into_iter().filter(|c| seen.insert(*c)).collect())
    }

    /// Check against a model with `num_classes` classes; the message names the bad value.
    pub fn check(&self, num_classes: usize) -> std::result::Result<(), String> {
        match self {
            Targets::Top(0) => Err("--top-k must be at least 1".into()),
            Targets::Top(k) if *k > num_classes => Err(format!(
                "--top-k {k} is more than the model's {num_classes} classes"
            )),
            Targets::Top(_) => Ok(()),
            Targets::Classes(list) if list.is_empty() => Err("no target class given".into()),
            Targets::Classes(list) => match list.iter().find(|&&c| c >= num_classes) {
                Some(bad) => Err(format!(
                    "class {bad} is out of range: the model has {num_classes} classes (0..={})",
                    num_classes - 1
                )),
                None => Ok(()),
            },
        }
    }

    /// The classes to explain for an image with these logits.
    fn resolve(&self, logits: &[f32]) -> Vec<usize> {
        match self {
            Targets::Classes(list) => list.clone(),
            Targets::Top(k) => ranking(logits).into_iter().take(*k).collect(),
        }
    }
}

/// What to explain and how.
#[derive(Clone, Debug)]
pub struct CamOptions {
    /// The method (Score-CAM and its variants, Grad-CAM, Grad-CAM++).
    pub method: Method,
    /// The Score-CAM semantics (`--mode`) of `scorecam` and `faster-scorecam`.
    pub semantics: Semantics,
    /// `features.N` (torchvision numbering); `None`: the last conv's ReLU output.
    pub layer: Option<String>,
    /// Target classes of every image unless [`Explainer::explain_for`] gives its own.
    pub targets: Targets,
    /// Most masked inputs per forward (bounds memory). Capped at what a group of images can
    /// use: `image_batch` × the layer's channels.
    pub mask_batch: usize,
    /// Most images whose masked inputs are forwarded together (capped at [`MAX_IMAGE_BATCH`]).
    pub image_batch: usize,
    /// The masked forwards' convolutions: FP16, or FP8 where a GPU supports it and it pays
    /// (set on the backend by [`crate::engine::Engine::new`]).
    pub precision: Precision,
}

impl Default for CamOptions {
    fn default() -> Self {
        CamOptions {
            method: Method::ScoreCam,
            semantics: Semantics::Official,
            layer: None,
            targets: Targets::Top(1),
            mask_batch: 64,
            image_batch: 1,
            precision: Precision::Fp16,
        }
    }
}

/// Masked forward passes of the images being explained, for progress displays: `planned` grows
/// when a group starts, `done` after every masked batch. Shared with another thread.
#[derive(Debug, Default)]
pub struct PassCounter {
    pub planned: AtomicU64,
    pub done: AtomicU64,
}

/// The map for one target class of one image.
#[derive(Clone, Debug)]
pub struct ClassMap {
    pub class: usize,
    /// Rank of `class` by logit on the unmasked input (1: the top-1 class).
    pub rank: usize,
    /// Softmax probability of `class` on the unmasked input.
    pub score: f32,
    /// `[S, S]` in [0, 1].
    pub map: Vec<f32>,
    /// The map was constant (all zeros written).
    pub flat: bool,
    /// Per-channel score: official `s_k` (0 for skipped channels), channel-softmax logit `z_k`.
    pub channel_scores: Vec<f32>,
}

/// Everything computed for one image.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub top1: usize,
    /// Softmax over the classes of the unmasked input.
    pub probs: Vec<f32>,
    /// Raw logits of the unmasked input.
    pub logits: Vec<f32>,
    /// Channels whose activations are constant (skipped in official mode).
    pub flat_channels: usize,
    /// Masked forward passes run for this image.
    pub masked_passes: usize,
    /// Masked passes not run: flat channels (skipped in official mode, one shared zero-input
    /// forward otherwise) and channels the method leaves out.
    pub masked_passes_saved: usize,
    pub maps: Vec<ClassMap>,
}

/// Buffers sized once for the plan and reused for every image group.
struct Buffers<B: Backend> {
    images: B::Buf,
    base_logits: B::Buf,
    acts: B::Buf,
    masked: B::Buf,
    masked_logits: B::Buf,
}

/// Runs Score-CAM on one backend with one model and one set of options.
pub struct Explainer<B: Backend> {
    backend: B,
    model: Arc<Vgg>,
    opts: CamOptions,
    plan: Plan,
    acts_shape: MapShape,
    /// `None` only while being rebuilt after an out-of-memory error.
    bufs: Option<Buffers<B>>,
    passes: Option<Arc<PassCounter>>,
    /// The model's logits on an all-zero input: every flat channel's masked input (computed once,
    /// on first need).
    zero_logits: Option<Vec<f32>>,
    /// `--layer` named a conv's own index: Grad-CAM's gradient is the one before its ReLU.
    grad_before_relu: bool,
}

impl<B: Backend> Explainer<B> {
    /// Resolve the layer, prepare the backend and allocate every buffer. On out-of-memory the
    /// mask batch is halved (with a notice on stderr) until it fits; at 1 the error is returned.
    pub fn new(mut backend: B, model: Arc<Vgg>, opts: CamOptions) -> Result<Self> {
        if opts.mask_batch == 0 || opts.image_batch == 0 {
            return Err(Error::Usage(
                "--mask-batch and --image-batch must be at least 1".into(),
            ));
        }
        opts.targets
            .check(model.num_classes())
            .map_err(Error::Usage)?;
        let capture = match &opts.layer {
            Some(name) => model.resolve_layer(name).map_err(Error::Usage)?,
            None => model.default_capture(),
        };
        let s = model.input_size();
        let acts_shape = model.capture_shape(capture, s);
        opts.method.check(acts_shape.c).map_err(Error::Usage)?;
        let grad_before_relu = opts
            .layer
            .as_deref()
            .is_some_and(|l| model.names_conv_output(l));
        // Never plan for more than a group can use: larger batches only cost memory.
        let max_images = opts.image_batch.min(MAX_IMAGE_BATCH);
        let mut plan = Plan {
            input_size: s,
            max_images,
            max_masks: opts.mask_batch.min(max_images * acts_shape.c),
            capture,
        };
        let bufs = Self::fit(&mut backend, &model, &mut plan, acts_shape)?;
        Ok(Explainer {
            backend,
            model,
            opts,
            plan,
            acts_shape,
            bufs: Some(bufs),
            passes: None,
            zero_logits: None,
            grad_before_relu,
        })
    }

    /// Explain with another method from now on (buffers and plan stay; the method's parameters
    /// are checked against the layer).
    pub fn set_method(&mut self, method: Method) -> Result<()> {
        method.check(self.acts_shape.c).map_err(Error::Usage)?;
        self.opts.method = method;
        Ok(())
    }

    /// Explain with another model of the same shape (the sanity check's randomized copies): the
    /// backend is prepared for it, the buffers are rebuilt.
    pub fn set_model(&mut self, model: Arc<Vgg>) -> Result<()> {
        if model.stage_shapes(self.plan.input_size) != self.model.stage_shapes(self.plan.input_size)
            || model.num_classes() != self.model.num_classes()
        {
            return Err(Error::Invalid("set_model: a model of another shape".into()));
        }
        self.zero_logits = None;
        self.model = model;
        self.rebuild_buffers()
    }

    /// Free the buffers, then prepare the backend and allocate them again for the current model
    /// and plan (halving the mask batch until they fit).
    fn rebuild_buffers(&mut self) -> Result<()> {
        // Free the old buffers before allocating new (possibly smaller) ones.
        self.bufs = None;
        let bufs = Self::fit(
            &mut self.backend,
            &self.model,
            &mut self.plan,
            self.acts_shape,
        )?;
        self.bufs = Some(bufs);
        Ok(())
    }

    /// The softmax probability of `classes[r]` for each of the `classes.len()` normalized inputs
    /// in `inputs` (`[r, 3, S, S]` f32, made on the host), forwarded in batches of the mask batch:
    /// the faithfulness metrics' forwards.
    pub fn class_probs(&mut self, inputs: &[f32], classes: &[usize]) -> Result<Vec<f32>> {
        let s = self.plan.input_size;
        let row = 3 * s * s;
        if inputs.len() != classes.len() * row {
            return Err(Error::Invalid(format!(
                "class_probs: {} values for {} inputs of {row}",
                inputs.len(),
                classes.len()
            )));
        }
        let be = &mut self.backend;
        let bufs = self.bufs.as_mut().ok_or_else(|| {
            Error::Invalid("explainer buffers missing after a failed rebuild".into())
        })?;
        let mut out = Vec::with_capacity(classes.len());
        let batch = self.plan.max_masks;
        for (rows, cls) in inputs.chunks(batch * row).zip(classes.chunks(batch)) {
            let _r = crate::trace::range("metric_forward");
            be.write_rows(&mut bufs.masked, 0, rows)?;
            be.forward(&bufs.masked, cls.len(), &mut bufs.masked_logits, None)?;
            let targets: Vec<u32> = cls.iter().map(|&c| c as u32).collect();
            out.extend(be.scores(&bufs.masked_logits, cls.len(), &targets, true)?);
        }
        Ok(out)
    }

    /// Milliseconds of each layer (see [`Backend::layer_times`]) of a forward of a full mask
    /// batch, on the masked inputs the last run left in its buffer; median of `reps` passes.
    pub fn layer_times(&mut self, reps: usize) -> Result<Vec<f64>> {
        let bufs = self.bufs.as_ref().ok_or_else(|| {
            Error::Invalid("explainer buffers missing after a failed rebuild".into())
        })?;
        self.backend
            .layer_times(&bufs.masked, self.plan.max_masks, reps)
    }

    /// Count masked passes into `counter` from now on (see [`PassCounter`]).
    pub fn set_pass_counter(&mut self, counter: Arc<PassCounter>) {
        self.passes = Some(counter);
    }

    /// Prepare the backend and allocate the buffers, halving the mask batch on out-of-memory
    /// until they fit (see [`halve_on_oom`]).
    fn fit(backend: &mut B, model: &Arc<Vgg>, plan: &mut Plan, a: MapShape) -> Result<Buffers<B>> {
        loop {
            match Self::setup(backend, model, *plan, a) {
                Ok(bufs) => return Ok(bufs),
                Err(e) => halve_on_oom(e, plan)?,
            }
        }
    }

    fn setup(backend: &mut B, model: &Arc<Vgg>, plan: Plan, a: MapShape) -> Result<Buffers<B>> {
        let (s, c) = (plan.input_size, model.num_classes());
        backend.prepare(model, plan)?;
        Ok(Buffers {
            images: backend.alloc(&[plan.max_images, 3, s, s])?,
            base_logits: backend.alloc(&[plan.max_images, c])?,
            acts: backend.alloc(&[plan.max_images, a.c, a.h, a.w])?,
            masked: backend.alloc(&[plan.max_masks, 3, s, s])?,
            masked_logits: backend.alloc(&[plan.max_masks, c])?,
        })
    }

    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn model(&self) -> &Vgg {
        &self.model
    }

    pub fn model_arc(&self) -> Arc<Vgg> {
        Arc::clone(&self.model)
    }

    /// The mask batch in use (smaller than asked for after an out-of-memory retry).
    pub fn mask_batch(&self) -> usize {
        self.plan.max_masks
    }

    /// Most images explained together (their masked inputs share forward batches).
    pub fn image_batch(&self) -> usize {
        self.plan.max_images
    }

    pub fn semantics(&self) -> Semantics {
        self.opts.semantics
    }

    /// Name of the layer whose activations make the masks.
    pub fn layer_name(&self) -> String {
        self.model.capture_name(self.plan.capture)
    }

    /// Shape `[K, h, w]` of the activations the masks are made from.
    pub fn capture_shape(&self) -> MapShape {
        self.acts_shape
    }

    /// Explain images given as S×S RGB u8 (HWC), each for the options' targets. Images are
    /// processed in groups of `image_batch`; the masked inputs of a group share forward batches.
    /// On out-of-memory while running (a workspace that grows for an odd batch size, another
    /// process taking memory) the mask batch is halved, buffers rebuilt and the group retried.
    pub fn explain(&mut self, images: &[Vec<u8>]) -> Result<Vec<Explanation>> {
        let targets = vec![self.opts.targets.clone(); images.len()];
        self.explain_for(images, &targets)
    }

    /// Like [`Explainer::explain`], with each image's own targets (`targets[i]` for
    /// `images[i]`, checked against the model's classes).
    pub fn explain_for(
        &mut self,
        images: &[Vec<u8>],
        targets: &[Targets],
    ) -> Result<Vec<Explanation>> {
        if targets.len() != images.len() {
            return Err(Error::Invalid(format!(
                "{} target lists for {} images",
                targets.len(),
                images.len()
            )));
        }
        for t in targets {
            t.check(self.model.num_classes()).map_err(Error::Usage)?;
        }
        let mut out = Vec::with_capacity(images.len());
        let n = self.plan.max_images;
        for (group, group_targets) in images.chunks(n).zip(targets.chunks(n)) {
            loop {
                match self.explain_group(group, group_targets) {
                    Ok(r) => {
                        out.extend(r);
                        break;
                    }
                    Err(e) => {
                        halve_on_oom(e, &mut self.plan)?;
                        self.rebuild_buffers()?;
                    }
                }
            }
        }
        Ok(out)
    }

    fn explain_group(
        &mut self,
        group: &[Vec<u8>],
        group_targets: &[Targets],
    ) -> Result<Vec<Explanation>> {
        let n = group.len();
        let s = self.plan.input_size;
        let MapShape { c: k, h, w } = self.acts_shape;
        let method = self.opts.method.clone();
        let sem = method.semantics(self.opts.semantics);
        let meta = &self.model.meta;
        let be = &mut self.backend;
        let bufs = self.bufs.as_mut().ok_or_else(|| {
            Error::Invalid("explainer buffers missing after a failed rebuild".into())
        })?;
        let mut marks = StageMarks::default();

        marks.enter(be, Some(Stage::Preprocess))?;
        for (slot, rgb) in group.iter().enumerate() {
            if rgb.len() != s * s * 3 {
                return Err(Error::Invalid(format!(
                    "image {slot} has {} bytes, expected {s}×{s}×3",
                    rgb.len()
                )));
            }
            be.preprocess(rgb, meta.mean, meta.std, &mut bufs.images, slot)?;
        }

        marks.enter(be, Some(Stage::BaseForward))?;
        be.forward(&bufs.images, n, &mut bufs.base_logits, Some(&mut bufs.acts))?;
        let logits = be.download(&bufs.base_logits, n)?;
        let acts = be.download(&bufs.acts, n)?;

        // Per image: probabilities, targets, flat channels, the channels the method uses.
        let classes = self.model.num_classes();
        let plane = h * w;
        let mut results: Vec<Explanation> = Vec::with_capacity(n);
        let mut targets: Vec<Vec<usize>> = Vec::with_capacity(n);
        let mut flat: Vec<Vec<bool>> = Vec::with_capacity(n);
        let mut used: Vec<Vec<bool>> = Vec::with_capacity(n);
        for i in 0..n {
            let row = &logits[i * classes..][..classes];
            let a = &acts[i * k * plane..][..k * plane];
            let f = flat_channels(a, k, plane);
            let flat_count = f.iter().filter(|&&x| x).count();
            used.push(match &method {
                Method::FasterScoreCam { max_channels } => {
                    top_std_channels(a, k, plane, *max_channels)
                }
                _ => vec![true; k],
            });
            targets.push(group_targets[i].resolve(row));
            results.push(Explanation {
                top1: argmax(row),
                probs: softmax(row),
                logits: row.to_vec(),
                flat_channels: flat_count,
                masked_passes: 0,
                masked_passes_saved: 0,
                maps: Vec::new(),
            });
            flat.push(f);
        }
        // The scoring op reads the same number of targets per row: images with fewer targets
        // repeat their last one, and the extra scores are dropped.
        let t = targets.iter().map(Vec::len).max().unwrap_or(1);
        let padded: Vec<Vec<u32>> = targets
            .iter()
            .map(|list| {
                let last = *list.last().expect("targets are never empty (checked)");
                (0..t)
                    .map(|j| *list.get(j).unwrap_or(&last) as u32)
                    .collect()
            })
            .collect();

        // scores[i][target j][channel]: official s_k; channel-softmax z_k; torchcam the mean of
        // (z_k − base logit) over rounds; gradient methods the channel weights.
        let mut scores = vec![vec![vec![0f32; k]; t]; n];
        if method.uses_gradients() {
            marks.enter(be, Some(Stage::Scores))?;
            for (i, res) in results.iter_mut().enumerate() {
                let a = &acts[i * k * plane..][..k * plane];
                for (j, &class) in targets[i].iter().enumerate() {
                    let _r = crate::trace::range("gradients");
                    let mut g = grad_from_capture(&self.model, self.plan.capture, a, s, class);
                    if self.grad_before_relu {
                        // The conv's output is hooked: its gradient is taken before the ReLU.
                        g.iter_mut().zip(a).for_each(|(gv, &av)| {
                            if av <= 0.0 {
                                *gv = 0.0
                            }
                        });
                    }
                    scores[i][j] = match method {
                        Method::GradCam => gradcam_weights(&g, k, plane),
                        _ => gradcam_pp_weights(&g, a, k, plane),
                    };
                }
                res.masked_passes = 0;
            }
        } else {
            // Which (image, channel) pairs are forwarded. Official: never a flat channel (its
            // weight is 0). Every mode: only the method's channels. Zero-mask modes: a flat
            // channel's masked input is all zeros, the same for every flat channel and image:
            // its logits come from one forward of a zero input, made once per run.
            let dedupe = sem != Semantics::Official && method.flat_masks_are_zero();
            let forwarded = |i: usize, c: usize| {
                used[i][c] && !(flat[i][c] && (sem == Semantics::Official || dedupe))
            };
            let rounds = method.rounds(self.opts.semantics);
            let need_zero = dedupe && (0..n).any(|i| (0..k).any(|c| used[i][c] && flat[i][c]));
            if need_zero && self.zero_logits.is_none() {
                marks.enter(be, Some(Stage::Masks))?;
                // Scale 0: an exactly zero mask, so an exactly zero input.
                let zero = MaskStyle {
                    sem,
                    scale: 0.0,
                    noise: None,
                };
                be.masked_inputs(
                    &bufs.images,
                    &bufs.acts,
                    &[MaskItem::new(0, 0)],
                    zero,
                    &mut bufs.masked,
                )?;
                marks.enter(be, Some(Stage::MaskedForward))?;
                be.forward(&bufs.masked, 1, &mut bufs.masked_logits, None)?;
                // One forward per run, counted in no image's passes.
                self.zero_logits = Some(be.download(&bufs.masked_logits, 1)?);
            }
            let mut planned = 0u64;
            for (i, res) in results.iter_mut().enumerate() {
                let run = (0..k).filter(|&c| forwarded(i, c)).count();
                res.masked_passes += run * rounds.len();
                res.masked_passes_saved =
                    (0..k).filter(|&c| !forwarded(i, c)).count() * rounds.len();
                planned += (run * rounds.len()) as u64;
            }
            if let Some(p) = &self.passes {
                p.planned.fetch_add(planned, Ordering::Relaxed);
            }
            // Every forwarded (image, channel, sample), in the order its scores are pushed. Scores
            // a failed earlier group left pending are dropped first (free when there are none).
            let mut queued: Vec<MaskItem> = Vec::new();
            be.take_scores()?;
            for (style, sample) in &rounds {
                let items: Vec<MaskItem> = (0..n)
                    .flat_map(|i| (0..k).map(move |c| (i, c)))
                    .filter(|&(i, c)| forwarded(i, c))
                    .map(|(i, c)| MaskItem {
                        image: i as u32,
                        channel: c as u32,
                        sample: *sample,
                    })
                    .collect();
                for batch in items.chunks(self.plan.max_masks) {
                    marks.enter(be, Some(Stage::Masks))?;
                    be.masked_inputs(&bufs.images, &bufs.acts, batch, *style, &mut bufs.masked)?;
                    marks.enter(be, Some(Stage::MaskedForward))?;
                    be.forward(&bufs.masked, batch.len(), &mut bufs.masked_logits, None)?;
                    marks.enter(be, Some(Stage::Scores))?;
                    let row_targets: Vec<u32> = batch
                        .iter()
                        .flat_map(|it| padded[it.image as usize].iter().copied())
                        .collect();
                    // Queued: the device runs on to the next batch; the group's scores are
                    // read once, below.
                    be.push_scores(
                        &bufs.masked_logits,
                        batch.len(),
                        &row_targets,
                        sem.score_is_probability(),
                    )?;
                    if let Some(p) = &self.passes {
                        p.done.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                }
                queued.extend(items);
            }
            marks.enter(be, Some(Stage::Scores))?;
            let got = be.take_scores()?;
            if got.len() != queued.len() * t {
                return Err(Error::Invalid(format!(
                    "{} scores for {} masked inputs × {t} targets",
                    got.len(),
                    queued.len()
                )));
            }
            for (r, it) in queued.iter().enumerate() {
                let i = it.image as usize;
                for j in 0..t {
                    let mut v = got[r * t + j];
                    if sem == Semantics::Torchcam {
                        v -= logits[i * classes + padded[i][j] as usize];
                    }
                    scores[i][j][it.channel as usize] += v;
                }
            }
            // Torchcam's scores are means over the rounds; flat channels come from the zero input.
            for i in 0..n {
                for j in 0..t {
                    let class = padded[i][j] as usize;
                    let base = logits[i * classes + class];
                    if sem == Semantics::Torchcam {
                        let rounds = rounds.len() as f32;
                        scores[i][j].iter_mut().for_each(|v| *v /= rounds);
                    }
                    if let (true, Some(zero)) = (dedupe, &self.zero_logits) {
                        for c in (0..k).filter(|&c| used[i][c] && flat[i][c]) {
                            scores[i][j][c] = match sem {
                                Semantics::Torchcam => zero[class] - base,
                                _ => zero[class],
                            };
                        }
                    }
                }
            }
        }

        marks.enter(be, Some(Stage::Combine))?;
        for (i, res) in results.iter_mut().enumerate() {
            let order = ranking(&res.logits);
            for (j, &class) in targets[i].iter().enumerate() {
                let channel_scores = std::mem::take(&mut scores[i][j]);
                let weights = channel_weights(&channel_scores, &used[i], sem, &method);
                let (low_or_map, flat_map) = be.combine(&bufs.acts, i, &weights, sem)?;
                let (map, flat_map) = match sem {
                    Semantics::Official => (low_or_map, flat_map),
                    Semantics::ChannelSoftmax => grad_cam_scale(&low_or_map, h, w, s),
                    Semantics::Torchcam => torchcam_scale(&low_or_map, h, w, s),
                };
                res.maps.push(ClassMap {
                    class,
                    rank: 1 + order.iter().position(|&c| c == class).unwrap_or(0),
                    score: res.probs[class],
                    map,
                    flat: flat_map,
                    channel_scores,
                });
            }
        }
        marks.enter(be, None)?;
        Ok(results)
    }
}

/// Channel weights from per-channel scores: official the scores themselves (0 for channels the
/// method left out); channel-softmax and torchcam a softmax over the method's channels (the
/// others 0); gradient methods their weights as they are.
fn channel_weights(scores: &[f32], used: &[bool], sem: Semantics, method: &Method) -> Vec<f32> {
    if method.uses_gradients() {
        return scores.to_vec();
    }
    match sem {
        Semantics::Official => scores
            .iter()
            .zip(used)
            .map(|(&v, &u)| if u { v } else { 0.0 })
            .collect(),
        Semantics::ChannelSoftmax | Semantics::Torchcam => {
            let kept: Vec<f32> = scores
                .iter()
                .zip(used)
                .filter(|(_, &u)| u)
                .map(|(&v, _)| v)
                .collect();
            let mut soft = softmax(&kept).into_iter();
            used.iter()
                .map(|&u| if u { soft.next().unwrap_or(0.0) } else { 0.0 })
                .collect()
        }
    }
}

/// Stage boundaries, told to the backend's timers (`bench`, `--profile`) and to NVTX (nsys).
#[derive(Default)]
struct StageMarks {
    range: Option<crate::trace::Range>,
}

impl StageMarks {
    fn enter<B: Backend>(&mut self, be: &mut B, stage: Option<Stage>) -> Result<()> {
        self.range = None; // close the previous stage's range first
        be.mark(stage)?;
        self.range = stage.map(|s| crate::trace::range(s.name()));
        Ok(())
    }
}

/// Out of memory with a mask batch above 1: halve it (with a notice) and let the caller retry.
/// Any other error, or out of memory at batch 1, is returned.
fn halve_on_oom(e: Error, plan: &mut Plan) -> Result<()> {
    match e {
        Error::OutOfMemory(msg) if plan.max_masks > 1 => {
            plan.max_masks /= 2;
            eprintln!(
                "notice: out of memory ({msg}); retrying with --mask-batch {}",
                plan.max_masks
            );
            Ok(())
        }
        Error::OutOfMemory(msg) => {
            let hint = if msg.starts_with("GPU") {
                "free GPU memory or use --backend cpu"
            } else {
                "free host memory or lower --input-size"
            };
            Err(Error::OutOfMemory(format!(
                "{msg}, even with --mask-batch 1; {hint}"
            )))
        }
        e => Err(e),
    }
}

/// Class indices by decreasing logit (ties: lower index first, like a stable sort).
fn ranking(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Which of `k` channels of `plane` values each are constant. Decided on the low-resolution
/// activations: a constant channel upsamples to a constant map and a varying one does not, so
/// this equals the official `U.max() == U.min()` test without upsampling, on every backend alike.
pub fn flat_channels(acts: &[f32], k: usize, plane: usize) -> Vec<bool> {
    (0..k)
        .map(|c| {
            let (lo, hi) = min_max(&acts[c * plane..][..plane]);
            lo == hi
        })
        .collect()
}

/// pytorch-grad-cam 1.5.7's post-processing of `ReLU(Σ α_k A_k)` (`[h, w]`): `scale_cam_image`
/// with the target size (x − min, / (max + 1e-7), cv2.resize bilinear to S×S), then
/// `aggregate_multi_layers` (max(·, 0), mean over the one layer, `scale_cam_image` again).
/// Returns the S×S map and whether it was constant.
pub fn grad_cam_scale(low: &[f32], h: usize, w: usize, s: usize) -> (Vec<f32>, bool) {
    let scale = |x: &mut [f32]| {
        let (lo, _) = min_max(x);
        x.iter_mut().for_each(|v| *v -= lo);
        let (_, hi) = min_max(x);
        x.iter_mut().for_each(|v| *v /= 1e-7 + hi);
    };
    let mut l = low.to_vec();
    let (lo, hi) = min_max(&l);
    scale(&mut l);
    // cv2.resize(INTER_LINEAR) uses half-pixel centres with edge clamping: the same sampling as
    // PyTorch's align_corners=False.
    let mut map = upsample_bilinear(&l, h, w, s, false);
    map.iter_mut().for_each(|v| *v = v.max(0.0));
    scale(&mut map);
    (map, lo == hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn targets_dedupe_check_and_rank() {
        assert_eq!(Targets::classes([3, 3, 1, 3]), Targets::Classes(vec![3, 1]));
        assert!(Targets::Top(0).check(10).is_err());
        assert!(Targets::Top(11).check(10).is_err());
        assert!(Targets::Top(10).check(10).is_ok());
        assert!(Targets::Classes(vec![]).check(10).is_err());
        let e = Targets::Classes(vec![2, 10]).check(10).unwrap_err();
        assert!(e.contains("class 10"), "{e}");
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
        assert_eq!(Targets::Top(3).resolve(&logits), [1, 3, 4]);
        assert_eq!(ranking(&logits)[0], argmax(&logits));
    }

    #[test]
    fn batches_are_capped_at_what_a_group_can_use() {
        // 24 channels at the default layer: one image can never use more than 24 masks.
        let model = Arc::new(Vgg::random_from_config(&[8, 0, 16, 0, 24, 0], &[10], 1, 32));
        let opts = CamOptions {
            mask_batch: 99_999_999_999,
            image_batch: 1,
            ..CamOptions::default()
        };
        let ex = Explainer::new(CpuBackend::new(), Arc::clone(&model), opts).unwrap();
        assert_eq!((ex.image_batch(), ex.mask_batch()), (1, 24));
        let opts = CamOptions {
            mask_batch: 99_999_999_999,
            image_batch: 99_999_999_999,
            ..CamOptions::default()
        };
        let ex = Explainer::new(CpuBackend::new(), model, opts).unwrap();
        assert_eq!(ex.image_batch(), MAX_IMAGE_BATCH);
        assert_eq!(ex.mask_batch(), MAX_IMAGE_BATCH * 24);
    }

    #[test]
    fn per_image_targets_and_pass_counts() {
        let model = Arc::new(Vgg::random_from_config(&[8, 0, 16, 0], &[10], 3, 32));
        let opts = CamOptions {
            mask_batch: 5,
            image_batch: 3,
            ..CamOptions::default()
        };
        let mut ex = Explainer::new(CpuBackend::new(), Arc::clone(&model), opts).unwrap();
        let counter = Arc::new(PassCounter::default());
        ex.set_pass_counter(Arc::clone(&counter));
        let images: Vec<Vec<u8>> = (0..3)
            .map(|k| {
                (0..32 * 32 * 3)
                    .map(|i| ((i * (k + 3)) % 251) as u8)
                    .collect()
            })
            .collect();
        let targets = [
            Targets::Top(2),
            Targets::Classes(vec![7]),
            Targets::Classes(vec![4, 1, 9]),
        ];
        let got = ex.explain_for(&images, &targets).unwrap();
        let classes: Vec<Vec<usize>> = got
            .iter()
            .map(|e| e.maps.iter().map(|m| m.class).collect())
            .collect();
        assert_eq!(classes[1], [7]);
        assert_eq!(classes[2], [4, 1, 9]);
        assert_eq!(classes[0].len(), 2);
        assert_eq!(got[0].maps[0].rank, 1);
        assert_eq!(got[0].maps[1].rank, 2);
        let passes: usize = got.iter().map(|e| e.masked_passes).sum();
        assert_eq!(counter.planned.load(Ordering::Relaxed), passes as u64);
        assert_eq!(counter.done.load(Ordering::Relaxed), passes as u64);
        // Each image's maps equal those of the image explained alone for the same class.
        let mut alone = Explainer::new(
            CpuBackend::new(),
            model,
            CamOptions {
                targets: Targets::Classes(vec![1]),
                ..CamOptions::default()
            },
        )
        .unwrap();
        let one = alone.explain(&images[2..3]).unwrap().remove(0);
        assert_eq!(one.maps[0].map, got[2].maps[1].map);
        assert!(ex.explain_for(&images, &targets[..2]).is_err());
        assert!(ex
            .explain_for(&images[..1], &[Targets::Classes(vec![10])])
            .is_err());
    }
}
