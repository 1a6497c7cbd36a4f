//! `scorecam-gpu eval`: how faithful each method's maps are, over a set of images.
//!
//! For every image and method: the map of the target class (top-1, or `--class`), then
//! - Average Drop and Increase in Confidence (Chattopadhay et al. 2018; the Score-CAM paper): the
//!   class probability on the input multiplied by the map (the normalized input, as
//!   pytorch-grad-cam's metrics do) against the original's;
//! - Deletion and Insertion (Petsiuk et al. 2018, RISE's protocol): the class probability as the
//!   pixels are removed (replaced by the deletion baseline) or inserted (into the insertion
//!   baseline) `--step` at a time in order of decreasing saliency; the area under each curve;
//! - the energy-based pointing game (the Score-CAM paper) when bounding boxes are given: the
//!   share of the map's energy inside the image's boxes.
//!
//! Every metric input is made on the host and forwarded through the engine in batches of the
//! mask batch, like the masked passes (on the GPU with the CUDA backend). `--sanity` adds
//! Adebayo et al.'s cascading randomization: the weight layers are re-initialized from the top
//! down, one more at each step, and the Spearman rank correlation of the maps with the original
//! model's is reported per step and method.
//!
//! Files: [`metrics`] (the metrics' math), [`boxes`] (VOC XML / CSV boxes mapped into the model's
//! view), [`plot`] (the curves as a PNG); this file runs them.

pub mod boxes;
pub mod metrics;
pub mod plot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::cam::{Method, Targets};
use crate::engine::Engine;
use crate::error::{one_line, Result};
use crate::image::{self as img, ResizeMode};
use boxes::{BoxPx, BoxXyxy};

/// What pixels are replaced with in the deletion/insertion games.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// Zeros of the normalized input (the mean colour).
    Zeros,
    /// RISE's blurred copy of the image.
    Blur,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Zeros => "zeros",
            Baseline::Blur => "blur",
        }
    }

    fn make(self, x: &[f32], s: usize) -> Vec<f32> {
        match self {
            Baseline::Zeros => vec![0.0; x.len()],
            Baseline::Blur => metrics::blur(x, s),
        }
    }
}

/// Bounding boxes for the pointing game, by image file name.
#[derive(Debug, Default)]
pub struct Boxes {
    /// From a CSV file: image file name → boxes.
    by_name: HashMap<String, Vec<BoxXyxy>>,
    /// A directory of Pascal VOC files `<image stem>.xml`.
    voc_dir: Option<PathBuf>,
}

impl Boxes {
    /// `path`: a CSV file (`image,xmin,ymin,xmax,ymax[,label]`) or a directory of VOC XML files.
    pub fn open(path: &Path) -> Result<Boxes> {
        if path.is_dir() {
            return Ok(Boxes {
                by_name: HashMap::new(),
                voc_dir: Some(path.to_path_buf()),
            });
        }
        let mut by_name: HashMap<String, Vec<BoxXyxy>> = HashMap::new();
        for (image, b) in boxes::read_csv(path)? {
            let name = Path::new(&image)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(image);
            by_name.entry(name).or_default().push(b);
        }
        Ok(Boxes {
            by_name,
            voc_dir: None,
        })
    }

    /// The boxes drawn on the image at `path` (none known: `None`).
    fn of(&self, path: &Path) -> Result<Option<Vec<BoxXyxy>>> {
        if let Some(dir) = &self.voc_dir {
            let Some(stem) = path.file_stem() else {
                return Ok(None);
            };
            let xml = dir.join(stem).with_extension("xml");
            if !xml.is_file() {
                return Ok(None);
            }
            let (_, _, _, found) = boxes::read_voc_xml(&xml)?;
            return Ok(Some(found));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(self.by_name.get(&name).cloned())
    }
}

/// How to evaluate.
pub struct EvalOptions {
    pub methods: Vec<Method>,
    pub resize: ResizeMode,
    /// The class each map explains: `Top(1)` (the prediction) or one given class.
    pub targets: Targets,
    /// Pixels changed per deletion/insertion step.
    pub step: usize,
    pub deletion_baseline: Baseline,
    pub insertion_baseline: Baseline,
    pub boxes: Option<Boxes>,
    /// Run the cascading-randomization sanity check too, with this seed.
    pub sanity: Option<u64>,
    pub quiet: bool,
}

/// One method's results over the images.
#[derive(Clone, Debug, Default)]
pub struct MethodScores {
    pub method: String,
    pub images: usize,
    pub average_drop: f64,
    pub increase_in_confidence: f64,
    pub deletion_auc: f64,
    pub insertion_auc: f64,
    /// Mean energy share inside the boxes, over the images that have boxes.
    pub pointing_game: Option<f64>,
    pub pointing_images: usize,
    /// Mean class probability at each deletion / insertion step.
    pub deletion_curve: Vec<f64>,
    pub insertion_curve: Vec<f64>,
}

/// The sanity check: per randomized layer (cumulative from the top), the mean Spearman rank
/// correlation of each method's maps with the original model's.
#[derive(Clone, Debug, Default)]
pub struct Sanity {
    pub layers: Vec<String>,
    /// `[method][step]`.
    pub correlation: Vec<Vec<f64>>,
}

#[derive(Debug, Default)]
pub struct EvalReport {
    pub methods: Vec<MethodScores>,
    /// Images that could not be read, with why.
    pub failed: Vec<(PathBuf, String)>,
    pub sanity: Option<Sanity>,
    pub protocol: Value,
}

/// One image's method-independent metric inputs.
struct Prepared {
    /// The normalized input `[3, S, S]`.
    x: Vec<f32>,
    del_base: Vec<f32>,
    ins_base: Vec<f32>,
    /// Its boxes in the model's view, when boxes are known for it.
    boxes: Option<Vec<BoxPx>>,
}

/// Per-method sums while the images stream by.
#[derive(Default)]
struct Acc {
    images: usize,
    base: Vec<f32>,
    masked: Vec<f32>,
    deletion_auc: f64,
    insertion_auc: f64,
    deletion: Vec<f64>,
    insertion: Vec<f64>,
    pointing: f64,
    pointing_images: usize,
}

/// Class probabilities of `count` host-made inputs, made `fill(r, row)` one batch at a time, so
/// no more than one batch of inputs is ever in memory.
fn probs_of(
    engine: &mut Engine,
    s: usize,
    count: usize,
    class: usize,
    mut fill: impl FnMut(usize, &mut [f32]),
) -> Result<Vec<f32>> {
    let row = 3 * s * s;
    let batch = engine.mask_batch().max(1);
    let mut buf = vec![0f32; batch.min(count) * row];
    let mut out = Vec::with_capacity(count);
    let mut r = 0;
    while r < count {
        let n = batch.min(count - r);
        for (j, chunk) in buf[..n * row].chunks_mut(row).enumerate() {
            fill(r + j, chunk);
        }
        out.extend(engine.class_probs(&buf[..n * row], &vec![class; n])?);
        r += n;
    }
    Ok(out)
}

/// Evaluate `opts.methods` on the images at `paths` with `engine`.
pub fn run(engine: &mut Engine, paths: &[PathBuf], opts: &EvalOptions) -> Result<EvalReport> {
    let model = engine.model_arc();
    let s = model.input_size();
    let (mean, std) = (model.meta.mean, model.meta.std);
    let pixels = s * s;
    let steps = metrics::causal_steps(pixels, opts.step.max(1));
    let mut accs: Vec<Acc> = opts.methods.iter().map(|_| Acc::default()).collect();
    let mut report = EvalReport::default();
    // Original maps and classes, kept for the sanity check: [method][image].
    let mut originals: Vec<Vec<Vec<f32>>> = vec![Vec::new(); opts.methods.len()];
    let mut sanity_images: Vec<(Vec<u8>, usize)> = Vec::new();

    for group in paths.chunks(engine.image_batch().max(1)) {
        let mut rgbs = Vec::new();
        let mut sizes = Vec::new();
        let mut names = Vec::new();
        for p in group {
            match img::load_rgb_sized(p, s, opts.resize) {
                Ok((rgb, size)) => {
                    rgbs.push(rgb);
                    sizes.push(size);
                    names.push(p.clone());
                }
                Err(e) => {
                    if !opts.quiet {
                        eprintln!("error: {e}");
                    }
                    report.failed.push((p.clone(), one_line(&e.to_string())));
                }
            }
        }
        if rgbs.is_empty() {
            continue;
        }
        // What every method's metrics of an image share, made once: the normalized input, the
        // two baselines, the image's boxes in the model's view.
        let mut prepared = Vec::with_capacity(rgbs.len());
        for ((rgb, path), size) in rgbs.iter().zip(&names).zip(&sizes) {
            let x = img::normalize(rgb, s, mean, std);
            let boxes_px: Option<Vec<BoxPx>> = match &opts.boxes {
                Some(b) => b.of(path)?.map(|found| {
                    found
                        .iter()
                        .map(|bx| boxes::to_model_view(bx, size.0, size.1, s as u32, opts.resize))
                        .collect()
                }),
                None => None,
            };
            prepared.push(Prepared {
                del_base: opts.deletion_baseline.make(&x, s),
                ins_base: opts.insertion_baseline.make(&x, s),
                x,
                boxes: boxes_px,
            });
        }
        let targets = vec![opts.targets.clone(); rgbs.len()];
        for (mi, method) in opts.methods.iter().enumerate() {
            engine.set_method(method.clone())?;
            let explained = engine.explain_for(&rgbs, &targets)?;
            for ((rgb, ex), pre) in rgbs.iter().zip(&explained).zip(&prepared) {
                let cm = &ex.maps[0];
                let (class, map) = (cm.class, &cm.map);
                let x = &pre.x;
                let acc = &mut accs[mi];
                acc.images += 1;
                // Average Drop / Increase in Confidence: the input times the map.
                let o = probs_of(engine, s, 1, class, |_, row| {
                    for (c, chunk) in row.chunks_mut(pixels).enumerate() {
                        for (p, v) in chunk.iter_mut().enumerate() {
                            *v = x[c * pixels + p] * map[p];
                        }
                    }
                })?[0];
                acc.base.push(cm.score);
                acc.masked.push(o);
                // Deletion and insertion.
                let order = metrics::causal_order(map);
                for (start, finish, curve_sum, auc_sum) in [
                    (x, &pre.del_base, &mut acc.deletion, &mut acc.deletion_auc),
                    (&pre.ins_base, x, &mut acc.insertion, &mut acc.insertion_auc),
                ] {
                    let curve = probs_of(engine, s, steps + 1, class, |i, row| {
                        let n = metrics::causal_changed(i, opts.step, pixels);
                        metrics::causal_input(start, finish, &order, n, s, row);
                    })?;
                    *auc_sum += metrics::auc(&curve);
                    if curve_sum.is_empty() {
                        curve_sum.resize(curve.len(), 0.0);
                    }
                    curve_sum
                        .iter_mut()
                        .zip(&curve)
                        .for_each(|(a, &v)| *a += f64::from(v));
                }
                // Pointing game.
                if let Some(px) = &pre.boxes {
                    if let Some(e) = metrics::energy_in_boxes(map, s, px) {
                        acc.pointing += e;
                        acc.pointing_images += 1;
                    }
                }
                if opts.sanity.is_some() {
                    originals[mi].push(map.clone());
                    if mi == 0 {
                        sanity_images.push((rgb.clone(), class));
                    }
                }
            }
        }
    }

    for (method, acc) in opts.methods.iter().zip(accs) {
        let n = acc.images.max(1) as f64;
        report.methods.push(MethodScores {
            method: method.name().into(),
            images: acc.images,
            average_drop: metrics::average_drop(&acc.base, &acc.masked),
            increase_in_confidence: metrics::increase_in_confidence(&acc.base, &acc.masked),
            deletion_auc: acc.deletion_auc / n,
            insertion_auc: acc.insertion_auc / n,
            pointing_game: (acc.pointing_images > 0)
                .then(|| acc.pointing / acc.pointing_images as f64),
            pointing_images: acc.pointing_images,
            deletion_curve: acc.deletion.iter().map(|v| v / n).collect(),
            insertion_curve: acc.insertion.iter().map(|v| v / n).collect(),
        });
    }

    if let Some(seed) = opts.sanity {
        report.sanity = Some(sanity(
            engine,
            &model,
            &opts.methods,
            &sanity_images,
            &originals,
            seed,
        )?);
        engine.set_model(model)?;
    }
    report.protocol = json!({
        "input_size": s,
        "step": opts.step,
        "steps": steps,
        "deletion_baseline": opts.deletion_baseline.name(),
        "insertion_baseline": opts.insertion_baseline.name(),
        "masked_input": "normalized input × map",
        "auc": "RISE: (Σ − first/2 − last/2) / (points − 1)",
    });
    Ok(report)
}

/// Adebayo et al.'s cascading randomization: for k = 1..=L, the top k weight layers randomized,
/// every method's maps (same images, same classes) compared with the original's by Spearman.
fn sanity(
    engine: &mut Engine,
    model: &Arc<crate::Vgg>,
    methods: &[Method],
    images: &[(Vec<u8>, usize)],
    originals: &[Vec<Vec<f32>>],
    seed: u64,
) -> Result<Sanity> {
    let layers = model.weight_layers_from_top();
    let mut correlation = vec![Vec::with_capacity(layers.len()); methods.len()];
    let rgbs: Vec<Vec<u8>> = images.iter().map(|(r, _)| r.clone()).collect();
    let targets: Vec<Targets> = images
        .iter()
        .map(|&(_, c)| Targets::Classes(vec![c]))
        .collect();
    for k in 1..=layers.len() {
        engine.set_model(Arc::new(model.randomize_from_top(k, seed)))?;
        for (mi, method) in methods.iter().enumerate() {
            engine.set_method(method.clone())?;
            let mut sum = 0.0;
            let mut n = 0;
            for (chunk, tchunk) in rgbs
                .chunks(engine.image_batch().max(1))
                .zip(targets.chunks(engine.image_batch().max(1)))
            {
                for ex in engine.explain_for(chunk, tchunk)? {
                    let r = metrics::spearman(&originals[mi][n], &ex.maps[0].map);
                    if r.is_finite() {
                        sum += r;
                    }
                    n += 1;
                }
            }
            correlation[mi].push(if n > 0 { sum / n as f64 } else { f64::NAN });
        }
    }
    Ok(Sanity {
        layers,
        correlation,
    })
}

/// The report as JSON: `{"methods": {name: {average_drop, increase_in_confidence, deletion_auc,
/// insertion_auc, pointing_game, images, ...}}, "sanity": ..., "failed": [...], "protocol": ...}`.
pub fn to_json(r: &EvalReport) -> Value {
    let mut methods = serde_json::Map::new();
    for m in &r.methods {
        methods.insert(
            m.method.clone(),
            json!({
                "average_drop": m.average_drop,
                "increase_in_confidence": m.increase_in_confidence,
                "deletion_auc": m.deletion_auc,
                "insertion_auc": m.insertion_auc,
                "pointing_game": m.pointing_game,
                "pointing_images": m.pointing_images,
                "images": m.images,
                "deletion_curve": m.deletion_curve,
                "insertion_curve": m.insertion_curve,
            }),
        );
    }
    let sanity = r.sanity.as_ref().map(|s| {
        let mut per = serde_json::Map::new();
        for (m, row) in r.methods.iter().zip(&s.correlation) {
            per.insert(m.method.clone(), json!(row));
        }
        json!({ "layers_randomized": s.layers, "spearman": per })
    });
    json!({
        "methods": methods,
        "sanity": sanity,
        "failed": r.failed.iter().map(|(p, e)| json!({"image": p.to_string_lossy(), "error": e})).collect::<Vec<_>>(),
        "protocol": r.protocol,
    })
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The report as CSV: a header and one row per method.
pub fn to_csv(r: &EvalReport) -> String {
    let mut out = String::from(
        "method,images,average_drop,increase_in_confidence,deletion_auc,insertion_auc,pointing_game,pointing_images\n",
    );
    for m in &r.methods {
        out.push_str(&format!(
            "{},{},{:.6},{:.6},{:.6},{:.6},{},{}\n",
            m.method,
            m.images,
            m.average_drop,
            m.increase_in_confidence,
            m.deletion_auc,
            m.insertion_auc,
            m.pointing_game.map_or(String::new(), |v| format!("{v:.6}")),
            m.pointing_images
        ));
    }
    out
}

/// The report as an aligned table (and the sanity table, when run).
pub fn to_table(r: &EvalReport) -> String {
    let mut out = format!(
        "{:<16} {:>7} {:>13} {:>22} {:>13} {:>14} {:>14}\n",
        "method",
        "images",
        "average drop",
        "increase in confidence",
        "deletion AUC",
        "insertion AUC",
        "pointing game"
    );
    for m in &r.methods {
        out.push_str(&format!(
            "{:<16} {:>7} {:>12.2}% {:>21.2}% {:>13.4} {:>14.4} {:>14}\n",
            m.method,
            m.images,
            m.average_drop,
            m.increase_in_confidence,
            m.deletion_auc,
            m.insertion_auc,
            fmt_opt(m.pointing_game, 4)
        ));
    }
    if let Some(s) = &r.sanity {
        out.push_str("\nsanity check (Spearman rank correlation with the original maps; layers randomized from the top, cumulatively):\n");
        out.push_str(&format!("{:<16}", "randomized to"));
        for m in &r.methods {
            out.push_str(&format!(" {:>14}", m.method));
        }
        out.push('\n');
        for (k, layer) in s.layers.iter().enumerate() {
            out.push_str(&format!("{layer:<16}"));
            for row in &s.correlation {
                out.push_str(&format!(" {:>14.4}", row[k]));
            }
            out.push('\n');
        }
    }
    out
}

/// Colours of the methods in the plot, in order.
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
];

/// The mean deletion and insertion curves of every method as a PNG at `path`.
pub fn write_plot(path: &Path, r: &EvalReport) -> Result<()> {
    let series = |pick: fn(&MethodScores) -> &Vec<f64>| -> Vec<plot::Series> {
        r.methods
            .iter()
            .enumerate()
            .filter(|(_, m)| !pick(m).is_empty())
            .map(|(i, m)| plot::Series {
                label: m.method.clone(),
                values: pick(m).iter().map(|&v| v as f32).collect(),
                colour: COLOURS[i % COLOURS.len()],
            })
            .collect()
    };
    let images = r.methods.first().map_or(0, |m| m.images);
    plot::write_curves_png(
        path,
        &format!("deletion / insertion, mean over {images} images"),
        &series(|m| &m.deletion_curve),
        &series(|m| &m.insertion_curve),
    )
}
