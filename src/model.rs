//! The VGG layer list: what the weights describe, independent of any backend.
//!
//! A VGG is `features` (Conv3x3+ReLU and MaxPool2 stages), AdaptiveAvgPool2d(7×7), flatten in
//! C,H,W order, then `classifier` (Linear layers, ReLU between them, none after the last).
//! Module indices follow torchvision's numbering so that `--layer features.N` means what it means
//! in PyTorch. BatchNorm (the `_bn` variants) is folded into the conv at load time.

/// One conv3×3 (pad 1, stride 1) followed by ReLU. Weights in PyTorch's OIHW layout.
#[derive(Clone, Debug)]
pub struct ConvLayer {
    /// torchvision index of the conv module (`features.{conv_index}`).
    pub conv_index: usize,
    /// torchvision index of the ReLU after it (`conv_index+1`, or `+2` in `_bn` models).
    pub relu_index: usize,
    pub cin: usize,
    pub cout: usize,
    /// `[cout, cin, 3, 3]`
    pub weight: Vec<f32>,
    /// `[cout]`
    pub bias: Vec<f32>,
}

/// One stage of `features`.
#[derive(Clone, Debug)]
pub enum FeatureStage {
    Conv(ConvLayer),
    /// MaxPool2d(2, 2) at torchvision index `index`.
    MaxPool {
        index: usize,
    },
}

/// What a layer of the forward pass is (for per-layer timing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Conv,
    MaxPool,
    AvgPool,
    Linear,
}

impl LayerKind {
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Conv => "conv",
            LayerKind::MaxPool => "maxpool",
            LayerKind::AvgPool => "avgpool",
            LayerKind::Linear => "linear",
        }
    }
}

/// One layer of a forward pass and its work (see [`Vgg::layer_costs`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCost {
    /// torchvision's module name (`features.0`, `classifier.6`) or `avgpool`.
    pub name: String,
    pub kind: LayerKind,
    pub flops: u64,
    pub bytes: u64,
}

/// One Linear layer of the classifier. Weights `[fout, fin]` (PyTorch layout).
#[derive(Clone, Debug)]
pub struct LinearLayer {
    /// torchvision index (`classifier.{index}`).
    pub index: usize,
    pub fin: usize,
    pub fout: usize,
    /// ReLU after this layer (all but the last).
    pub relu: bool,
    /// `[fout, fin]`; `fin` is in C,H,W order of the 7×7 pooled features for the first layer.
    pub weight: Vec<f32>,
    /// `[fout]`
    pub bias: Vec<f32>,
}

/// Preprocessing and labelling facts carried by the weights file.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub input_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// One label per class, from the file's metadata or `weights/imagenet_classes.txt`.
    pub labels: Option<Vec<String>>,
    pub arch: Option<String>,
    /// Where the weights came from (a path, or `random(seed)`).
    pub source: String,
    /// The dtypes found in the file (F32/F16/BF16), for `inspect`.
    pub dtypes: Vec<String>,
}

impl Default for ModelMeta {
    fn default() -> Self {
        ModelMeta {
            input_size: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            labels: None,
            arch: None,
            source: String::new(),
            dtypes: Vec::new(),
        }
    }
}

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// AdaptiveAvgPool2d output side between features and classifier.
pub const POOLED: usize = 7;

/// A whole VGG network with host f32 weights.
#[derive(Clone, Debug)]
pub struct Vgg {
    pub features: Vec<FeatureStage>,
    pub classifier: Vec<LinearLayer>,
    pub meta: ModelMeta,
}

/// Where to take the activations that Score-CAM turns into masks: the output of one `features`
/// module. Conv and ReLU are one stage here; `pre_relu` selects the conv's own output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capture {
    /// Index into [`Vgg::features`].
    pub stage: usize,
    /// For a conv stage: take the output before the ReLU. Ignored for pools.
    pub pre_relu: bool,
}

/// Shape of a feature map: channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Vgg {
    pub fn num_classes(&self) -> usize {
        self.classifier.last().map(|l| l.fout).unwrap_or(0)
    }

    pub fn input_size(&self) -> usize {
        self.meta.input_size
    }

    pub fn convs(&self) -> impl Iterator<Item = &ConvLayer> {
        self.features.iter().filter_map(|s| match s {
            FeatureStage::Conv(c) => Some(c),
            FeatureStage::MaxPool { .. } => None,
        })
    }

    /// Output shape of every feature stage for a square input of side `s`.
    pub fn stage_shapes(&self, s: usize) -> Vec<MapShape> {
        let mut shape = MapShape { c: 3, h: s, w: s };
        self.features
            .iter()
            .map(|stage| {
                shape = match stage {
                    FeatureStage::Conv(c) => MapShape { c: c.cout, ..shape },
                    FeatureStage::MaxPool { .. } => MapShape {
                        c: shape.c,
                        h: shape.h / 2,
                        w: shape.w / 2,
                    },
                };
                shape
            })
            .collect()
    }

    /// Shape of the features' output (before the adaptive pool).
    pub fn features_shape(&self, s: usize) -> MapShape {
        self.stage_shapes(s)
            .last()
            .copied()
            .unwrap_or(MapShape { c: 3, h: s, w: s })
    }

    /// The default Score-CAM layer: the ReLU output of the last conv (VGG16: `features.29`).
    pub fn default_capture(&self) -> Capture {
        let stage = self
            .features
            .iter()
            .rposition(|s| matches!(s, FeatureStage::Conv(_)))
            .unwrap_or(0);
        Capture {
            stage,
            pre_relu: false,
        }
    }

    /// Resolve `features.N` (torchvision numbering) to a capture point, as the reference
    /// implementations see that module's output:
    /// - a ReLU index: its output;
    /// - a conv index (and a BatchNorm index in `_bn` models): also the ReLU's output. torchvision's
    ///   ReLUs run in place, and both references keep the hooked tensor itself (the official code
    ///   stores `output`; pytorch-grad-cam stores `output.cpu().detach()`, the same storage on the
    ///   CPU), so the ReLU overwrites it before it is read. (pytorch-grad-cam on a GPU copies in
    ///   `.cpu()` and so sees the values before the ReLU: `features.N:pre-relu` gives those.)
    /// - the conv index of a `_bn` model is the conv's output before BatchNorm, which the folded
    ///   model does not have: refused, naming the alternatives;
    /// - a MaxPool index: its output.
    pub fn resolve_layer(&self, name: &str) -> Result<Capture, String> {
        let (base, pre) = match name.strip_suffix(":pre-relu") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let n: usize = base
            .strip_prefix("features.")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                format!(
                    "layer `{name}`: expected `features.N` with N a conv, ReLU or pool index \
                     (optionally `:pre-relu` on a conv)"
                )
            })?;
        for (stage, s) in self.features.iter().enumerate() {
            match s {
                FeatureStage::Conv(c) if (c.conv_index..=c.relu_index).contains(&n) => {
                    let bn = c.relu_index - c.conv_index > 1;
                    if bn && n == c.conv_index && !pre {
                        return Err(format!(
                            "layer `{name}` is the conv before BatchNorm, which is folded into \
                             the conv here; use features.{} (after BatchNorm and ReLU) or \
                             features.{}:pre-relu (after BatchNorm)",
                            c.relu_index,
                            c.relu_index - 1
                        ));
                    }
                    if pre && n == c.relu_index {
                        return Err(format!(
                            "layer `{name}`: `:pre-relu` goes with the conv (features.{}), not \
                             with its ReLU",
                            c.relu_index - 1
                        ));
                    }
                    return Ok(Capture {
                        stage,
                        pre_relu: pre,
                    });
                }
                FeatureStage::MaxPool { index } if *index == n => {
                    if pre {
                        return Err(format!("layer `{name}`: `:pre-relu` goes with a conv"));
                    }
                    return Ok(Capture {
                        stage,
                        pre_relu: false,
                    });
                }
                _ => {}
            }
        }
        Err(format!(
            "layer `{name}` is not a module of this model's features (valid: {}; a conv's own \
             index names its ReLU's output)",
            self.layer_names().join(", ")
        ))
    }

    /// Does `name` (a `--layer` value) name a conv's (or a BatchNorm's) own output — read after
    /// the in-place ReLU, but whose gradient, as pytorch-grad-cam's tensor hook sees it, is taken
    /// before the ReLU? (Not for `:pre-relu` names, whose activations are before it too.)
    pub fn names_conv_output(&self, name: &str) -> bool {
        let Some(n) = name
            .strip_prefix("features.")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return false;
        };
        self.convs()
            .any(|c| (c.conv_index..c.relu_index).contains(&n))
    }

    /// Name of a capture point in torchvision numbering (the ReLU's for a conv's output after its
    /// ReLU; `features.N:pre-relu` before it).
    pub fn capture_name(&self, cap: Capture) -> String {
        match &self.features[cap.stage] {
            FeatureStage::Conv(c) if cap.pre_relu => {
                format!("features.{}:pre-relu", c.relu_index - 1)
            }
            FeatureStage::Conv(c) => format!("features.{}", c.relu_index),
            FeatureStage::MaxPool { index } => format!("features.{index}"),
        }
    }

    /// Every selectable layer name, in order.
    /// The name of every distinct capture point, in order: per conv `features.N:pre-relu` and
    /// its ReLU's `features.M`, per pool `features.P` (a conv's own index is a second name of its
    /// ReLU's output: see [`Vgg::resolve_layer`]).
    pub fn layer_names(&self) -> Vec<String> {
        (0..self.features.len())
            .flat_map(|stage| {
                let pre =
                    matches!(self.features[stage], FeatureStage::Conv(_)).then_some(Capture {
                        stage,
                        pre_relu: true,
                    });
                pre.into_iter().chain([Capture {
                    stage,
                    pre_relu: false,
                }])
            })
            .map(|cap| self.capture_name(cap))
            .collect()
    }

    /// Shape of the activations at a capture point for input side `s`.
    pub fn capture_shape(&self, cap: Capture, s: usize) -> MapShape {
        self.stage_shapes(s)[cap.stage]
    }

    pub fn parameter_count(&self) -> usize {
        self.convs()
            .map(|c| c.weight.len() + c.bias.len())
            .chain(
                self.classifier
                    .iter()
                    .map(|l| l.weight.len() + l.bias.len()),
            )
            .sum()
    }

    /// Each layer of a forward pass of `rows` inputs at side `s`, in execution order: every
    /// feature stage, the adaptive average pool when it is not the identity (the map is not
    /// already 7×7), every Linear. FLOPs count 2 per multiply-accumulate; bytes are the
    /// activations read and written at `elem_bytes` per value (weights excluded). The per-layer
    /// timing of both backends follows this list.
    pub fn layer_costs(&self, s: usize, rows: usize, elem_bytes: usize) -> Vec<LayerCost> {
        let shapes = self.stage_shapes(s);
        let rows = rows as u64;
        let eb = elem_bytes as u64;
        let vol = |m: &MapShape| (m.c * m.h * m.w) as u64;
        let mut out = Vec::with_capacity(shapes.len() + 1 + self.classifier.len());
        let mut prev = MapShape { c: 3, h: s, w: s };
        for (stage, shape) in self.features.iter().zip(&shapes) {
            let (name, kind, flops) = match stage {
                FeatureStage::Conv(c) => (
                    format!("features.{}", c.conv_index),
                    LayerKind::Conv,
                    2 * (shape.h * shape.w * c.cout * c.cin * 9) as u64,
                ),
                FeatureStage::MaxPool { index } => {
                    (format!("features.{index}"), LayerKind::MaxPool, 0)
                }
            };
            out.push(LayerCost {
                name,
                kind,
                flops: rows * flops,
                bytes: rows * eb * (vol(&prev) + vol(shape)),
            });
            prev = *shape;
        }
        if (prev.h, prev.w) != (POOLED, POOLED) {
            let pooled = MapShape {
                c: prev.c,
                h: POOLED,
                w: POOLED,
            };
            out.push(LayerCost {
                name: "avgpool".into(),
                kind: LayerKind::AvgPool,
                flops: 0,
                bytes: rows * eb * (vol(&prev) + vol(&pooled)),
            });
        }
        for l in &self.classifier {
            out.push(LayerCost {
                name: format!("classifier.{}", l.index),
                kind: LayerKind::Linear,
                flops: rows * 2 * (l.fin * l.fout) as u64,
                bytes: rows * eb * (l.fin + l.fout) as u64,
            });
        }
        out
    }

    /// Multiply-accumulates of one forward pass at input side `s` (×2 for FLOPs).
    pub fn macs(&self, s: usize) -> u64 {
        self.layer_costs(s, 1, 0)
            .iter()
            .map(|l| l.flops)
            .sum::<u64>()
            / 2
    }

    /// Check that the layers chain: each conv's `cin` is the previous `cout`, the first takes 3
    /// channels, and the first Linear takes `C×7×7` features. Returns a message naming the layer.
    pub fn validate(&self) -> Result<(), String> {
        let mut c = 3;
        let mut any_conv = false;
        for s in &self.features {
            if let FeatureStage::Conv(l) = s {
                if l.cin != c {
                    return Err(format!(
                        "features.{}.weight: takes {} input channels but the previous layer gives {}",
                        l.conv_index, l.cin, c
                    ));
                }
                c = l.cout;
                any_conv = true;
            }
        }
        if !any_conv {
            return Err("no conv layers (`features.N.weight`) found".into());
        }
        let mut fin = c * POOLED * POOLED;
        if self.classifier.is_empty() {
            return Err("no classifier layers (`classifier.N.weight`) found".into());
        }
        for l in &self.classifier {
            if l.fin != fin {
                return Err(format!(
                    "classifier.{}.weight: takes {} inputs but the previous layer gives {}",
                    l.index, l.fin, fin
                ));
            }
            fin = l.fout;
        }
        let pools = self
            .features
            .iter()
            .filter(|s| matches!(s, FeatureStage::MaxPool { .. }))
            .count();
        let s = self.meta.input_size;
        if s >> pools == 0 {
            return Err(format!(
                "input size {s} is too small for {pools} max-pools (the features would be empty)"
            ));
        }
        Ok(())
    }

    /// The weight layers from the top down — the last Linear first, the first conv last — by
    /// name (`classifier.6`, ..., `features.0`): the order of a cascading randomization.
    pub fn weight_layers_from_top(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .classifier
            .iter()
            .rev()
            .map(|l| format!("classifier.{}", l.index))
            .collect();
        names.extend(
            self.convs()
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .map(|c| format!("features.{}", c.conv_index)),
        );
        names
    }

    /// A copy with its top `n` weight layers (see [`Vgg::weight_layers_from_top`]) re-initialized
    /// as [`Vgg::random_from_config`] initializes them (He-normal weights, small positive
    /// biases), from `seed`: Adebayo et al.'s cascading randomization for the sanity check.
    pub fn randomize_from_top(&self, n: usize, seed: u64) -> Vgg {
        let mut m = self.clone();
        let mut rng = SplitMix64(seed);
        let linears = m.classifier.len();
        for l in m.classifier.iter_mut().rev().take(n) {
            let std = (2.0 / l.fin as f32).sqrt();
            l.weight.iter_mut().for_each(|v| *v = rng.normal() * std);
            l.bias.iter_mut().for_each(|v| *v = 0.01 * rng.uniform());
        }
        let convs = n.saturating_sub(linears);
        let mut done = 0;
        for stage in m.features.iter_mut().rev() {
            if done == convs {
                break;
            }
            if let FeatureStage::Conv(c) = stage {
                let std = (2.0 / (c.cin as f32 * 9.0)).sqrt();
                c.weight.iter_mut().for_each(|v| *v = rng.normal() * std);
                c.bias
                    .iter_mut()
                    .for_each(|v| *v = 0.01 + 0.01 * rng.uniform());
                done += 1;
            }
        }
        m.meta.source = format!(
            "{} (top {n} layers randomized, seed {seed})",
            self.meta.source
        );
        m
    }

    /// The torchvision VGG16 architecture (configuration "D") with deterministic He-initialised
    /// weights: for benchmarks and tests without a download. Biases are small and positive so
    /// activations do not die out layer after layer.
    pub fn random_vgg16(seed: u64) -> Vgg {
        Self::random_from_config(VGG16_CONFIG, &[4096, 4096, 1000], seed, 224)
    }

    /// Build a VGG from a torchvision-style config (channel counts, 0 for a max-pool) and the
    /// classifier's widths, with He-initialised weights from `seed`.
    pub fn random_from_config(cfg: &[usize], head: &[usize], seed: u64, input_size: usize) -> Vgg {
        let mut rng = SplitMix64(seed);
        let mut features = Vec::new();
        let (mut idx, mut cin) = (0, 3);
        for &v in cfg {
            if v == 0 {
                features.push(FeatureStage::MaxPool { index: idx });
                idx += 1;
            } else {
                let std = (2.0 / (cin as f32 * 9.0)).sqrt();
                features.push(FeatureStage::Conv(ConvLayer {
                    conv_index: idx,
                    relu_index: idx + 1,
                    cin,
                    cout: v,
                    weight: (0..v * cin * 9).map(|_| rng.normal() * std).collect(),
                    bias: (0..v).map(|_| 0.01 + 0.01 * rng.uniform()).collect(),
                }));
                idx += 2;
                cin = v;
            }
        }
        let mut classifier = Vec::new();
        let mut fin = cin * POOLED * POOLED;
        for (j, &fout) in head.iter().enumerate() {
            let std = (2.0 / fin as f32).sqrt();
            classifier.push(LinearLayer {
                index: 3 * j,
                fin,
                fout,
                relu: j + 1 < head.len(),
                weight: (0..fout * fin).map(|_| rng.normal() * std).collect(),
                bias: (0..fout).map(|_| 0.01 * rng.uniform()).collect(),
            });
            fin = fout;
        }
        Vgg {
            features,
            classifier,
            meta: ModelMeta {
                input_size,
                arch: Some("vgg16 (random)".into()),
                source: format!("random(seed={seed})"),
                dtypes: vec!["F32".into()],
                ..ModelMeta::default()
            },
        }
    }
}

/// torchvision's VGG16 ("D") features: channel counts, 0 = MaxPool2d(2,2).
pub const VGG16_CONFIG: &[usize] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];

/// Small, fast, reproducible generator for the random models (no external RNG dependency needed
/// for a handful of normals; the stream is part of the `--random-weights SEED` contract).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_costs_add_up_to_the_forward() {
        let m = Vgg::random_from_config(VGG16_CONFIG, &[8, 8, 10], 1, 224);
        let c = m.layer_costs(224, 3, 2);
        // 18 feature stages (13 convs, 5 pools), no average pool at 7×7, 3 Linears.
        assert_eq!(c.len(), 18 + 3);
        assert_eq!(c[0].name, "features.0");
        assert_eq!(c[2].name, "features.4");
        assert_eq!(c[2].kind, LayerKind::MaxPool);
        assert_eq!(c[17].name, "features.30");
        assert_eq!(c[18].name, "classifier.0");
        let flops: u64 = c.iter().map(|l| l.flops).sum();
        assert_eq!(flops, 3 * 2 * m.macs(224));
        // The first pool reads 224²·64 and writes 112²·64 values per row, 2 bytes each.
        assert_eq!(c[2].bytes, 3 * 2 * (224 * 224 * 64 + 112 * 112 * 64));
        // At 256² the features end at 8×8: the average pool is a layer of its own.
        let c = m.layer_costs(256, 1, 4);
        assert_eq!(c.len(), 18 + 1 + 3);
        assert_eq!(c[18].name, "avgpool");
        assert_eq!(c[18].bytes, 4 * 512 * (64 + 49));
    }

    #[test]
    fn vgg16_shapes_and_names() {
        let m = Vgg::random_from_config(VGG16_CONFIG, &[8, 8, 10], 1, 224);
        assert_eq!(m.features_shape(224), MapShape { c: 512, h: 7, w: 7 });
        let cap = m.default_capture();
        assert_eq!(m.capture_name(cap), "features.29");
        assert_eq!(
            m.capture_shape(cap, 224),
            MapShape {
                c: 512,
                h: 14,
                w: 14
            }
        );
        assert_eq!(m.resolve_layer("features.29").unwrap(), cap);
        // A conv index is its output as the references read it: after the in-place ReLU.
        assert_eq!(m.resolve_layer("features.28").unwrap(), cap);
        let pre = Capture {
            stage: cap.stage,
            pre_relu: true,
        };
        assert_eq!(m.resolve_layer("features.28:pre-relu").unwrap(), pre);
        assert_eq!(m.capture_name(pre), "features.28:pre-relu");
        assert!(m.resolve_layer("features.29:pre-relu").is_err());
        assert!(m.resolve_layer("features.30:pre-relu").is_err());
        assert_eq!(
            m.capture_name(m.resolve_layer("features.30").unwrap()),
            "features.30"
        );
        assert!(m.resolve_layer("features.31").is_err());
        assert!(m.resolve_layer("classifier.0").is_err());
        m.validate().unwrap();
    }

    #[test]
    fn vgg16_parameter_count_matches_torchvision() {
        // torchvision.models.vgg16().parameters(): 138,357,544.
        let m = Vgg::random_vgg16(0);
        assert_eq!(m.parameter_count(), 138_357_544);
        // 15.47 GMACs per 224² forward (the commonly quoted figure).
        assert_eq!(m.macs(224) / 10_000_000, 1547);
    }

    #[test]
    fn random_weights_are_deterministic() {
        let a = Vgg::random_from_config(&[4, 0], &[3], 7, 32);
        let b = Vgg::random_from_config(&[4, 0], &[3], 7, 32);
        let c = Vgg::random_from_config(&[4, 0], &[3], 8, 32);
        let w = |m: &Vgg| m.convs().next().unwrap().weight.clone();
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
    }
}
