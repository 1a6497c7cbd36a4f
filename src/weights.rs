//! safetensors → validated [`crate::model::Vgg`] (host f32), and back.
//!
//! Naming follows the format in `weights/README.md`: torchvision's VGG `state_dict()` names
//! (`features.{i}.weight`, `classifier.{j}.weight`, `_bn` variants folded at load time), timm's
//! names (`pre_logits.fc1`, `pre_logits.fc2`, `head.fc`), optionally under a `model.` or `module.`
//! prefix. Tensors may be F32, F16 or BF16; everything is converted to f32.
//!
//! Loading memory-maps the file and converts tensors in parallel (rayon), chunk by chunk, checking
//! for non-finite values in the same pass: the only copy is the one into the model's `Vec<f32>`s.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{SafeTensorError, TensorView, View};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::{
    ConvLayer, FeatureStage, LinearLayer, ModelMeta, Vgg, IMAGENET_MEAN, IMAGENET_STD,
};

/// BatchNorm epsilon of torchvision's `_bn` models (`nn.BatchNorm2d` default).
pub const BN_EPS: f64 = 1e-5;
/// Smallest `input_size` accepted (from a file's metadata or `--input-size`).
pub const MIN_INPUT_SIZE: usize = 32;
/// Largest `input_size` accepted. VGG16 at 2048² already needs ≈ 1 GiB of activations per
/// masked input in its first block; beyond that no batch fits and the maps are no sharper than
/// the target layer (1/16 of the input side) allows.
pub const MAX_INPUT_SIZE: usize = 2048;

const IMAGENET_CLASSES: &str = include_str!("../weights/imagenet_classes.txt");

/// The 1000 ImageNet-1k labels in class-index order (torchvision's `_IMAGENET_CATEGORIES`).
pub fn imagenet_labels() -> Vec<String> {
    IMAGENET_CLASSES.lines().map(str::to_owned).collect()
}

/// Load a VGG from a safetensors file: memory-mapped, converted to f32, validated.
pub fn load(path: &Path) -> Result<Vgg> {
    let name = path.display().to_string();
    let file =
        File::open(path).map_err(|e| Error::weights(&name, None, format!("cannot open: {e}")))?;
    let md = file
        .metadata()
        .map_err(|e| Error::weights(&name, None, format!("cannot stat: {e}")))?;
    if md.is_dir() {
        return Err(Error::weights(
            &name,
            None,
            "is a directory, expected a .safetensors file",
        ));
    }
    if md.len() == 0 {
        return Err(empty_file(&name));
    }
    // SAFETY: the map is read-only and dropped before returning; as with every mmap-based
    // loader, a file truncated by another process while we read it is outside our control.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::weights(&name, None, format!("cannot memory-map: {e}")))?;
    #[cfg(unix)]
    {
        // Start reading ahead: the conversion threads then rarely wait on page faults.
        let _ = mmap.advise(memmap2::Advice::WillNeed);
    }
    parse(&mmap, &name)
}

/// Load a VGG from the bytes of a safetensors file; `name` is used in messages and as the source.
pub fn load_bytes(bytes: &[u8], name: &str) -> Result<Vgg> {
    if bytes.is_empty() {
        return Err(empty_file(name));
    }
    parse(bytes, name)
}

fn empty_file(name: &str) -> Error {
    Error::weights(
        name,
        None,
        "empty file (0 bytes): truncated or not a safetensors file",
    )
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// A tensor of the file, under its canonical (torchvision) name.
struct Entry<'a> {
    /// The name as written in the file (with any `model.`/`module.`/timm naming).
    file_name: String,
    view: TensorView<'a>,
}

struct Tensors<'a> {
    path: &'a str,
    map: HashMap<String, Entry<'a>>,
}

impl<'a> Tensors<'a> {
    fn get(&self, canon: &str) -> Option<&Entry<'a>> {
        self.map.get(canon)
    }

    fn require(&self, canon: &str) -> Result<&Entry<'a>> {
        self.get(canon)
            .ok_or_else(|| Error::weights(self.path, Some(canon), "missing from the file"))
    }

    fn file_name<'s>(&'s self, canon: &'s str) -> &'s str {
        self.map
            .get(canon)
            .map(|e| e.file_name.as_str())
            .unwrap_or(canon)
    }

    fn err(&self, canon: &str, msg: impl Into<String>) -> Error {
        Error::weights(self.path, Some(self.file_name(canon)), msg)
    }
}

/// Strip any number of `model.` / `module.` prefixes (DataParallel, Lightning, ... checkpoints).
fn strip_prefixes(mut name: &str) -> &str {
    loop {
        if let Some(r) = name.strip_prefix("module.") {
            name = r;
        } else if let Some(r) = name.strip_prefix("model.") {
            name = r;
        } else {
            return name;
        }
    }
}

/// timm's VGG head names → torchvision classifier names.
fn timm_to_torchvision(name: &str) -> Option<String> {
    let (module, field) = name.rsplit_once('.')?;
    let index = match module {
        "pre_logits.fc1" => 0,
        "pre_logits.fc2" => 3,
        "head.fc" => 6,
        _ => return None,
    };
    Some(format!("classifier.{index}.{field}"))
}

/// Split `prefix.{N}.field` into `(N, field)`.
fn indexed<'n>(name: &'n str, prefix: &str) -> Option<(usize, &'n str)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
    let (i, field) = rest.split_once('.')?;
    Some((i.parse().ok()?, field))
}

fn header_error(bytes: &[u8], name: &str, e: SafeTensorError) -> Error {
    use SafeTensorError as E;
    let len = bytes.len();
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let msg = match &e {
        E::HeaderTooSmall => format!(
            "truncated or not a safetensors file: {len} bytes, too short for the 8-byte header length"
        ),
        E::HeaderTooLarge | E::InvalidHeaderLength => format!(
            "truncated or not a safetensors file: the header length field says {} bytes but the file has {len}",
            header_len.unwrap_or(0)
        ),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            format!("truncated or not a safetensors file (unreadable header: {e})")
        }
        E::MetadataIncompleteBuffer => match expected_file_len(bytes) {
            Some(expected) if expected > len as u64 => format!(
                "file is truncated: its header describes {expected} bytes but the file has {len} \
                 (an interrupted download or copy?)"
            ),
            Some(expected) => format!(
                "corrupt or not a safetensors file: {} unexpected bytes after the {expected} the header describes",
                len as u64 - expected
            ),
            None => format!("truncated or not a safetensors file: {e}"),
        },
        E::InvalidOffset(t) => {
            return Error::weights(
                name,
                Some(t),
                "invalid data offsets in the header: corrupt or not a safetensors file",
            )
        }
        E::TensorNotFound(t) => return Error::weights(name, Some(t), "not found"),
        _ => format!("corrupt or not a safetensors file: {e}"),
    };
    Error::weights(name, None, msg)
}

/// File length implied by a (JSON-valid) header: 8 + header + largest data end offset.
fn expected_file_len(bytes: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let header = bytes.get(8..8usize.checked_add(usize::try_from(n).ok()?)?)?;
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let end = v
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    Some(8 + n + end)
}

/// Index of a tensor in the conversion job list.
type Job = usize;

struct BnPlan {
    gamma: Option<Job>,
    beta: Option<Job>,
    mean: Job,
    var: Job,
}

struct ConvPlan {
    conv_index: usize,
    relu_index: usize,
    cin: usize,
    cout: usize,
    weight: Job,
    bias: Option<Job>,
    bn: Option<BnPlan>,
    pool_after: Option<usize>,
}

struct LinearPlan {
    index: usize,
    fin: usize,
    fout: usize,
    weight: Job,
    bias: Job,
}

fn parse(bytes: &[u8], path: &str) -> Result<Vgg> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| header_error(bytes, path, e))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| header_error(bytes, path, e))?;
    let file_meta = header.metadata().clone().unwrap_or_default();

    // Canonical names.
    let mut map: HashMap<String, Entry> = HashMap::new();
    let mut timm = false;
    let mut torchvision_head = false;
    for (file_name, view) in st.iter() {
        let stripped = strip_prefixes(file_name);
        let canon = match timm_to_torchvision(stripped) {
            Some(c) => {
                timm = true;
                c
            }
            None => {
                torchvision_head |= stripped.starts_with("classifier.");
                stripped.to_owned()
            }
        };
        if let Some(prev) = map.get(&canon) {
            return Err(Error::weights(
                path,
                Some(file_name),
                format!(
                    "same tensor as `{}` once prefixes/timm names are resolved (two models in one file?)",
                    prev.file_name
                ),
            ));
        }
        map.insert(
            canon,
            Entry {
                file_name: file_name.to_owned(),
                view,
            },
        );
    }
    if timm && torchvision_head {
        return Err(Error::weights(
            path,
            None,
            "has both torchvision (`classifier.N`) and timm (`pre_logits`/`head.fc`) classifier tensors",
        ));
    }
    let t = Tensors { path, map };

    // Every tensor to convert, in one list: converted in parallel once the plan is complete.
    let mut jobs: Vec<&Entry> = Vec::new();
    fn add<'t, 'a>(jobs: &mut Vec<&'t Entry<'a>>, e: &'t Entry<'a>) -> Job {
        jobs.push(e);
        jobs.len() - 1
    }

    // ---- features
    let mut weight_idx = BTreeSet::new();
    let mut bn_idx = BTreeSet::new();
    let mut bias_idx = BTreeSet::new();
    for canon in t.map.keys() {
        if let Some((i, field)) = indexed(canon, "features") {
            match field {
                "weight" => {
                    weight_idx.insert(i);
                }
                "running_mean" | "running_var" => {
                    bn_idx.insert(i);
                }
                "bias" => {
                    bias_idx.insert(i);
                }
                _ => {}
            }
        }
    }
    let conv_idx: Vec<usize> = weight_idx.difference(&bn_idx).copied().collect();
    for &i in &bias_idx {
        if !weight_idx.contains(&i) && !bn_idx.contains(&i) {
            let canon = format!("features.{i}.weight");
            return Err(Error::weights(
                path,
                Some(&canon),
                format!(
                    "missing from the file (`{}` is there)",
                    t.file_name(&format!("features.{i}.bias"))
                ),
            ));
        }
    }
    if conv_idx.is_empty() {
        let mut names: Vec<&str> = t.map.values().map(|e| e.file_name.as_str()).collect();
        names.sort_unstable();
        names.truncate(8);
        return Err(Error::weights(
            path,
            None,
            format!(
                "no VGG conv layers (`features.N.weight`) found; not a VGG? tensors include: {}",
                if names.is_empty() {
                    "(none)".into()
                } else {
                    names.join(", ")
                }
            ),
        ));
    }
    for &i in &bn_idx {
        if i == 0 || !conv_idx.contains(&(i - 1)) {
            let canon = format!("features.{i}.running_mean");
            return Err(t.err(&canon, "BatchNorm not directly after a conv layer"));
        }
    }
    if conv_idx[0] != 0 {
        let canon = format!("features.{}.weight", conv_idx[0]);
        return Err(t.err(
            &canon,
            format!(
                "the first conv is at index {}, expected 0 (is `features.0.weight` missing?)",
                conv_idx[0]
            ),
        ));
    }

    let mut convs: Vec<ConvPlan> = Vec::with_capacity(conv_idx.len());
    for (k, &i) in conv_idx.iter().enumerate() {
        let wname = format!("features.{i}.weight");
        let w = t.require(&wname)?;
        let shape = w.view.shape();
        if shape.len() == 1 && i > 0 && conv_idx.contains(&(i - 1)) {
            return Err(t.err(
                &wname,
                format!(
                    "looks like a BatchNorm weight (shape {shape:?}) but `features.{i}.running_mean` is missing"
                ),
            ));
        }
        if shape.len() != 4 || shape[2] != 3 || shape[3] != 3 || shape[0] == 0 || shape[1] == 0 {
            return Err(t.err(
                &wname,
                format!("expected a 3×3 conv weight of shape [Cout, Cin, 3, 3], found {shape:?}"),
            ));
        }
        let (cout, cin) = (shape[0], shape[1]);
        let check_vec = |canon: &str| -> Result<()> {
            let e = t.require(canon)?;
            if e.view.shape() != [cout] {
                return Err(t.err(
                    canon,
                    format!(
                        "expected shape [{cout}] (Cout of `{}`), found {:?}",
                        t.file_name(&wname),
                        e.view.shape()
                    ),
                ));
            }
            Ok(())
        };
        let has_bn = bn_idx.contains(&(i + 1));
        let bname = format!("features.{i}.bias");
        let bias = if t.get(&bname).is_some() || !has_bn {
            // Without BatchNorm the bias is required; before one, some exports drop it (= 0).
            check_vec(&bname)?;
            Some(add(&mut jobs, t.get(&bname).unwrap()))
        } else {
            None
        };
        let bn = if has_bn {
            let b = i + 1;
            let mut opt = |field: &str| -> Result<Option<Job>> {
                let canon = format!("features.{b}.{field}");
                if t.get(&canon).is_none() {
                    return Ok(None);
                }
                check_vec(&canon)?;
                Ok(Some(add(&mut jobs, t.get(&canon).unwrap())))
            };
            // γ and β are absent only for `affine=False` BatchNorm (γ = 1, β = 0).
            let gamma = opt("weight")?;
            let beta = opt("bias")?;
            let mean = format!("features.{b}.running_mean");
            let var = format!("features.{b}.running_var");
            check_vec(&mean)?;
            check_vec(&var)?;
            Some(BnPlan {
                gamma,
                beta,
                mean: add(&mut jobs, t.get(&mean).unwrap()),
                var: add(&mut jobs, t.get(&var).unwrap()),
            })
        } else {
            None
        };
        let relu_index = if has_bn { i + 2 } else { i + 1 };
        let pool_after = match conv_idx.get(k + 1) {
            None => Some(relu_index + 1),
            Some(&j) if j == relu_index + 1 => None,
            Some(&j) if j == relu_index + 2 => Some(relu_index + 1),
            Some(&j) => {
                return Err(t.err(
                    &format!("features.{j}.weight"),
                    format!(
                        "conv at index {j} follows the conv at {i}, but torchvision numbering puts the next conv \
                         at {} (no pool) or {} (after a max-pool): not a VGG layout, or a `features.N.weight` is missing",
                        relu_index + 1,
                        relu_index + 2
                    ),
                ))
            }
        };
        let weight = add(&mut jobs, w);
        convs.push(ConvPlan {
            conv_index: i,
            relu_index,
            cin,
            cout,
            weight,
            bias,
            bn,
            pool_after,
        });
    }

    // ---- classifier
    let mut lin_idx = BTreeSet::new();
    for canon in t.map.keys() {
        if let Some((j, field)) = indexed(canon, "classifier") {
            match field {
                "weight" => {
                    lin_idx.insert(j);
                }
                "bias" if t.get(&format!("classifier.{j}.weight")).is_none() => {
                    let canon = format!("classifier.{j}.weight");
                    let msg = format!(
                        "missing from the file (`{}` is there)",
                        t.file_name(&format!("classifier.{j}.bias"))
                    );
                    return Err(Error::weights(path, Some(&canon), msg));
                }
                _ => {}
            }
        }
    }
    let mut linears = Vec::with_capacity(lin_idx.len());
    for &j in &lin_idx {
        let wname = format!("classifier.{j}.weight");
        let w = t.require(&wname)?;
        let shape = w.view.shape();
        let (fout, fin) = match shape {
            [o, i] => (*o, *i),
            // timm's ConvMlp: fc1 is a 7×7 conv on the 7×7 map (= Linear on the C,H,W flatten),
            // fc2 a 1×1 conv.
            [o, c, h, w] if timm => (*o, c * h * w),
            _ => {
                return Err(t.err(
                    &wname,
                    format!(
                        "expected a Linear weight of shape [out, in]{}, found {shape:?}",
                        if timm {
                            " (or [out, C, H, W] for timm)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        };
        if fout == 0 || fin == 0 {
            return Err(t.err(&wname, format!("empty Linear weight {shape:?}")));
        }
        let bname = format!("classifier.{j}.bias");
        let b = t.require(&bname).map_err(|_| {
            Error::weights(
                path,
                Some(&w.file_name.replace("weight", "bias")),
                "missing from the file",
            )
        })?;
        if b.view.shape() != [fout] {
            return Err(t.err(
                &bname,
                format!(
                    "expected shape [{fout}] (out of `{}`), found {:?}",
                    w.file_name,
                    b.view.shape()
                ),
            ));
        }
        let weight = add(&mut jobs, w);
        let bias = add(&mut jobs, b);
        linears.push(LinearPlan {
            index: j,
            fin,
            fout,
            weight,
            bias,
        });
    }
    if linears.is_empty() {
        return Err(Error::weights(
            path,
            None,
            "no classifier layers found (`classifier.N.weight`, or timm's `pre_logits.fc1`/`head.fc`)",
        ));
    }

    // ---- metadata (cheap errors before the conversion)
    let mut meta = parse_metadata(&file_meta, path)?;

    // ---- convert every tensor used, in parallel
    let mut data: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|e| to_f32(e, path))
        .collect::<Result<_>>()?;
    let mut dtypes: BTreeSet<String> = BTreeSet::new();
    for e in &jobs {
        dtypes.insert(e.view.dtype().to_string());
    }
    let mut take = |j: Job| std::mem::take(&mut data[j]);

    // ---- assemble
    let mut features = Vec::new();
    for c in convs {
        let mut weight = take(c.weight);
        let mut bias = c.bias.map(&mut take).unwrap_or_else(|| vec![0.0; c.cout]);
        if let Some(bn) = c.bn {
            let var = take(bn.var);
            if let Some(k) = var.iter().position(|&v| v < 0.0) {
                let canon = format!("features.{}.running_var", c.conv_index + 1);
                return Err(t.err(&canon, format!("negative variance {} at index {k}", var[k])));
            }
            let mean = take(bn.mean);
            let gamma = bn.gamma.map(&mut take);
            let beta = bn.beta.map(&mut take);
            fold_bn(
                &mut weight,
                &mut bias,
                gamma.as_deref(),
                beta.as_deref(),
                &mean,
                &var,
            );
        }
        features.push(FeatureStage::Conv(ConvLayer {
            conv_index: c.conv_index,
            relu_index: c.relu_index,
            cin: c.cin,
            cout: c.cout,
            weight,
            bias,
        }));
        if let Some(index) = c.pool_after {
            features.push(FeatureStage::MaxPool { index });
        }
    }
    let n_lin = linears.len();
    let classifier: Vec<LinearLayer> = linears
        .into_iter()
        .enumerate()
        .map(|(k, l)| LinearLayer {
            index: l.index,
            fin: l.fin,
            fout: l.fout,
            relu: k + 1 < n_lin,
            weight: take(l.weight),
            bias: take(l.bias),
        })
        .collect();

    meta.source = path.to_owned();
    meta.dtypes = dtypes.into_iter().collect();
    let mut model = Vgg {
        features,
        classifier,
        meta,
    };
    model.validate().map_err(|msg| {
        // The message starts with the canonical tensor name: report it as the file spells it.
        match msg.split_once(": ") {
            Some((canon, rest)) if t.get(canon).is_some() => t.err(canon, rest),
            _ => Error::weights(path, None, msg),
        }
    })?;

    let classes = model.num_classes();
    match &model.meta.labels {
        Some(labels) if labels.len() != classes => {
            return Err(Error::weights(
                path,
                None,
                format!(
                    "metadata `labels`: {} labels but the classifier has {classes} classes",
                    labels.len()
                ),
            ))
        }
        None if classes == 1000 => model.meta.labels = Some(imagenet_labels()),
        _ => {}
    }
    if model.meta.arch.is_none() {
        model.meta.arch = infer_arch(&model);
    }
    Ok(model)
}

/// Fold an inference-mode BatchNorm into the conv before it:
/// `w' = w·γ/√(var+ε)`, `b' = (b − mean)·γ/√(var+ε) + β`.
fn fold_bn(
    weight: &mut [f32],
    bias: &mut [f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    mean: &[f32],
    var: &[f32],
) {
    let cout = bias.len();
    let per = weight.len() / cout;
    let scale: Vec<f64> = (0..cout)
        .map(|o| gamma.map_or(1.0, |g| g[o] as f64) / (var[o] as f64 + BN_EPS).sqrt())
        .collect();
    weight
        .par_chunks_mut(per.max(1))
        .zip(scale.par_iter())
        .for_each(|(w, &s)| w.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32));
    for o in 0..cout {
        let b = (bias[o] as f64 - mean[o] as f64) * scale[o] + beta.map_or(0.0, |b| b[o] as f64);
        bias[o] = b as f32;
    }
}

/// Elements per conversion chunk (a parallel work unit).
const CHUNK: usize = 1 << 16;

/// Convert one tensor to f32, rejecting other dtypes and non-finite values.
fn to_f32(e: &Entry, path: &str) -> Result<Vec<f32>> {
    let view = &e.view;
    let n: usize = view.shape().iter().product();
    let dtype = view.dtype();
    let esize = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(Error::weights(
                path,
                Some(&e.file_name),
                format!("unsupported dtype {other} (expected F32, F16 or BF16)"),
            ))
        }
    };
    let src = view.data();
    debug_assert_eq!(src.len(), n * esize);
    // Allocated zeroed (calloc: lazily mapped pages for big tensors), filled in parallel.
    let mut out = vec![0f32; n];
    let bad = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .filter_map(|(ci, o)| {
            let s = &src[ci * CHUNK * esize..(ci * CHUNK + o.len()) * esize];
            match dtype {
                Dtype::F32 => convert_f32(s, o),
                Dtype::F16 => convert_half::<f16>(s, o),
                _ => convert_half::<bf16>(s, o),
            }
            o.iter()
                .position(|v| !v.is_finite())
                .map(|k| ci * CHUNK + k)
        })
        .min();
    if let Some(k) = bad {
        return Err(Error::weights(
            path,
            Some(&e.file_name),
            format!(
                "non-finite value ({}) at index {} (flat index {k} of {n})",
                out[k],
                unravel(k, view.shape())
            ),
        ));
    }
    Ok(out)
}

fn convert_f32(src: &[u8], out: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, f32>(src) {
        Ok(s) if cfg!(target_endian = "little") => out.copy_from_slice(s),
        // Unaligned data (a header whose length is not a multiple of 4) or a big-endian host.
        _ => {
            for (d, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
    }
}

trait Half: bytemuck::Pod {
    fn from_le(b: [u8; 2]) -> Self;
    fn to_f32_slice(src: &[Self], out: &mut [f32]);
}
impl Half for f16 {
    fn from_le(b: [u8; 2]) -> Self {
        f16::from_le_bytes(b)
    }
    fn to_f32_slice(src: &[Self], out: &mut [f32]) {
        src.convert_to_f32_slice(out)
    }
}
impl Half for bf16 {
    fn from_le(b: [u8; 2]) -> Self {
        bf16::from_le_bytes(b)
    }
    fn to_f32_slice(src: &[Self], out: &mut [f32]) {
        src.convert_to_f32_slice(out)
    }
}

fn convert_half<H: Half>(src: &[u8], out: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, H>(src) {
        Ok(s) if cfg!(target_endian = "little") => H::to_f32_slice(s, out),
        _ => {
            let mut tmp = Vec::with_capacity(out.len());
            tmp.extend(src.chunks_exact(2).map(|c| H::from_le([c[0], c[1]])));
            H::to_f32_slice(&tmp, out);
        }
    }
}

/// Flat index → `[i, j, ...]` for messages.
fn unravel(mut k: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (d, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            idx[d] = k % s;
            k /= s;
        }
    }
    format!("{idx:?}")
}

fn parse_metadata(md: &HashMap<String, String>, path: &str) -> Result<ModelMeta> {
    let bad =
        |key: &str, msg: String| Error::weights(path, None, format!("metadata `{key}`: {msg}"));
    let mut meta = ModelMeta::default();
    if let Some(s) = md.get("input_size") {
        let v: usize = s.trim().parse().map_err(|_| {
            bad(
                "input_size",
                format!("expected a positive integer, found `{s}`"),
            )
        })?;
        if !(MIN_INPUT_SIZE..=MAX_INPUT_SIZE).contains(&v) {
            return Err(bad(
                "input_size",
                format!("{v} is out of range ({MIN_INPUT_SIZE}..={MAX_INPUT_SIZE})"),
            ));
        }
        meta.input_size = v;
    }
    let triple = |key: &str, default: [f32; 3], positive: bool| -> Result<[f32; 3]> {
        let Some(s) = md.get(key) else {
            return Ok(default);
        };
        let v: Vec<f64> = serde_json::from_str(s).map_err(|_| {
            bad(
                key,
                format!("expected a JSON array of 3 numbers like {default:?}, found `{s}`"),
            )
        })?;
        if v.len() != 3 {
            return Err(bad(
                key,
                format!("expected 3 numbers (R, G, B), found {}", v.len()),
            ));
        }
        if positive && v.iter().any(|&x| x <= 0.0) {
            return Err(bad(key, format!("every value must be > 0, found `{s}`")));
        }
        let out = [v[0] as f32, v[1] as f32, v[2] as f32];
        if out.iter().any(|x| !x.is_finite()) {
            return Err(bad(key, format!("values out of range: `{s}`")));
        }
        Ok(out)
    };
    meta.mean = triple("mean", IMAGENET_MEAN, false)?;
    meta.std = triple("std", IMAGENET_STD, true)?;
    if let Some(s) = md.get("labels") {
        let labels: Vec<String> = serde_json::from_str(s)
            .map_err(|e| bad("labels", format!("expected a JSON array of strings ({e})")))?;
        meta.labels = Some(labels);
    }
    meta.arch = md.get("arch").cloned();
    Ok(meta)
}

/// Name the torchvision architecture when the channel plan and head match one.
fn infer_arch(m: &Vgg) -> Option<String> {
    const CONFIGS: [(&str, &[usize]); 4] = [
        (
            "vgg11",
            &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0],
        ),
        (
            "vgg13",
            &[
                64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0,
            ],
        ),
        ("vgg16", crate::model::VGG16_CONFIG),
        (
            "vgg19",
            &[
                64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512,
                512, 512, 0,
            ],
        ),
    ];
    let cfg: Vec<usize> = m
        .features
        .iter()
        .map(|s| match s {
            FeatureStage::Conv(c) => c.cout,
            FeatureStage::MaxPool { .. } => 0,
        })
        .collect();
    let head: Vec<usize> = m.classifier.iter().map(|l| l.fout).collect();
    let bn = m.convs().any(|c| c.relu_index == c.conv_index + 2);
    CONFIGS
        .iter()
        .find(|(_, c)| *c == cfg.as_slice())
        .filter(|_| head == [4096, 4096, 1000])
        .map(|(name, _)| format!("{name}{}", if bn { "_bn" } else { "" }))
}

// ---------------------------------------------------------------------------------------------
// Saving

struct SaveTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for SaveTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn encode(v: &[f32], dtype: Dtype) -> Cow<'_, [u8]> {
    match dtype {
        Dtype::F32 if cfg!(target_endian = "little") => Cow::Borrowed(bytemuck::cast_slice(v)),
        Dtype::F32 => Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        _ => {
            let mut out = vec![0u8; v.len() * 2];
            out.par_chunks_mut(CHUNK * 2)
                .zip(v.par_chunks(CHUNK))
                .for_each(|(o, s)| {
                    for (d, &x) in o.chunks_exact_mut(2).zip(s) {
                        let b = if dtype == Dtype::F16 {
                            f16::from_f32(x).to_le_bytes()
                        } else {
                            bf16::from_f32(x).to_le_bytes()
                        };
                        d.copy_from_slice(&b);
                    }
                });
            Cow::Owned(out)
        }
    }
}

/// Check that the layer indices are the ones the loader infers from torchvision numbering, so
/// that a saved model loads back identically.
fn check_layout(model: &Vgg) -> std::result::Result<(), String> {
    let mut next = 0;
    let mut prev_conv = false;
    for s in &model.features {
        match s {
            FeatureStage::Conv(c) => {
                if c.conv_index != next {
                    return Err(format!(
                        "conv features.{} should be at index {next} in torchvision numbering",
                        c.conv_index
                    ));
                }
                if c.relu_index != c.conv_index + 1 && c.relu_index != c.conv_index + 2 {
                    return Err(format!(
                        "conv features.{}: ReLU index {} is neither {} nor {} (_bn)",
                        c.conv_index,
                        c.relu_index,
                        c.conv_index + 1,
                        c.conv_index + 2
                    ));
                }
                next = c.relu_index + 1;
                prev_conv = true;
            }
            FeatureStage::MaxPool { index } => {
                if !prev_conv || *index != next {
                    return Err(format!(
                        "max-pool features.{index}: torchvision numbering allows one max-pool right after a conv's ReLU (index {next})"
                    ));
                }
                next = index + 1;
                prev_conv = false;
            }
        }
    }
    if prev_conv {
        return Err("the features must end with a max-pool (torchvision numbering implies one after the last conv)".into());
    }
    if model
        .classifier
        .windows(2)
        .any(|w| w[0].index >= w[1].index)
    {
        return Err("classifier indices must increase".into());
    }
    Ok(())
}

/// Save a model as torchvision-named safetensors (`dtype`: "F32", "F16" or "BF16"), with its
/// metadata (`input_size`, `mean`, `std`, `labels`, `arch`). Convs of `_bn` models (ReLU at
/// conv+2) are written with an identity BatchNorm so that the indices load back unchanged.
pub fn save(model: &Vgg, path: &Path, dtype: &str) -> Result<()> {
    let dt = match dtype.to_ascii_uppercase().as_str() {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        _ => {
            return Err(Error::Usage(format!(
                "cannot save weights as `{dtype}`: expected F32, F16 or BF16"
            )))
        }
    };
    model
        .validate()
        .and_then(|_| check_layout(model))
        .map_err(|m| {
            Error::Invalid(format!(
                "cannot save this model as torchvision VGG weights: {m}"
            ))
        })?;

    let mut tensors: Vec<(String, SaveTensor)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, data: Cow<'static, [u8]>, dtype: Dtype| {
        tensors.push((name, SaveTensor { dtype, shape, data }));
    };
    // Identity BatchNorm: γ = 1, β = 0, mean = 0, var = 1 − ε (so √(var+ε) = 1).
    let ones = |n: usize| encode(&vec![1.0; n], dt).into_owned();
    let zeros = |n: usize| encode(&vec![0.0; n], dt).into_owned();
    let var1 = |n: usize| encode(&vec![(1.0 - BN_EPS) as f32; n], dt).into_owned();
    let mut borrowed: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for c in model.convs() {
        let i = c.conv_index;
        borrowed.push((
            format!("features.{i}.weight"),
            vec![c.cout, c.cin, 3, 3],
            &c.weight,
        ));
        borrowed.push((format!("features.{i}.bias"), vec![c.cout], &c.bias));
        if c.relu_index == i + 2 {
            let b = i + 1;
            put(
                format!("features.{b}.weight"),
                vec![c.cout],
                Cow::Owned(ones(c.cout)),
                dt,
            );
            put(
                format!("features.{b}.bias"),
                vec![c.cout],
                Cow::Owned(zeros(c.cout)),
                dt,
            );
            put(
                format!("features.{b}.running_mean"),
                vec![c.cout],
                Cow::Owned(zeros(c.cout)),
                dt,
            );
            put(
                format!("features.{b}.running_var"),
                vec![c.cout],
                Cow::Owned(var1(c.cout)),
                dt,
            );
            put(
                format!("features.{b}.num_batches_tracked"),
                vec![],
                Cow::Owned(0i64.to_le_bytes().to_vec()),
                Dtype::I64,
            );
        }
    }
    for l in &model.classifier {
        let j = l.index;
        borrowed.push((
            format!("classifier.{j}.weight"),
            vec![l.fout, l.fin],
            &l.weight,
        ));
        borrowed.push((format!("classifier.{j}.bias"), vec![l.fout], &l.bias));
    }
    let mut all: Vec<(String, SaveTensor)> = tensors;
    all.extend(borrowed.into_iter().map(|(name, shape, v)| {
        (
            name,
            SaveTensor {
                dtype: dt,
                shape,
                data: encode(v, dt),
            },
        )
    }));

    let mut md = HashMap::new();
    let m = &model.meta;
    md.insert("input_size".to_owned(), m.input_size.to_string());
    md.insert("mean".to_owned(), serde_json::to_string(&m.mean).unwrap());
    md.insert("std".to_owned(), serde_json::to_string(&m.std).unwrap());
    if let Some(labels) = &m.labels {
        md.insert("labels".to_owned(), serde_json::to_string(labels).unwrap());
    }
    if let Some(arch) = &m.arch {
        md.insert("arch".to_owned(), arch.clone());
    }
    md.insert("format".to_owned(), "pt".to_owned());
    safetensors::serialize_to_file(all, Some(md), path)
        .map_err(|e| Error::output(path, format!("cannot write safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_labels_are_torchvision_order() {
        let l = imagenet_labels();
        assert_eq!(l.len(), 1000);
        assert_eq!(l[0], "tench");
        assert_eq!(l[1], "goldfish");
        assert_eq!(l[999], "toilet tissue");
        assert!(l.iter().all(|s| !s.is_empty() && s.trim() == s));
    }

    #[test]
    fn prefixes_and_timm_names() {
        assert_eq!(
            strip_prefixes("module.model.features.0.weight"),
            "features.0.weight"
        );
        assert_eq!(strip_prefixes("features.0.weight"), "features.0.weight");
        assert_eq!(
            timm_to_torchvision("pre_logits.fc1.weight").as_deref(),
            Some("classifier.0.weight")
        );
        assert_eq!(
            timm_to_torchvision("head.fc.bias").as_deref(),
            Some("classifier.6.bias")
        );
        assert_eq!(timm_to_torchvision("features.0.weight"), None);
        assert_eq!(indexed("features.12.bias", "features"), Some((12, "bias")));
        assert_eq!(indexed("features.x.bias", "features"), None);
        assert_eq!(unravel(7, &[2, 2, 2]), "[1, 1, 1]");
    }

    #[test]
    fn save_rejects_non_torchvision_layouts() {
        let mut m = Vgg::random_from_config(&[4, 0], &[3], 1, 32);
        m.features.pop(); // no pool after the last conv
        let dir =
            std::env::temp_dir().join(format!("scorecam-weights-unit-{}", std::process::id()));
        let e = save(&m, &dir.join("x.safetensors"), "F32").unwrap_err();
        assert!(e.to_string().contains("max-pool"), "{e}");
        let m = Vgg::random_from_config(&[4, 0], &[3], 1, 32);
        let e = save(&m, &dir.join("x.safetensors"), "F64").unwrap_err();
        assert!(e.to_string().contains("F64"), "{e}");
    }
}
