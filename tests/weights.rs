//! safetensors loading and saving: round trips in every dtype, `_bn` folding, timm and prefixed
//! names, metadata, and every rejected input with the message it must give.

use std::collections::HashMap;

use safetensors::tensor::View;
use safetensors::{Dtype, SafeTensors};
use scorecam_gpu::model::{FeatureStage, Vgg, VGG16_CONFIG};
use scorecam_gpu::{weights, Error};

// ---------------------------------------------------------------------------------------------
// helpers

/// An owned tensor, for writing hand-made files.
#[derive(Clone, Debug)]
struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for T {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.data[..]).into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32t(shape: &[usize], v: &[f32]) -> T {
    assert_eq!(shape.iter().product::<usize>(), v.len());
    T {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn as_f32(t: &T) -> Vec<f32> {
    assert_eq!(t.dtype, Dtype::F32);
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

type Tensors = Vec<(String, T)>;

fn serialize(tensors: &Tensors, meta: Option<HashMap<String, String>>) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t.clone())), meta).unwrap()
}

/// Read every tensor and the metadata of a safetensors buffer.
fn read(bytes: &[u8]) -> (Tensors, HashMap<String, String>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut out: Tensors = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_owned(),
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let (_, md) = SafeTensors::read_metadata(bytes).unwrap();
    (out, md.metadata().clone().unwrap_or_default())
}

fn get<'t>(ts: &'t Tensors, name: &str) -> &'t T {
    &ts.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name}"))
        .1
}

fn set(ts: &mut Tensors, name: &str, t: T) {
    ts.retain(|(n, _)| n != name);
    ts.push((name.to_owned(), t));
}

fn remove(ts: &mut Tensors, name: &str) {
    let before = ts.len();
    ts.retain(|(n, _)| n != name);
    assert_eq!(ts.len() + 1, before, "{name} not in the file");
}

/// Save `m` with `weights::save` and return the file's bytes.
fn saved_bytes(m: &Vgg, dtype: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    weights::save(m, &p, dtype).unwrap();
    std::fs::read(&p).unwrap()
}

fn tiny(seed: u64) -> Vgg {
    Vgg::random_from_config(&[4, 0, 8, 0], &[6, 5], seed, 32)
}

/// Load from bytes, expecting an `Error::Weights` whose message contains every needle.
fn expect_err(bytes: &[u8], needles: &[&str]) -> String {
    let e = weights::load_bytes(bytes, "test.safetensors").expect_err("expected an error");
    check_err(e, needles)
}

fn check_err(e: Error, needles: &[&str]) -> String {
    let msg = e.to_string();
    println!("{msg}");
    assert!(
        matches!(e, Error::Weights { .. }),
        "expected Error::Weights, got {e:?}"
    );
    assert_eq!(e.exit_code(), 2);
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should contain {n:?}");
    }
    msg
}

/// `(conv_index, relu_index)` of every conv and the pool indices.
fn indices(m: &Vgg) -> (Vec<(usize, usize)>, Vec<usize>) {
    let convs = m.convs().map(|c| (c.conv_index, c.relu_index)).collect();
    let pools = m
        .features
        .iter()
        .filter_map(|s| match s {
            FeatureStage::MaxPool { index } => Some(*index),
            _ => None,
        })
        .collect();
    (convs, pools)
}

fn assert_close(a: &[f32], b: &[f32], rel: f32, abs: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * x.abs().max(y.abs()) + abs,
            "{what}[{k}]: {x} vs {y}"
        );
    }
}

fn assert_same_model(a: &Vgg, b: &Vgg, rel: f32, abs: f32) {
    assert_eq!(indices(a), indices(b));
    assert_eq!(a.features.len(), b.features.len());
    for (x, y) in a.convs().zip(b.convs()) {
        assert_eq!((x.cin, x.cout), (y.cin, y.cout));
        assert_close(
            &x.weight,
            &y.weight,
            rel,
            abs,
            &format!("conv {} weight", x.conv_index),
        );
        assert_close(
            &x.bias,
            &y.bias,
            rel,
            abs,
            &format!("conv {} bias", x.conv_index),
        );
    }
    assert_eq!(a.classifier.len(), b.classifier.len());
    for (x, y) in a.classifier.iter().zip(&b.classifier) {
        assert_eq!(
            (x.index, x.fin, x.fout, x.relu),
            (y.index, y.fin, y.fout, y.relu)
        );
        assert_close(
            &x.weight,
            &y.weight,
            rel,
            abs,
            &format!("linear {} weight", x.index),
        );
        assert_close(
            &x.bias,
            &y.bias,
            rel,
            abs,
            &format!("linear {} bias", x.index),
        );
    }
}

/// A `_bn` file in torchvision's numbering (conv i, bn i+1, relu i+2, pool i+3) for a channel
/// config (0 = pool), with deterministic non-trivial BN statistics. The conv bias is omitted
/// where `drop_bias(conv_index)`.
fn bn_tensors(cfg: &[usize], head: &[usize], drop_bias: impl Fn(usize) -> bool) -> Tensors {
    let mut ts = Tensors::new();
    let mut seed = 1u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 // [0, 1)
    };
    let (mut idx, mut cin) = (0, 3);
    for &v in cfg {
        if v == 0 {
            idx += 1;
            continue;
        }
        let w: Vec<f32> = (0..v * cin * 9).map(|_| rnd() - 0.5).collect();
        ts.push((format!("features.{idx}.weight"), f32t(&[v, cin, 3, 3], &w)));
        if !drop_bias(idx) {
            let b: Vec<f32> = (0..v).map(|_| rnd() * 0.2 - 0.1).collect();
            ts.push((format!("features.{idx}.bias"), f32t(&[v], &b)));
        }
        let b = idx + 1;
        let gamma: Vec<f32> = (0..v).map(|_| 0.5 + rnd()).collect();
        let beta: Vec<f32> = (0..v).map(|_| rnd() - 0.5).collect();
        let mean: Vec<f32> = (0..v).map(|_| rnd() - 0.5).collect();
        let var: Vec<f32> = (0..v).map(|_| 0.1 + 2.0 * rnd()).collect();
        ts.push((format!("features.{b}.weight"), f32t(&[v], &gamma)));
        ts.push((format!("features.{b}.bias"), f32t(&[v], &beta)));
        ts.push((format!("features.{b}.running_mean"), f32t(&[v], &mean)));
        ts.push((format!("features.{b}.running_var"), f32t(&[v], &var)));
        ts.push((
            format!("features.{b}.num_batches_tracked"),
            T {
                dtype: Dtype::I64,
                shape: vec![],
                data: 1234i64.to_le_bytes().to_vec(),
            },
        ));
        idx += 3;
        cin = v;
    }
    let mut fin = cin * 49;
    for (j, &fout) in head.iter().enumerate() {
        let w: Vec<f32> = (0..fout * fin).map(|_| (rnd() - 0.5) * 0.1).collect();
        let b: Vec<f32> = (0..fout).map(|_| rnd() * 0.1).collect();
        ts.push((
            format!("classifier.{}.weight", 3 * j),
            f32t(&[fout, fin], &w),
        ));
        ts.push((format!("classifier.{}.bias", 3 * j), f32t(&[fout], &b)));
        fin = fout;
    }
    ts
}

/// Naive 3×3 pad-1 conv output at one point.
#[allow(clippy::too_many_arguments)]
fn conv_at(
    x: &[f32],
    cin: usize,
    s: usize,
    w: &[f32],
    b: f32,
    o: usize,
    h: usize,
    wi: usize,
) -> f32 {
    let mut acc = b as f64;
    for i in 0..cin {
        for kh in 0..3 {
            for kw in 0..3 {
                let (y, xx) = (h as isize + kh as isize - 1, wi as isize + kw as isize - 1);
                if y < 0 || xx < 0 || y >= s as isize || xx >= s as isize {
                    continue;
                }
                let xv = x[(i * s + y as usize) * s + xx as usize] as f64;
                acc += w[((o * cin + i) * 3 + kh) * 3 + kw] as f64 * xv;
            }
        }
    }
    acc as f32
}

// ---------------------------------------------------------------------------------------------
// round trips

#[test]
fn round_trip_f32_f16_bf16() {
    let m = tiny(7);
    let dir = tempfile::tempdir().unwrap();
    // Round to nearest: at most half a unit in the last place, 2^-11 relative for F16 (11
    // significant bits; 2^-25 absolute among its subnormals) and 2^-8 for BF16 (8 bits, f32's
    // exponent range). Truncation errs by up to a whole unit and fails these bounds.
    for (dtype, rel, abs) in [
        ("F32", 0.0, 0.0),
        ("F16", 2f32.powi(-11), 2f32.powi(-25)),
        ("BF16", 2f32.powi(-8), 0.0),
    ] {
        let p = dir.path().join(format!("tiny-{dtype}.safetensors"));
        weights::save(&m, &p, dtype).unwrap();
        let back = weights::load(&p).unwrap();
        assert_same_model(&m, &back, rel, abs);
        assert_eq!(back.meta.dtypes, vec![dtype.to_owned()]);
        assert_eq!(back.meta.source, p.display().to_string());
        assert_eq!(back.meta.input_size, 32);
        assert_eq!(back.meta.mean, m.meta.mean);
        assert_eq!(back.meta.std, m.meta.std);
        assert_eq!(back.meta.arch, m.meta.arch);
        assert_eq!(
            back.meta.labels, None,
            "5 classes and no labels in the file"
        );
        back.validate().unwrap();
    }
    // lower-case dtype names are accepted; others are a usage error
    weights::save(&m, &dir.path().join("l.safetensors"), "bf16").unwrap();
    let e = weights::save(&m, &dir.path().join("x.safetensors"), "F64").unwrap_err();
    assert!(
        matches!(e, Error::Usage(_)) && e.to_string().contains("F64"),
        "{e}"
    );
}

/// Save a model whose first conv weights are `cases[..].0` (f32 bits) as `dtype`, and check
/// the file holds exactly `cases[..].1` (F16/BF16 bits) and loads back as exactly
/// `cases[..].2` (f32 bits).
fn check_half_rounding(dtype: &str, cases: &[(u32, u16, u32)]) {
    let mut m = tiny(21);
    let FeatureStage::Conv(conv) = &mut m.features[0] else {
        unreachable!()
    };
    for (k, &(x, _, _)) in cases.iter().enumerate() {
        conv.weight[k] = f32::from_bits(x);
    }
    let bytes = saved_bytes(&m, dtype);
    let (ts, _) = read(&bytes);
    let t = get(&ts, "features.0.weight");
    assert_eq!(format!("{:?}", t.dtype), dtype);
    let halves: Vec<u16> = t
        .data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let back = weights::load_bytes(&bytes, dtype).unwrap();
    let loaded = &back.convs().next().unwrap().weight;
    for (k, &(x, h, y)) in cases.iter().enumerate() {
        let v = f32::from_bits(x);
        assert_eq!(
            halves[k], h,
            "{dtype}: save of {v:e} ({x:#010x}) wrote {:#06x}, want {h:#06x}",
            halves[k]
        );
        assert_eq!(
            loaded[k].to_bits(),
            y,
            "{dtype}: load of {h:#06x} gave {:e} ({:#010x}), want {:e} ({y:#010x})",
            loaded[k],
            loaded[k].to_bits(),
            f32::from_bits(y)
        );
    }
}

#[test]
fn half_precision_rounds_to_nearest_even() {
    // (f32 bits given to `save`, F16/BF16 bits it must write, f32 bits the loader must give).
    // Round to nearest, ties to even, as PyTorch's `.half()` / `.bfloat16()` do. The values sit
    // just above or below a midpoint (truncation and rounding differ) or exactly on one (even
    // rounding differs from both truncation and ties-away). The loader widens exactly.
    // Expected bits from Python's `struct.pack("<e", x)` (IEEE binary16, round-half-even) and,
    // for BF16, exact rational comparison with the two neighbours.
    check_half_rounding(
        "BF16",
        &[
            (0x3F80_0000, 0x3F80, 0x3F80_0000), // 1.0: exact
            (0x3F80_8001, 0x3F81, 0x3F81_0000), // just above 1 + 2^-8: up (truncation: 0x3F80)
            (0x3F80_7FFF, 0x3F80, 0x3F80_0000), // just below: down
            (0x3F80_8000, 0x3F80, 0x3F80_0000), // tie, 0x3F80 even: down (ties-away: 0x3F81)
            (0x3F81_8000, 0x3F82, 0x3F82_0000), // tie, 0x3F82 even: up (truncation: 0x3F81)
            (0xBF80_8001, 0xBF81, 0xBF81_0000), // negative: by magnitude
            (0xBF81_8000, 0xBF82, 0xBF82_0000), // negative tie to even
            (0x3FFF_FFFF, 0x4000, 0x4000_0000), // carries into the exponent: 2.0
            (0x0001_8000, 0x0002, 0x0002_0000), // subnormal tie to even (truncation: 0x0001)
            (0x0000_C000, 0x0001, 0x0001_0000), // subnormal above the midpoint (truncation: 0)
            (0x8000_0000, 0x8000, 0x8000_0000), // -0.0 keeps its sign
        ],
    );
    check_half_rounding(
        "F16",
        &[
            (0x3F80_0000, 0x3C00, 0x3F80_0000), // 1.0: exact
            (0x3F80_1001, 0x3C01, 0x3F80_2000), // just above 1 + 2^-11: up (truncation: 0x3C00)
            (0x3F80_0FFF, 0x3C00, 0x3F80_0000), // just below: down
            (0x3F80_1000, 0x3C00, 0x3F80_0000), // tie, 0x3C00 even: down (ties-away: 0x3C01)
            (0x3F80_3000, 0x3C02, 0x3F80_4000), // tie, 0x3C02 even: up (truncation: 0x3C01)
            (0xBF80_1001, 0xBC01, 0xBF80_2000), // negative: by magnitude
            (0x3FFF_F000, 0x4000, 0x4000_0000), // tie below 2.0: up to 2.0 (truncation: 0x3FFF)
            (0x477F_E000, 0x7BFF, 0x477F_E000), // 65504, the largest F16
            (0x477F_EF00, 0x7BFF, 0x477F_E000), // 65519: below the midpoint to infinity
            (0x3380_0000, 0x0001, 0x3380_0000), // 2^-24, the smallest subnormal
            (0x33C0_0000, 0x0002, 0x3400_0000), // 1.5·2^-24: subnormal tie to even (trunc.: 1)
            (0x3460_0000, 0x0004, 0x3480_0000), // 3.5·2^-24: tie to even 4 (truncation: 3)
            (0x3300_0000, 0x0000, 0x0000_0000), // 2^-25: tie between 0 and 2^-24, to 0
            (0x3300_0001, 0x0001, 0x3380_0000), // just above 2^-25: up to 2^-24
            (0xB300_0000, 0x8000, 0x8000_0000), // -2^-25: to -0.0, sign kept
        ],
    );
}

#[test]
fn load_bytes_matches_load() {
    let m = tiny(3);
    let bytes = saved_bytes(&m, "F32");
    let a = weights::load_bytes(&bytes, "mem").unwrap();
    assert_same_model(&m, &a, 0.0, 0.0);
    assert_eq!(a.meta.source, "mem");
}

#[test]
fn vgg16_indices_match_torchvision() {
    // VGG16's layer plan with 2 channels per conv: torchvision's numbering, no 500 MB file.
    let cfg: Vec<usize> = VGG16_CONFIG
        .iter()
        .map(|&c| if c == 0 { 0 } else { 2 })
        .collect();
    let m = Vgg::random_from_config(&cfg, &[4, 3], 1, 32);
    let back = weights::load_bytes(&saved_bytes(&m, "F16"), "vgg16-narrow").unwrap();
    let (convs, pools) = indices(&back);
    let conv_idx: Vec<usize> = convs.iter().map(|c| c.0).collect();
    assert_eq!(conv_idx, [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]);
    assert!(convs.iter().all(|&(c, r)| r == c + 1));
    assert_eq!(pools, [4, 9, 16, 23, 30]);
    assert_eq!(back.capture_name(back.default_capture()), "features.29");
}

#[test]
fn vgg16_bn_indices_match_torchvision() {
    let cfg: Vec<usize> = VGG16_CONFIG
        .iter()
        .map(|&c| if c == 0 { 0 } else { 2 })
        .collect();
    let ts = bn_tensors(&cfg, &[4, 3], |_| false);
    let m = weights::load_bytes(&serialize(&ts, None), "vgg16_bn-narrow").unwrap();
    let (convs, pools) = indices(&m);
    let conv_idx: Vec<usize> = convs.iter().map(|c| c.0).collect();
    assert_eq!(conv_idx, [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]);
    assert!(convs.iter().all(|&(c, r)| r == c + 2));
    assert_eq!(pools, [6, 13, 23, 33, 43]);
    assert_eq!(m.capture_name(m.default_capture()), "features.42");
    // The BatchNorm index is read after the in-place ReLU, like the ReLU's own index; its value
    // before the ReLU is `:pre-relu`; the conv's own index (before BatchNorm) is not kept.
    assert_eq!(
        m.resolve_layer("features.41").unwrap(),
        m.resolve_layer("features.42").unwrap()
    );
    assert!(m.resolve_layer("features.41:pre-relu").unwrap().pre_relu);
    let e = m.resolve_layer("features.40").unwrap_err();
    assert!(
        e.contains("before BatchNorm") && e.contains("features.42"),
        "{e}"
    );
    assert_eq!(
        m.meta.dtypes,
        ["F32"],
        "num_batches_tracked (I64) is ignored"
    );
}

#[test]
fn bn_is_folded_into_the_conv() {
    // conv 0, bn 1, relu 2, pool 3, conv 4 (no bias), bn 5, relu 6, pool 7
    let ts = bn_tensors(&[4, 0, 6, 0], &[5], |i| i == 4);
    let m = weights::load_bytes(&serialize(&ts, None), "bn").unwrap();
    assert_eq!(indices(&m), (vec![(0, 2), (4, 6)], vec![3, 7]));
    let layer = |k: usize| m.convs().nth(k).unwrap();
    let s = 8;
    for (k, conv, bn, cin, with_bias) in [(0, 0, 1, 3, true), (1, 4, 5, 4, false)] {
        let w = as_f32(get(&ts, &format!("features.{conv}.weight")));
        let b = if with_bias {
            as_f32(get(&ts, &format!("features.{conv}.bias")))
        } else {
            vec![0.0; layer(k).cout]
        };
        let g = as_f32(get(&ts, &format!("features.{bn}.weight")));
        let beta = as_f32(get(&ts, &format!("features.{bn}.bias")));
        let mean = as_f32(get(&ts, &format!("features.{bn}.running_mean")));
        let var = as_f32(get(&ts, &format!("features.{bn}.running_var")));
        let x: Vec<f32> = (0..cin * s * s)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let l = layer(k);
        assert_eq!(l.cin, cin);
        for &(o, h, wi) in &[
            (0, 0, 0),
            (1, 3, 4),
            (l.cout - 1, 7, 7),
            (2, 7, 0),
            (l.cout - 1, 2, 5),
        ] {
            let y = conv_at(&x, cin, s, &w, b[o], o, h, wi);
            let expect = g[o] * (y - mean[o]) / (var[o] + 1e-5).sqrt() + beta[o];
            let got = conv_at(&x, cin, s, &l.weight, l.bias[o], o, h, wi);
            assert!(
                (got - expect).abs() <= 1e-5 + 1e-5 * expect.abs(),
                "conv {conv} out {o} at ({h},{wi}): folded {got} vs conv+BN {expect}"
            );
        }
    }
    // a saved `_bn` model (identity BN in the file) loads back with the same indices and values
    let back = weights::load_bytes(&saved_bytes(&m, "F32"), "bn-resaved").unwrap();
    assert_same_model(&m, &back, 1e-6, 1e-7);
}

#[test]
fn timm_names_give_the_same_model() {
    let m = Vgg::random_from_config(&[4, 0, 8, 0], &[6, 6, 5], 11, 32);
    let tv_bytes = saved_bytes(&m, "F32");
    let (tv, _) = read(&tv_bytes);
    let mut timm: Tensors = tv
        .iter()
        .filter(|(n, _)| n.starts_with("features."))
        .cloned()
        .collect();
    let reshape = |t: &T, shape: &[usize]| T {
        shape: shape.to_vec(),
        ..t.clone()
    };
    timm.push((
        "pre_logits.fc1.weight".into(),
        reshape(get(&tv, "classifier.0.weight"), &[6, 8, 7, 7]),
    ));
    timm.push((
        "pre_logits.fc1.bias".into(),
        get(&tv, "classifier.0.bias").clone(),
    ));
    timm.push((
        "pre_logits.fc2.weight".into(),
        reshape(get(&tv, "classifier.3.weight"), &[6, 6, 1, 1]),
    ));
    timm.push((
        "pre_logits.fc2.bias".into(),
        get(&tv, "classifier.3.bias").clone(),
    ));
    timm.push((
        "head.fc.weight".into(),
        get(&tv, "classifier.6.weight").clone(),
    ));
    timm.push(("head.fc.bias".into(), get(&tv, "classifier.6.bias").clone()));
    let a = weights::load_bytes(&tv_bytes, "tv").unwrap();
    let b = weights::load_bytes(&serialize(&timm, None), "timm").unwrap();
    assert_same_model(&a, &b, 0.0, 0.0);
    assert_eq!(
        b.classifier
            .iter()
            .map(|l| (l.index, l.fin, l.fout, l.relu))
            .collect::<Vec<_>>(),
        [(0, 392, 6, true), (3, 6, 6, true), (6, 6, 5, false)]
    );
    // timm's defaults: no metadata → ImageNet preprocessing at 224
    assert_eq!(b.meta.input_size, 224);
    assert_eq!(b.meta.mean, scorecam_gpu::model::IMAGENET_MEAN);

    // an fc1 that does not chain names the tensor as the file spells it
    let mut bad = timm.clone();
    set(
        &mut bad,
        "pre_logits.fc1.weight",
        f32t(&[6, 8, 7, 6], &[0.01; 6 * 336]),
    );
    expect_err(&serialize(&bad, None), &["pre_logits.fc1.weight", "392"]);
    // mixing both namings is refused
    let mut mixed = timm;
    mixed.push(("classifier.9.weight".into(), f32t(&[2, 5], &[0.0; 10])));
    mixed.push(("classifier.9.bias".into(), f32t(&[2], &[0.0; 2])));
    expect_err(&serialize(&mixed, None), &["timm"]);
}

#[test]
fn prefixed_names_are_accepted() {
    let m = tiny(5);
    let (ts, md) = read(&saved_bytes(&m, "F32"));
    for prefix in ["model.", "module.", "module.model."] {
        let p: Tensors = ts
            .iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t.clone()))
            .collect();
        let back = weights::load_bytes(&serialize(&p, Some(md.clone())), prefix).unwrap();
        assert_same_model(&m, &back, 0.0, 0.0);
    }
    // errors name the tensor as written in the file
    let mut p: Tensors = ts
        .iter()
        .map(|(n, t)| (format!("model.{n}"), t.clone()))
        .collect();
    set(
        &mut p,
        "model.features.3.weight",
        f32t(&[8, 4, 5, 5], &[0.1; 800]),
    );
    expect_err(
        &serialize(&p, None),
        &["model.features.3.weight", "[8, 4, 5, 5]"],
    );
    // the same tensor twice (with and without prefix)
    let mut dup = ts.clone();
    dup.push((
        "model.features.0.weight".into(),
        get(&ts, "features.0.weight").clone(),
    ));
    expect_err(&serialize(&dup, None), &["features.0.weight"]);
}

#[test]
fn metadata_is_parsed() {
    let m = tiny(9);
    let (ts, _) = read(&saved_bytes(&m, "F32"));
    let labels: Vec<String> = ["cat", "dog", "bird", "fish", "frog"]
        .map(String::from)
        .to_vec();
    let md: HashMap<String, String> = [
        ("input_size", "64"),
        ("mean", "[0.5, 0.25, 0.125]"),
        ("std", "[0.5,0.5,0.25]"),
        ("labels", r#"["cat","dog","bird","fish","frog"]"#),
        ("arch", "tiny-vgg"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let back = weights::load_bytes(&serialize(&ts, Some(md)), "meta").unwrap();
    assert_eq!(back.meta.input_size, 64);
    assert_eq!(back.meta.mean, [0.5, 0.25, 0.125]);
    assert_eq!(back.meta.std, [0.5, 0.5, 0.25]);
    assert_eq!(back.meta.labels.as_deref(), Some(&labels[..]));
    assert_eq!(back.meta.arch.as_deref(), Some("tiny-vgg"));

    // and `save` writes them back
    let again = weights::load_bytes(&saved_bytes(&back, "F16"), "again").unwrap();
    assert_eq!(again.meta.input_size, 64);
    assert_eq!(again.meta.mean, back.meta.mean);
    assert_eq!(again.meta.std, back.meta.std);
    assert_eq!(again.meta.labels, back.meta.labels);
    assert_eq!(again.meta.arch, back.meta.arch);
}

#[test]
fn thousand_classes_default_to_imagenet_labels() {
    let m = Vgg::random_from_config(&[4, 0, 8, 0], &[6, 1000], 2, 32);
    let back = weights::load_bytes(&saved_bytes(&m, "BF16"), "in1k").unwrap();
    let labels = back.meta.labels.expect("ImageNet labels");
    assert_eq!(labels.len(), 1000);
    assert_eq!(labels[0], "tench");
    assert_eq!(labels[999], "toilet tissue");
    assert_eq!(labels, weights::imagenet_labels());
}

// ---------------------------------------------------------------------------------------------
// rejected inputs

#[test]
fn truncated_empty_and_foreign_files() {
    let bytes = saved_bytes(&tiny(1), "F32");
    let dir = tempfile::tempdir().unwrap();
    // cut in the tensor data
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let msg = check_err(
        weights::load(&p).unwrap_err(),
        &["truncated", "cut.safetensors"],
    );
    assert!(msg.contains(&format!("{}", bytes.len())), "{msg}");
    // cut in the header, and inside the 8-byte length
    expect_err(&bytes[..40], &["truncated or not a safetensors file"]);
    expect_err(&bytes[..5], &["truncated or not a safetensors file"]);
    // zero bytes
    let p = dir.path().join("empty.safetensors");
    std::fs::write(&p, b"").unwrap();
    check_err(
        weights::load(&p).unwrap_err(),
        &["0 bytes", "empty.safetensors"],
    );
    expect_err(b"", &["0 bytes"]);
    // not a safetensors file at all: text, a PNG signature, a JSON-ish header of garbage
    let p = dir.path().join("notes.txt");
    std::fs::write(
        &p,
        "these are not the weights you are looking for\n".repeat(20),
    )
    .unwrap();
    check_err(
        weights::load(&p).unwrap_err(),
        &["not a safetensors file", "notes.txt"],
    );
    expect_err(
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
        &["not a safetensors file"],
    );
    let mut junk = 6u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"{nope}");
    expect_err(&junk, &["not a safetensors file"]);
    // a missing file and a directory
    let missing = dir.path().join("missing.safetensors");
    check_err(
        weights::load(&missing).unwrap_err(),
        &["missing.safetensors"],
    );
    check_err(weights::load(dir.path()).unwrap_err(), &["directory"]);
    // a valid safetensors file that is not a VGG
    let other: Tensors = vec![("encoder.layer.0.weight".into(), f32t(&[2, 2], &[1.0; 4]))];
    expect_err(
        &serialize(&other, None),
        &["features.N.weight", "encoder.layer.0.weight"],
    );
}

#[test]
fn missing_tensors_are_named() {
    let m = Vgg::random_from_config(&[4, 4, 0, 8, 0], &[6, 5], 4, 32);
    let (ts, _) = read(&saved_bytes(&m, "F32"));
    let mut t = ts.clone();
    remove(&mut t, "features.2.bias");
    expect_err(&serialize(&t, None), &["features.2.bias", "missing"]);
    let mut t = ts.clone();
    remove(&mut t, "features.2.weight");
    expect_err(&serialize(&t, None), &["features.2.weight", "missing"]);
    let mut t = ts.clone();
    remove(&mut t, "classifier.3.bias");
    expect_err(&serialize(&t, None), &["classifier.3.bias", "missing"]);
    let mut t = ts.clone();
    remove(&mut t, "features.0.weight");
    remove(&mut t, "features.0.bias");
    expect_err(&serialize(&t, None), &["features.0.weight"]);
    let mut t = ts;
    t.retain(|(n, _)| !n.starts_with("classifier."));
    expect_err(&serialize(&t, None), &["no classifier layers"]);
    // a BatchNorm without its running statistics
    let mut bn = bn_tensors(&[4, 0], &[3], |_| false);
    remove(&mut bn, "features.1.running_var");
    expect_err(
        &serialize(&bn, None),
        &["features.1.running_var", "missing"],
    );
}

#[test]
fn bad_shapes_are_named() {
    let m = tiny(6);
    let (ts, _) = read(&saved_bytes(&m, "F32"));
    // conv weight not 3×3
    let mut t = ts.clone();
    set(
        &mut t,
        "features.3.weight",
        f32t(&[8, 4, 5, 5], &[0.01; 800]),
    );
    expect_err(
        &serialize(&t, None),
        &["features.3.weight", "[8, 4, 5, 5]", "3, 3"],
    );
    // conv weight of rank 2
    let mut t = ts.clone();
    set(&mut t, "features.0.weight", f32t(&[4, 27], &[0.01; 108]));
    expect_err(&serialize(&t, None), &["features.0.weight", "[4, 27]"]);
    // bias length ≠ Cout
    let mut t = ts.clone();
    set(&mut t, "features.3.bias", f32t(&[7], &[0.0; 7]));
    expect_err(&serialize(&t, None), &["features.3.bias", "[8]", "[7]"]);
    // conv channels that do not chain (features.3 takes 5 channels, features.0 gives 4)
    let mut t = ts.clone();
    set(
        &mut t,
        "features.3.weight",
        f32t(&[8, 5, 3, 3], &[0.01; 360]),
    );
    expect_err(
        &serialize(&t, None),
        &["features.3.weight", "5 input channels"],
    );
    // a linear whose input size does not chain (8×7×7 = 392 features)
    let mut t = ts.clone();
    set(&mut t, "classifier.0.weight", f32t(&[6, 100], &[0.01; 600]));
    expect_err(&serialize(&t, None), &["classifier.0.weight", "100", "392"]);
    let mut t = ts.clone();
    set(&mut t, "classifier.3.weight", f32t(&[5, 7], &[0.01; 35]));
    expect_err(&serialize(&t, None), &["classifier.3.weight", "7", "6"]);
    // a linear weight of rank 4 is only timm's
    let mut t = ts.clone();
    set(
        &mut t,
        "classifier.0.weight",
        f32t(&[6, 8, 7, 7], &[0.01; 6 * 392]),
    );
    expect_err(&serialize(&t, None), &["classifier.0.weight", "[out, in]"]);
    // conv indices that are not torchvision's numbering (a gap of 5)
    let mut t = ts;
    let (w, b) = (
        get(&t, "features.3.weight").clone(),
        get(&t, "features.3.bias").clone(),
    );
    remove(&mut t, "features.3.weight");
    remove(&mut t, "features.3.bias");
    t.push(("features.5.weight".into(), w));
    t.push(("features.5.bias".into(), b));
    expect_err(
        &serialize(&t, None),
        &["features.5.weight", "not a VGG layout"],
    );
}

#[test]
fn unsupported_dtypes_are_named() {
    let m = tiny(8);
    let (ts, _) = read(&saved_bytes(&m, "F32"));
    let mut t = ts.clone();
    let w = as_f32(get(&ts, "features.0.weight"));
    set(
        &mut t,
        "features.0.weight",
        T {
            dtype: Dtype::F64,
            shape: vec![4, 3, 3, 3],
            data: w.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        },
    );
    expect_err(&serialize(&t, None), &["features.0.weight", "F64"]);
    let mut t = ts;
    set(
        &mut t,
        "classifier.3.bias",
        T {
            dtype: Dtype::I32,
            shape: vec![5],
            data: [1i32; 5].iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    );
    expect_err(&serialize(&t, None), &["classifier.3.bias", "I32"]);
}

#[test]
fn non_finite_values_are_named() {
    let m = tiny(10);
    for dtype in ["F32", "F16", "BF16"] {
        let mut m = m.clone();
        let conv = match &mut m.features[2] {
            FeatureStage::Conv(c) => c,
            _ => unreachable!(),
        };
        conv.weight[37] = f32::NAN;
        conv.weight[200] = f32::INFINITY;
        // `save` writes whatever it is given; the loader must catch it
        let bytes = saved_bytes(&m, dtype);
        let msg = expect_err(&bytes, &["features.3.weight", "NaN", "37"]);
        assert!(msg.contains("[1, 0, 0, 1]"), "{msg}"); // 37 = 1·36 + 0·9 + 0·3 + 1
    }
    let mut m = m;
    m.classifier[1].bias[2] = f32::NEG_INFINITY;
    expect_err(
        &saved_bytes(&m, "F32"),
        &["classifier.3.bias", "inf", "index [2]"],
    );
}

#[test]
fn bad_metadata_is_named() {
    let (ts, _) = read(&saved_bytes(&tiny(12), "F32"));
    let with =
        |k: &str, v: &str| serialize(&ts, Some(HashMap::from([(k.to_owned(), v.to_owned())])));
    expect_err(
        &with("labels", r#"["a","b","c"]"#),
        &["labels", "3 labels", "5 classes"],
    );
    expect_err(&with("labels", "cat, dog"), &["labels", "JSON"]);
    expect_err(
        &with("mean", "0.5,0.5,0.5"),
        &["mean", "JSON array of 3 numbers"],
    );
    expect_err(&with("mean", "[0.5, 0.5]"), &["mean", "3 numbers"]);
    expect_err(&with("mean", r#"["a","b","c"]"#), &["mean"]);
    expect_err(&with("std", "[0.2, 0, 0.2]"), &["std", "> 0"]);
    expect_err(&with("input_size", "big"), &["input_size", "big"]);
    expect_err(&with("input_size", "16"), &["input_size", "16"]);
    expect_err(&with("input_size", "-224"), &["input_size"]);
    // 6 max-pools on 32 px leave nothing: validate() refuses
    let m = Vgg::random_from_config(&[2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0], &[3], 1, 64);
    let (ts6, _) = read(&saved_bytes(&m, "F32"));
    let md = HashMap::from([("input_size".to_owned(), "32".to_owned())]);
    expect_err(
        &serialize(&ts6, Some(md)),
        &["input size 32", "6 max-pools"],
    );
}

/// Every parameter of a model as (tensor name, flat index, bits); bits so that -0.0 and 0.0
/// differ.
fn parameters(m: &Vgg) -> Vec<(String, usize, u32)> {
    let mut out = Vec::new();
    let mut push = |name: String, v: &[f32]| {
        out.extend(
            v.iter()
                .enumerate()
                .map(|(k, x)| (name.clone(), k, x.to_bits())),
        );
    };
    for c in m.convs() {
        push(format!("features.{}.weight", c.conv_index), &c.weight);
        push(format!("features.{}.bias", c.conv_index), &c.bias);
    }
    for l in &m.classifier {
        push(format!("classifier.{}.weight", l.index), &l.weight);
        push(format!("classifier.{}.bias", l.index), &l.bias);
    }
    out
}

#[test]
fn weights_load_never_panics_on_cut_or_flipped_bytes() {
    let bytes = saved_bytes(&tiny(13), "F16");
    let base = weights::load_bytes(&bytes, "base").unwrap();
    let base_params = parameters(&base);
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(header_end < bytes.len());
    // Which tensor element each data byte belongs to, from the file's own header.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let owner = |pos: usize| -> (String, usize) {
        st.iter()
            .find_map(|(name, v)| {
                let start = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
                (start..start + v.data_len())
                    .contains(&pos)
                    .then(|| (name.to_owned(), (pos - start) / 2))
            })
            .unwrap_or_else(|| panic!("byte {pos} is in no tensor"))
    };
    // Any cut is an error that says so and names the file.
    for cut in (0..bytes.len())
        .step_by(97)
        .chain([header_end, bytes.len() - 1])
    {
        let e = weights::load_bytes(&bytes[..cut], "cut").expect_err("a cut file must not load");
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Weights { .. }) && e.exit_code() == 2,
            "cut at {cut}: {e:?}"
        );
        assert!(
            msg.contains("cut") && msg.contains("truncated"),
            "cut at {cut}: {msg}"
        );
    }
    // One flipped byte: a weights error naming the file, or a model that differs from the
    // original only where the byte was. In the header that means no parameter changed (only
    // metadata text can survive a flip); in the data, exactly the element the byte belongs to
    // changed, unless the flip made it NaN or infinite, which is refused.
    let (mut refused, mut loaded) = ([0usize; 2], [0usize; 2]);
    for pos in (0..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[pos] ^= 0x5a;
        let in_data = usize::from(pos >= header_end);
        match weights::load_bytes(&b, "flipped") {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    matches!(e, Error::Weights { .. }) && e.exit_code() == 2,
                    "flip at {pos}: {e:?}"
                );
                assert!(msg.contains("flipped"), "flip at {pos}: {msg}");
                if in_data == 1 {
                    assert!(msg.contains("non-finite"), "flip at {pos}: {msg}");
                }
                refused[in_data] += 1;
            }
            Ok(m) => {
                m.validate().unwrap();
                let params = parameters(&m);
                assert_eq!(params.len(), base_params.len(), "flip at {pos}");
                let changed: Vec<(String, usize)> = params
                    .iter()
                    .zip(&base_params)
                    .filter(|(p, q)| p != q)
                    .map(|(p, _)| (p.0.clone(), p.1))
                    .collect();
                let want = if in_data == 1 {
                    vec![owner(pos)]
                } else {
                    vec![]
                };
                assert_eq!(changed, want, "flip at {pos}: changed parameters");
                loaded[in_data] += 1;
            }
        }
    }
    println!(
        "header flips: {} refused, {} loaded; data flips: {} refused, {} loaded",
        refused[0], loaded[0], refused[1], loaded[1]
    );
    assert!(
        refused[0] > 0 && loaded[1] > 0,
        "both kinds of flips were exercised"
    );
}

/// `cargo test --release --test weights -- --ignored --nocapture load_time`
#[test]
#[ignore = "writes a 528 MB file; run in release to time VGG16 loading"]
fn load_time_vgg16() {
    let dir = tempfile::tempdir().unwrap();
    let m = Vgg::random_vgg16(0);
    for dtype in ["F32", "F16"] {
        let p = dir.path().join(format!("vgg16-{dtype}.safetensors"));
        let t = std::time::Instant::now();
        weights::save(&m, &p, dtype).unwrap();
        let save_s = t.elapsed().as_secs_f64();
        let size = std::fs::metadata(&p).unwrap().len();
        let _ = weights::load(&p).unwrap(); // warm the page cache
        let t = std::time::Instant::now();
        let back = weights::load(&p).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        println!(
            "VGG16 {dtype}: {:.0} MB, save {save_s:.2} s, load {load_s:.3} s ({:.2} GB/s of f32 out)",
            size as f64 / 1e6,
            back.parameter_count() as f64 * 4.0 / load_s / 1e9
        );
        assert_eq!(back.parameter_count(), 138_357_544);
        assert_eq!(back.meta.labels.as_ref().map(Vec::len), Some(1000));
        if dtype == "F32" {
            assert_same_model(&m, &back, 0.0, 0.0);
        }
    }
}
