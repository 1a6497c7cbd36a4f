//! Bounding boxes for the energy-based pointing game: reading them (Pascal VOC XML, CSV) and
//! mapping them into the S×S view the model sees.
//!
//! # Coordinates
//! A [`BoxXyxy`] is in the original image's pixel grid with **0-based, continuous pixel-edge
//! coordinates, `x1`/`y1` exclusive**: the box covering pixel columns `i..=j` has `x0 = i`,
//! `x1 = j + 1`, and its width is `x1 − x0`. Fractions are allowed.
//! - Pascal VOC's `xmin..=xmax` are 1-based and inclusive, so a VOC box becomes
//!   `x0 = xmin − 1, x1 = xmax` (and likewise in y).
//! - The CSV format ([`read_csv`]) is already in this convention and is taken as is.
//!
//! A [`BoxPx`] is a box of whole pixels in the S×S model view: `x0..x1` × `y0..y1`, inclusive
//! start, exclusive end, all within `0..=S`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{center_offset, shorter_side_to, ResizeMode};

/// A box in the original image's pixel coordinates: 0-based pixel edges, `x1`/`y1` exclusive
/// (see the [module docs](self)). `label` is the object's class name when the file gives one.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxXyxy {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    pub label: Option<String>,
}

/// A box of whole pixels in the S×S model view: columns `x0..x1`, rows `y0..y1` (exclusive
/// ends), clamped to `0..=S`. An empty box is always [`BoxPx::EMPTY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BoxPx {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl BoxPx {
    /// The box with no pixels (what a box entirely outside the view becomes).
    pub const EMPTY: BoxPx = BoxPx {
        x0: 0,
        y0: 0,
        x1: 0,
        y1: 0,
    };

    /// True when the box holds no pixel.
    pub fn is_empty(&self) -> bool {
        self.x1 <= self.x0 || self.y1 <= self.y0
    }

    /// Number of pixels in the box.
    pub fn area(&self) -> u64 {
        if self.is_empty() {
            0
        } else {
            u64::from(self.x1 - self.x0) * u64::from(self.y1 - self.y0)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mapping into the model view
// ---------------------------------------------------------------------------------------------

/// Map a box through the preprocessing the engine applies (`crate::image::load_rgb`) and return
/// the pixels of the S×S model view it covers.
///
/// - An image that is already S×S is used as is: the box is unchanged.
/// - [`ResizeMode::Crop`]: the shorter side is resized to S (the longer to `floor(S·long/short)`,
///   torchvision's `Resize(S)`), then the S×S centre crop is taken at offsets
///   `round((resized − S)/2)` with round-half-to-even, as `CenterCrop`: `X = x·rw/w − left`,
///   `Y = y·rh/h − top`. (A 500×375 image at S = 224 is resized to 298×224 and cropped at x = 37.)
/// - [`ResizeMode::Stretch`]: each axis scaled to S: `X = x·S/w`, `Y = y·S/h`.
///
/// The resamplers map pixel edges linearly (pixel `i` of the output covers input
/// `[i·w/rw, (i+1)·w/rw)`), so the continuous box maps exactly; a view pixel belongs to the box
/// when its centre lies inside (`X0 ≤ i + ½ < X1`), i.e. `i` in `ceil(X0 − ½) .. ceil(X1 − ½)`.
/// Integer boxes on an unscaled axis keep their bounds. The result is clamped to `0..=S`; a box
/// that covers no view pixel (outside the crop, or thinner than a view pixel and missing every
/// centre), a non-finite box, or a zero size gives [`BoxPx::EMPTY`].
pub fn to_model_view(b: &BoxXyxy, orig_w: u32, orig_h: u32, s: u32, mode: ResizeMode) -> BoxPx {
    if orig_w == 0 || orig_h == 0 || s == 0 {
        return BoxPx::EMPTY;
    }
    // (scale, offset) per axis: view = orig · scale − offset.
    let ((sx, ox), (sy, oy)) = if (orig_w, orig_h) == (s, s) {
        ((1.0, 0.0), (1.0, 0.0))
    } else {
        match mode {
            ResizeMode::Stretch => (
                (f64::from(s) / f64::from(orig_w), 0.0),
                (f64::from(s) / f64::from(orig_h), 0.0),
            ),
            ResizeMode::Crop => {
                let (rw, rh) = shorter_side_to(orig_w, orig_h, s);
                (
                    (
                        f64::from(rw) / f64::from(orig_w),
                        f64::from(center_offset(rw - s)),
                    ),
                    (
                        f64::from(rh) / f64::from(orig_h),
                        f64::from(center_offset(rh - s)),
                    ),
                )
            }
        }
    };
    let span = |lo: f64, hi: f64, scale: f64, off: f64| -> Option<(u32, u32)> {
        let (a, b) = (lo * scale - off, hi * scale - off);
        if !(a.is_finite() && b.is_finite()) {
            return None;
        }
        let limit = f64::from(s);
        let start = (a - 0.5).ceil().clamp(0.0, limit);
        let end = (b - 0.5).ceil().clamp(0.0, limit);
        (end > start).then_some((start as u32, end as u32))
    };
    match (span(b.x0, b.x1, sx, ox), span(b.y0, b.y1, sy, oy)) {
        (Some((x0, x1)), Some((y0, y1))) => BoxPx { x0, y0, x1, y1 },
        _ => BoxPx::EMPTY,
    }
}

// ---------------------------------------------------------------------------------------------
// Pascal VOC XML
// ---------------------------------------------------------------------------------------------

/// Largest annotation or box file read (an annotation is a few KiB; a CSV of every ImageNet
/// validation box is ~10 MiB).
pub const MAX_BOXES_FILE_BYTES: u64 = 256 << 20;

fn read_text(path: &Path, what: &str) -> Result<String> {
    let usage = |msg: String| Error::Usage(format!("{what} {}: {msg}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| usage(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(usage("not a regular file".into()));
    }
    if meta.len() > MAX_BOXES_FILE_BYTES {
        return Err(usage(format!(
            "file too large: {} MiB (limit {} MiB)",
            meta.len() >> 20,
            MAX_BOXES_FILE_BYTES >> 20
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read: {e}")))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        usage(format!("line {line}: not valid UTF-8"))
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Read a Pascal VOC annotation: `(filename, width, height, boxes)`.
///
/// ```xml
/// <annotation>
///   <filename>000001.jpg</filename>
///   <size><width>353</width><height>500</height><depth>3</depth></size>
///   <object><name>dog</name><bndbox><xmin>48</xmin><ymin>240</ymin>
///           <xmax>195</xmax><ymax>371</ymax></bndbox></object>
/// </annotation>
/// ```
///
/// - The root must be `<annotation>`. `<filename>` is optional (None when absent or empty).
/// - `<size>` with `<width>` and `<height>` is required: positive whole numbers (`500` or
///   `500.0`).
/// - Every `<object>` (direct child of the root) needs a `<bndbox>` with `<xmin> <ymin> <xmax>
///   <ymax>`: finite numbers, fractions allowed, `xmax ≥ xmin`, `ymax ≥ ymin`. VOC's 1-based
///   inclusive bounds become `x0 = xmin − 1, x1 = xmax` ([module docs](self)). `<name>` becomes the
///   label (None when absent or empty). `<difficult>`, `<truncated>`, `<part>` and other elements
///   are ignored: every object's box is returned, in file order. Boxes are not clipped to the
///   size here ([`to_model_view`] clamps).
/// - No objects: an empty list.
///
/// Errors are [`Error::Usage`] naming the file, the line and the element at fault.
pub fn read_voc_xml(path: &Path) -> Result<(Option<String>, u32, u32, Vec<BoxXyxy>)> {
    let text = read_text(path, "annotation")?;
    let doc = roxmltree::Document::parse(&text).map_err(|e| {
        Error::Usage(format!(
            "annotation {}: not well-formed XML: {e}",
            path.display()
        ))
    })?;
    let voc = Voc { doc: &doc, path };
    let root = doc.root_element();
    if root.tag_name().name() != "annotation" {
        return Err(voc.err(
            root,
            format!(
                "the root element is <{}>, expected a Pascal VOC <annotation>",
                root.tag_name().name()
            ),
        ));
    }
    let filename = voc
        .child(root, "filename", "<annotation>")?
        .map(text_of)
        .filter(|f| !f.is_empty());
    let Some(size) = voc.child(root, "size", "<annotation>")? else {
        return Err(voc.err(root, "<annotation> has no <size>".into()));
    };
    let side = |name: &str| -> Result<u32> {
        let v = voc.number(size, name, "<size>")?;
        if v >= 1.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX) {
            Ok(v as u32)
        } else {
            let node = voc.child(size, name, "<size>")?.unwrap_or(size);
            Err(voc.err(
                node,
                format!("<size>: <{name}> is {v}, not a positive whole number of pixels"),
            ))
        }
    };
    let (width, height) = (side("width")?, side("height")?);

    let mut boxes = Vec::new();
    let objects = root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "object");
    for (i, object) in objects.enumerate() {
        let ctx = format!("<object> {}", i + 1);
        let label = voc
            .child(object, "name", &ctx)?
            .map(text_of)
            .filter(|n| !n.is_empty());
        let ctx = match &label {
            Some(l) => format!("<object> {} ({l})", i + 1),
            None => ctx,
        };
        let Some(bb) = voc.child(object, "bndbox", &ctx)? else {
            return Err(voc.err(object, format!("{ctx} has no <bndbox>")));
        };
        let ctx = format!("{ctx} <bndbox>");
        let xmin = voc.number(bb, "xmin", &ctx)?;
        let ymin = voc.number(bb, "ymin", &ctx)?;
        let xmax = voc.number(bb, "xmax", &ctx)?;
        let ymax = voc.number(bb, "ymax", &ctx)?;
        if xmax < xmin || ymax < ymin {
            return Err(voc.err(
                bb,
                format!(
                    "{ctx}: empty box (xmin {xmin}, ymin {ymin}, xmax {xmax}, ymax {ymax}): \
                     needs xmax ≥ xmin and ymax ≥ ymin"
                ),
            ));
        }
        boxes.push(BoxXyxy {
            x0: xmin - 1.0,
            y0: ymin - 1.0,
            x1: xmax,
            y1: ymax,
            label,
        });
    }
    Ok((filename, width, height, boxes))
}

/// A parsed annotation and its file, for messages that name the file, line and element.
struct Voc<'a, 'input> {
    doc: &'a roxmltree::Document<'input>,
    path: &'a Path,
}

type Node<'a, 'input> = roxmltree::Node<'a, 'input>;

impl<'a, 'input> Voc<'a, 'input> {
    fn err(&self, node: Node<'a, 'input>, msg: String) -> Error {
        let pos = self.doc.text_pos_at(node.range().start);
        Error::Usage(format!(
            "annotation {}: line {}: {msg}",
            self.path.display(),
            pos.row
        ))
    }

    /// The one child element of `node` called `name` (None if absent; an error if repeated).
    fn child(
        &self,
        node: Node<'a, 'input>,
        name: &str,
        ctx: &str,
    ) -> Result<Option<Node<'a, 'input>>> {
        let mut found = node
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == name);
        let first = found.next();
        if let Some(second) = found.next() {
            return Err(self.err(second, format!("{ctx} has more than one <{name}>")));
        }
        Ok(first)
    }

    /// The finite number in the required child `name` of `parent`.
    fn number(&self, parent: Node<'a, 'input>, name: &str, ctx: &str) -> Result<f64> {
        let Some(node) = self.child(parent, name, ctx)? else {
            return Err(self.err(parent, format!("{ctx} has no <{name}>")));
        };
        let t = text_of(node);
        match t.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(self.err(
                node,
                format!("{ctx}: <{name}> is `{t}`, not a finite number"),
            )),
        }
    }
}

/// The text inside an element (all its text descendants), trimmed.
fn text_of(node: Node) -> String {
    node.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect::<String>()
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

/// The CSV columns: required, then optional.
const CSV_REQUIRED: [&str; 5] = ["image", "xmin", "ymin", "xmax", "ymax"];
const CSV_OPTIONAL: [&str; 1] = ["label"];

/// Read a CSV list of boxes: one `(image, box)` per data line, in file order.
///
/// ```text
/// image,xmin,ymin,xmax,ymax,label
/// photos/cat.jpg,12,30.5,200,180,cat
/// "a, b.jpg",0,0,10,10,
/// ```
///
/// - A header line is required. It names the columns `image,xmin,ymin,xmax,ymax` and optionally
///   `label`, in any order (names are trimmed and matched ignoring case); any other column name,
///   a repeated one or a missing required one is an error (so a data line where the header
///   should be is caught).
/// - Coordinates are **0-based pixel edges with `xmax`/`ymax` exclusive**, the
///   [`BoxXyxy`] convention taken as is (a box over pixel columns 10..=19 is `xmin 10, xmax 20`);
///   fractions are allowed; they must be finite with `xmax > xmin`, `ymax > ymin`. Boxes are
///   not clipped here ([`to_model_view`] clamps).
/// - `image` is the image's path as the caller matches it (typically relative to the CSV's
///   directory or a dataset root — the caller decides); it must not be empty. An empty label is
///   None. One image may have several lines (several boxes).
/// - Standard CSV quoting (RFC 4180: `"a, b.jpg"`, `""` for a quote) is honoured; spaces around
///   fields are trimmed; blank lines and lines starting with `#` are skipped; a UTF-8 byte
///   order mark is ignored.
///
/// Errors are [`Error::Usage`] naming the file, the line and the field at fault.
pub fn read_csv(path: &Path) -> Result<Vec<(String, BoxXyxy)>> {
    let text = read_text(path, "boxes file")?;
    let usage = |line: u64, msg: String| {
        Error::Usage(format!("boxes file {}: line {line}: {msg}", path.display()))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let expected = "image,xmin,ymin,xmax,ymax[,label]";

    // The csv crate's position of a record is where it began reading it, before the blank and
    // comment lines it skipped: step over those, then count newlines.
    let line_at = |pos: Option<&csv::Position>| {
        let bytes = text.as_bytes();
        let mut at = pos.map_or(0, |p| p.byte() as usize).min(bytes.len());
        let mut line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64;
        while let Some(nl) = bytes[at..].iter().position(|&b| b == b'\n') {
            let l = &bytes[at..at + nl];
            if !(l.is_empty() || l == b"\r" || l.starts_with(b"#")) {
                break;
            }
            at += nl + 1;
            line += 1;
        }
        line
    };
    let csv_error = |e: csv::Error| {
        let line = line_at(e.position());
        usage(line, format!("not readable as CSV: {e}"))
    };
    let header = match records.next() {
        None => {
            return Err(Error::Usage(format!(
                "boxes file {}: empty: a header line `{expected}` is required",
                path.display()
            )))
        }
        Some(r) => r.map_err(csv_error)?,
    };
    let header_line = line_at(header.position());
    // Column index of each of image, xmin, ymin, xmax, ymax, label.
    let mut cols: [Option<usize>; 6] = [None; 6];
    for (i, name) in header.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        let Some(k) = CSV_REQUIRED
            .iter()
            .chain(&CSV_OPTIONAL)
            .position(|&c| c == lower)
        else {
            return Err(usage(
                header_line,
                format!("unknown column `{name}` (the header must be `{expected}`)"),
            ));
        };
        if cols[k].replace(i).is_some() {
            return Err(usage(
                header_line,
                format!("column `{name}` appears twice in the header"),
            ));
        }
    }
    if let Some(k) = (0..CSV_REQUIRED.len()).find(|&k| cols[k].is_none()) {
        return Err(usage(
            header_line,
            format!(
                "the header has no `{}` column (the header must be `{expected}`)",
                CSV_REQUIRED[k]
            ),
        ));
    }
    let ncols = header.len();

    let mut out = Vec::new();
    for record in records {
        let record = record.map_err(csv_error)?;
        let line = line_at(record.position());
        if record.len() != ncols {
            return Err(usage(
                line,
                format!(
                    "{} fields, but the header has {ncols} (`{}`)",
                    record.len(),
                    header.iter().collect::<Vec<_>>().join(",")
                ),
            ));
        }
        let field = |k: usize| cols[k].map(|i| &record[i]);
        let image = field(0).unwrap_or_default();
        if image.is_empty() {
            return Err(usage(line, "`image` is empty".into()));
        }
        let mut v = [0.0f64; 4];
        for (k, slot) in v.iter_mut().enumerate() {
            let t = field(k + 1).unwrap_or_default();
            *slot = match t.parse::<f64>() {
                Ok(x) if x.is_finite() => x,
                _ => {
                    return Err(usage(
                        line,
                        format!("`{}` is `{t}`, not a finite number", CSV_REQUIRED[k + 1]),
                    ))
                }
            };
        }
        let [x0, y0, x1, y1] = v;
        if x1 <= x0 || y1 <= y0 {
            return Err(usage(
                line,
                format!(
                    "empty box (xmin {x0}, ymin {y0}, xmax {x1}, ymax {y1}): xmax and ymax are \
                     exclusive and must exceed xmin and ymin"
                ),
            ));
        }
        let label = field(5).filter(|l| !l.is_empty()).map(str::to_owned);
        out.push((
            image.to_owned(),
            BoxXyxy {
                x0,
                y0,
                x1,
                y1,
                label,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(x0: f64, y0: f64, x1: f64, y1: f64) -> BoxXyxy {
        BoxXyxy {
            x0,
            y0,
            x1,
            y1,
            label: None,
        }
    }

    fn px(x0: u32, y0: u32, x1: u32, y1: u32) -> BoxPx {
        BoxPx { x0, y0, x1, y1 }
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn usage_msg(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn crop_mode_on_a_landscape_voc_image() {
        // 500×375 at S = 224: resized to 298×224 (scale 298/500 in x, 224/375 in y), crop
        // offset x = round(74/2) = 37, y = 0.
        let (w, h, s) = (500, 375, 224);
        // sx = 298/500 = 0.596, sy = 224/375 = 0.5973.
        // x: 100·sx − 37 = 22.6 → ceil(22.1) = 23; 300·sx − 37 = 141.8 → ceil(141.3) = 142.
        // y: 50·sy = 29.87 → ceil(29.37) = 30; 250·sy = 149.33 → ceil(148.83) = 149.
        let got = to_model_view(&bx(100.0, 50.0, 300.0, 250.0), w, h, s, ResizeMode::Crop);
        assert_eq!(got, px(23, 30, 142, 149));
        // The whole image covers the whole view.
        let all = to_model_view(&bx(0.0, 0.0, 500.0, 375.0), w, h, s, ResizeMode::Crop);
        assert_eq!(all, px(0, 0, 224, 224));
        // A box in the cropped-away left margin (x < 37/sx = 62.08) is empty.
        let left = to_model_view(&bx(0.0, 0.0, 60.0, 375.0), w, h, s, ResizeMode::Crop);
        assert_eq!(left, BoxPx::EMPTY);
        // A box straddling the crop's right edge is clamped: 450·sx − 37 = 231.2 → 224;
        // 400·sx − 37 = 201.4 → ceil(200.9) = 201; 10·sy = 5.97 → ceil(5.47) = 6.
        let right = to_model_view(&bx(400.0, 0.0, 450.0, 10.0), w, h, s, ResizeMode::Crop);
        assert_eq!(right, px(201, 0, 224, 6));
    }

    #[test]
    fn crop_mode_on_a_portrait_image_with_odd_half_offset() {
        // 100×130 at S = 20: resized 20×26 (scale 0.2), offset y = round(6/2) = 3.
        let got = to_model_view(&bx(10.0, 15.0, 50.0, 100.0), 100, 130, 20, ResizeMode::Crop);
        // x: 2 .. 10; y: 15·0.2 − 3 = 0 → 0, 100·0.2 − 3 = 17 → 17.
        assert_eq!(got, px(2, 0, 10, 17));
        // 40×54 at S = 16: resized 16×21 (int(16·54/40) = int(21.6)), offset round(5/2) =
        // round(2.5) = 2 (half to even). Scales 0.4 in x, 21/54 in y:
        // y 10·21/54 − 2 = 1.89 → ceil(1.39) = 2 .. 20·21/54 − 2 = 5.78 → ceil(5.28) = 6.
        assert_eq!(shorter_side_to(40, 54, 16), (16, 21));
        let got = to_model_view(&bx(0.0, 10.0, 40.0, 20.0), 40, 54, 16, ResizeMode::Crop);
        assert_eq!(got, px(0, 2, 16, 6));
        // The scale in y is rh/h = 21/54, not 0.4: the full height maps to 0..21 − 2, clamped.
        let got = to_model_view(&bx(0.0, 0.0, 40.0, 54.0), 40, 54, 16, ResizeMode::Crop);
        assert_eq!(got, px(0, 0, 16, 16));
    }

    #[test]
    fn crop_mode_with_shorter_side_already_s_only_crops() {
        // 30×20 at S = 20: no resize, crop offset x = 5.
        let got = to_model_view(&bx(7.0, 3.0, 12.0, 9.0), 30, 20, 20, ResizeMode::Crop);
        assert_eq!(got, px(2, 3, 7, 9));
    }

    #[test]
    fn stretch_mode_scales_each_axis() {
        // 448×112 at S = 224: x halves, y doubles.
        let got = to_model_view(
            &bx(100.0, 10.0, 300.0, 50.0),
            448,
            112,
            224,
            ResizeMode::Stretch,
        );
        assert_eq!(got, px(50, 20, 150, 100));
        // 3×3 → 2×2: a box over pixel 1 (x 1..2) maps to 0.667..1.333: centre 0.5 misses,
        // centre 1.5 misses → empty (thinner than a view pixel, between centres).
        let thin = to_model_view(&bx(1.0, 1.0, 2.0, 2.0), 3, 3, 2, ResizeMode::Stretch);
        assert_eq!(thin, BoxPx::EMPTY);
        // Fractional edges: 500×375 → 224 (x·0.448, y·0.597..): 10.5 → 4.704 → ceil(4.204) = 5.
        let got = to_model_view(
            &bx(10.5, 0.0, 500.0, 375.0),
            500,
            375,
            224,
            ResizeMode::Stretch,
        );
        assert_eq!(got, px(5, 0, 224, 224));
    }

    #[test]
    fn an_s_by_s_image_is_unchanged_in_both_modes() {
        for mode in [ResizeMode::Crop, ResizeMode::Stretch] {
            let got = to_model_view(&bx(3.0, 4.0, 100.0, 224.0), 224, 224, 224, mode);
            assert_eq!(got, px(3, 4, 100, 224));
            // Clamped to the view.
            let got = to_model_view(&bx(-5.0, 200.0, 300.0, 400.0), 224, 224, 224, mode);
            assert_eq!(got, px(0, 200, 224, 224));
            let out = to_model_view(&bx(230.0, 0.0, 300.0, 10.0), 224, 224, 224, mode);
            assert_eq!(out, BoxPx::EMPTY);
        }
    }

    #[test]
    fn degenerate_inputs_give_empty_boxes() {
        let b = bx(0.0, 0.0, 10.0, 10.0);
        assert_eq!(to_model_view(&b, 0, 10, 8, ResizeMode::Crop), BoxPx::EMPTY);
        assert_eq!(
            to_model_view(&b, 10, 10, 0, ResizeMode::Stretch),
            BoxPx::EMPTY
        );
        let nan = bx(f64::NAN, 0.0, 5.0, 5.0);
        assert_eq!(
            to_model_view(&nan, 10, 10, 10, ResizeMode::Crop),
            BoxPx::EMPTY
        );
        let inverted = bx(8.0, 8.0, 2.0, 2.0);
        assert_eq!(
            to_model_view(&inverted, 10, 10, 10, ResizeMode::Crop),
            BoxPx::EMPTY
        );
        assert!(BoxPx::EMPTY.is_empty());
        assert_eq!(BoxPx::EMPTY.area(), 0);
        assert_eq!(px(1, 2, 4, 7).area(), 15);
        assert_eq!(px(4, 2, 1, 7).area(), 0);
    }

    const VOC: &str = r#"<?xml version="1.0"?>
<annotation>
	<folder>VOC2007</folder>
	<filename>000001.jpg</filename>
	<size>
		<width>353</width>
		<height>500</height>
		<depth>3</depth>
	</size>
	<object>
		<name>dog</name>
		<difficult>0</difficult>
		<bndbox>
			<xmin>48</xmin>
			<ymin>240</ymin>
			<xmax>195</xmax>
			<ymax>371</ymax>
		</bndbox>
		<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>
	</object>
	<object>
		<name>person</name>
		<bndbox><xmin>8.5</xmin><ymin>12</ymin><xmax> 352 </xmax><ymax>498.25</ymax></bndbox>
	</object>
</annotation>
"#;

    #[test]
    fn voc_annotation_is_read_and_converted_to_zero_based_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "000001.xml", VOC);
        let (name, w, h, boxes) = read_voc_xml(&p).unwrap();
        assert_eq!(name.as_deref(), Some("000001.jpg"));
        assert_eq!((w, h), (353, 500));
        assert_eq!(
            boxes,
            vec![
                BoxXyxy {
                    x0: 47.0,
                    y0: 239.0,
                    x1: 195.0,
                    y1: 371.0,
                    label: Some("dog".into())
                },
                BoxXyxy {
                    x0: 7.5,
                    y0: 11.0,
                    x1: 352.0,
                    y1: 498.25,
                    label: Some("person".into())
                },
            ]
        );
        // No objects, no filename, float size: fine.
        let p = write(
            &dir,
            "empty.xml",
            "<annotation><size><width>10.0</width><height>20</height></size></annotation>",
        );
        assert_eq!(read_voc_xml(&p).unwrap(), (None, 10, 20, vec![]));
    }

    #[test]
    fn voc_errors_name_the_file_the_line_and_the_element() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("nosize.xml", "<annotation>\n<filename>a.jpg</filename>\n</annotation>", "line 1: <annotation> has no <size>"),
            (
                "nowidth.xml",
                "<annotation>\n<size>\n<height>5</height></size></annotation>",
                "line 2: <size> has no <width>",
            ),
            (
                "zerowidth.xml",
                "<annotation><size><width>0</width><height>5</height></size></annotation>",
                "<width> is 0, not a positive whole number",
            ),
            (
                "noxmax.xml",
                "<annotation><size><width>5</width><height>5</height></size>\n<object><name>cat</name>\n<bndbox><xmin>1</xmin><ymin>1</ymin><ymax>2</ymax></bndbox></object></annotation>",
                "line 3: <object> 1 (cat) <bndbox> has no <xmax>",
            ),
            (
                "nobndbox.xml",
                "<annotation><size><width>5</width><height>5</height></size>\n<object/>\n<object>\n<name>x</name></object></annotation>",
                "line 2: <object> 1 has no <bndbox>",
            ),
            (
                "badnum.xml",
                "<annotation><size><width>5</width><height>5</height></size><object><bndbox><xmin>one</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>",
                "<object> 1 <bndbox>: <xmin> is `one`, not a finite number",
            ),
            (
                "inverted.xml",
                "<annotation><size><width>5</width><height>5</height></size><object><bndbox><xmin>3</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>",
                "empty box",
            ),
            (
                "twice.xml",
                "<annotation><size><width>5</width><width>6</width><height>5</height></size></annotation>",
                "<size> has more than one <width>",
            ),
            ("root.xml", "<voc></voc>", "the root element is <voc>"),
            ("broken.xml", "<annotation><size>", "not well-formed XML"),
            ("notxml.xml", "", "not well-formed XML"),
        ];
        for (name, text, want) in cases {
            let p = write(&dir, name, text);
            let msg = usage_msg(read_voc_xml(&p));
            assert!(msg.contains(&p.display().to_string()), "{name}: {msg}");
            assert!(msg.contains(want), "{name}: `{msg}` lacks `{want}`");
        }
        let missing = dir.path().join("nope.xml");
        let msg = usage_msg(read_voc_xml(&missing));
        assert!(
            msg.contains("nope.xml") && msg.contains("cannot read"),
            "{msg}"
        );
        let msg = usage_msg(read_voc_xml(dir.path()));
        assert!(msg.contains("not a regular file"), "{msg}");
        let p = dir.path().join("latin1.xml");
        std::fs::write(&p, b"<annotation>\n<filename>\xe9</filename></annotation>").unwrap();
        let msg = usage_msg(read_voc_xml(&p));
        assert!(msg.contains("line 2: not valid UTF-8"), "{msg}");
    }

    #[test]
    fn csv_boxes_are_read_with_quoting_comments_and_any_column_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "boxes.csv",
            "\u{feff}image, xmin,ymin,xmax,ymax,Label\n\
             # a comment\n\
             photos/cat.jpg,12,30.5,200,180,cat\n\
             \n\
             \"a, b.jpg\" , 0,0,10,10,\n",
        );
        let got = read_csv(&p).unwrap();
        assert_eq!(
            got,
            vec![
                (
                    "photos/cat.jpg".to_owned(),
                    BoxXyxy {
                        x0: 12.0,
                        y0: 30.5,
                        x1: 200.0,
                        y1: 180.0,
                        label: Some("cat".into())
                    }
                ),
                ("a, b.jpg".to_owned(), bx(0.0, 0.0, 10.0, 10.0)),
            ]
        );
        let p = write(
            &dir,
            "order.csv",
            "ymax,xmax,ymin,xmin,image\n4,3,2,1,x.png\n",
        );
        assert_eq!(
            read_csv(&p).unwrap(),
            vec![("x.png".to_owned(), bx(1.0, 2.0, 3.0, 4.0))]
        );
        let p = write(&dir, "header_only.csv", "image,xmin,ymin,xmax,ymax\n");
        assert_eq!(read_csv(&p).unwrap(), vec![]);
    }

    #[test]
    fn csv_errors_name_the_file_the_line_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let h = "image,xmin,ymin,xmax,ymax\n";
        let cases = [
            ("empty.csv", String::new(), "empty: a header line"),
            (
                "noheader.csv",
                "a.jpg,1,2,3,4\n".into(),
                "line 1: unknown column `a.jpg`",
            ),
            (
                "missingcol.csv",
                "image,xmin,ymin,xmax\n".into(),
                "line 1: the header has no `ymax` column",
            ),
            (
                "dupcol.csv",
                "image,xmin,ymin,xmax,ymax,xmin\n".into(),
                "column `xmin` appears twice",
            ),
            (
                "fields.csv",
                format!("{h}a.jpg,1,2,3,4\nb.jpg,1,2,3\n"),
                "line 3: 4 fields, but the header has 5",
            ),
            (
                "number.csv",
                format!("{h}\n# c\n\na.jpg,1,2,x3,4\n"),
                "line 5: `xmax` is `x3`, not a finite number",
            ),
            (
                "crlf.csv",
                "image,xmin,ymin,xmax,ymax\r\n\r\na.jpg,1,2,x,4\r\n".into(),
                "line 3: `xmax` is `x`",
            ),
            (
                "late_header.csv",
                format!("\n# c\n{h}a.jpg,1,2,3\n"),
                "line 4: 4 fields",
            ),
            (
                "nan.csv",
                format!("{h}a.jpg,NaN,2,3,4\n"),
                "line 2: `xmin` is `NaN`",
            ),
            (
                "inverted.csv",
                format!("{h}a.jpg,5,2,5,4\n"),
                "line 2: empty box",
            ),
            (
                "noimage.csv",
                format!("{h}\"\",1,2,3,4\n"),
                "line 2: `image` is empty",
            ),
        ];
        for (name, text, want) in cases {
            let p = write(&dir, name, &text);
            let msg = usage_msg(read_csv(&p));
            assert!(msg.contains(&p.display().to_string()), "{name}: {msg}");
            assert!(msg.contains(want), "{name}: `{msg}` lacks `{want}`");
        }
        let p = dir.path().join("bad_utf8.csv");
        std::fs::write(&p, b"image,xmin,ymin,xmax,ymax\n\xff.jpg,1,2,3,4\n").unwrap();
        let msg = usage_msg(read_csv(&p));
        assert!(msg.contains("line 2: not valid UTF-8"), "{msg}");
        let msg = usage_msg(read_csv(&dir.path().join("absent.csv")));
        assert!(
            msg.contains("absent.csv") && msg.contains("cannot read"),
            "{msg}"
        );
    }
}
