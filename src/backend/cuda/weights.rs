//! The model on the device: conv filters KRSC with the first layer's input channels padded to
//! [`CPAD`], FP16 biases, Linear weights FP16 (the first one's columns permuted to H,W,C order).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::f16;

use super::cudnn::{FilterDesc, TensorDesc};
use super::device::{dnn_err, Dev};
use super::kernels::{conv3x3_wg_pack_filter, ConvWgBuild};
use super::{layout, CPAD};
use crate::error::{Error, Result};
use crate::model::{FeatureStage, Vgg, POOLED};

/// A conv layer on the device.
pub(super) struct DevConv {
    /// Input channels: the model's, and as stored (the first conv's 3 stored as `CPAD`).
    pub cin: usize,
    pub cin_s: usize,
    pub cout: usize,
    pub filter: CudaSlice<f16>,
    pub bias: CudaSlice<f16>,
    /// The bias in f32, for FP8 graphs whose engines want it so.
    pub bias32: CudaSlice<f32>,
    pub wdesc: FilterDesc,
    pub bdesc: TensorDesc,
    /// The filter packed for the wgmma conv's build that fits the layer
    /// ([`conv3x3_wg_pack_filter`]), on devices that run it.
    pub wg_filter: Option<(ConvWgBuild, CudaSlice<f16>)>,
}

impl DevConv {
    /// The filter packed for the wgmma conv's `build` ([`ConvWgBuild::reads_packing`]), or an
    /// error naming the layer when it has none.
    pub fn wg_packed(&self, build: ConvWgBuild) -> Result<&CudaSlice<f16>> {
        match &self.wg_filter {
            Some((packed_for, packed))
                if build.reads_packing(*packed_for, [self.cin_s, self.cout]) =>
            {
                Ok(packed)
            }
            _ => Err(Error::Invalid(format!(
                "the {} → {} channel conv has no filter packed for the wgmma conv's {build:?}",
                self.cin_s, self.cout
            ))),
        }
    }
}

/// The KRSC filter `host` (FP16, or E4M3 codes with `e4m3`) of a `[cin, cout]` layer packed for
/// the wgmma conv's build that fits it ([`conv3x3_wg_pack_filter`]) and uploaded as `name`; None
/// where no build fits.
pub(super) fn upload_wg_packed<T: DeviceRepr + ValidAsZeroBits + Copy>(
    dev: &Dev,
    host: &[T],
    [cin, cout]: [usize; 2],
    e4m3: bool,
    name: &str,
) -> Result<Option<(ConvWgBuild, CudaSlice<T>)>> {
    let Some(build) = ConvWgBuild::for_layer(cin, cout, e4m3) else {
        return Ok(None);
    };
    match conv3x3_wg_pack_filter(build, host, [cin, cout], e4m3) {
        Some(packed) => Ok(Some((
            build,
            dev.upload(&packed, &format!("{name} (packed, wgmma)"))?,
        ))),
        None => Ok(None),
    }
}

/// A Linear layer on the device. `weight` `[fout, fin]` f16 (first layer: columns H,W,C).
pub(super) struct DevLinear {
    pub fin: usize,
    pub fout: usize,
    pub relu: bool,
    pub weight: CudaSlice<f16>,
    pub bias16: CudaSlice<f16>,
    pub bias32: CudaSlice<f32>,
}

/// The uploaded model. `convs[i]` is `Some` for conv stages.
pub(super) struct DevModel {
    pub model: Arc<Vgg>,
    pub convs: Vec<Option<DevConv>>,
    pub linears: Vec<DevLinear>,
    pub bytes: usize,
}

/// Upload `model`'s weights in the device layouts; with `pack_wg` (a device that runs the wgmma
/// conv), also each filter that fits it in its packed layout.
pub(super) fn upload_model(dev: &Dev, model: &Arc<Vgg>, pack_wg: bool) -> Result<DevModel> {
    let mut convs = Vec::with_capacity(model.features.len());
    let mut bytes = 0;
    let mut cs = CPAD;
    for stage in &model.features {
        match stage {
            FeatureStage::Conv(l) => {
                let name = format!("features.{}", l.conv_index);
                let host = layout::conv_filter_krsc(&l.weight, l.cout, l.cin, cs);
                let filter = dev.upload(&host, &format!("{name}.weight"))?;
                let bias = dev.upload(&layout::to_f16(&l.bias), &format!("{name}.bias"))?;
                let bias32 = dev.upload(&l.bias, &format!("{name}.bias (f32)"))?;
                bytes += filter.num_bytes() + bias.num_bytes() + bias32.num_bytes();
                let wg_filter = match pack_wg {
                    true => upload_wg_packed(
                        dev,
                        &host,
                        [cs, l.cout],
                        false,
                        &format!("{name}.weight"),
                    )?,
                    false => None,
                };
                bytes += wg_filter.as_ref().map_or(0, |(_, d)| d.num_bytes());
                let wdesc = FilterDesc::nhwc_f16(l.cout, cs, 3, 3)
                    .map_err(|e| dnn_err(&format!("{name}: filter descriptor"), e))?;
                let bdesc = TensorDesc::nhwc_f16(1, l.cout, 1, 1)
                    .map_err(|e| dnn_err(&format!("{name}: bias descriptor"), e))?;
                convs.push(Some(DevConv {
                    cin: l.cin,
                    cin_s: cs,
                    cout: l.cout,
                    filter,
                    bias,
                    bias32,
                    wdesc,
                    bdesc,
                    wg_filter,
                }));
                cs = l.cout;
            }
            FeatureStage::MaxPool { .. } => convs.push(None),
        }
    }
    let c_feat = model.features_shape(model.input_size()).c;
    let mut linears = Vec::with_capacity(model.classifier.len());
    for (j, l) in model.classifier.iter().enumerate() {
        let name = format!("classifier.{}", l.index);
        let host = if j == 0 {
            if l.fin != c_feat * POOLED * POOLED {
                return Err(Error::Invalid(format!(
                    "{name}: takes {} inputs, the features give {c_feat}×{POOLED}×{POOLED}",
                    l.fin
                )));
            }
            layout::linear_chw_to_hwc(&l.weight, l.fout, c_feat, POOLED, POOLED)
        } else {
            layout::to_f16(&l.weight)
        };
        let weight = dev.upload(&host, &format!("{name}.weight"))?;
        let bias16 = dev.upload(&layout::to_f16(&l.bias), &format!("{name}.bias"))?;
        let bias32 = dev.upload(&l.bias, &format!("{name}.bias"))?;
        bytes += weight.num_bytes() + bias16.num_bytes() + bias32.num_bytes();
        linears.push(DevLinear {
            fin: l.fin,
            fout: l.fout,
            relu: l.relu,
            weight,
            bias16,
            bias32,
        });
    }
    Ok(DevModel {
        model: Arc::clone(model),
        convs,
        linears,
        bytes,
    })
}
