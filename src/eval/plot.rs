//! Deletion and insertion curves as a PNG: one panel per game, side by side, each with its
//! axes (x: fraction of pixels changed, y: class probability, ticks at 0, 0.5 and 1), the
//! curves of every method, and a legend giving each method's AUC ([`crate::eval::metrics::auc`]).
//!
//! Drawn by hand into an RGB buffer: anti-aliased lines, and text from pre-rasterised Noto Sans
//! Mono glyphs compiled into the binary (the `noto-sans-mono-bitmap` crate), so plotting needs
//! no system fonts or libraries. Characters the font lacks are drawn as `?`.

use std::path::Path;

use noto_sans_mono_bitmap::{get_raster, get_raster_width, FontWeight, RasterHeight};

use crate::error::{Error, Result};
use crate::eval::metrics::auc;

/// One curve: a method's class probability after each step of a game.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The method's name, shown in the legend with the curve's AUC.
    pub label: String,
    /// The curve: point `i` of `n` is at `x = i/(n−1)` (evenly spaced on `[0, 1]`, as RISE
    /// plots them). Values are probabilities in `[0, 1]`; values outside are drawn at the
    /// frame's edge and NaN points leave a gap.
    pub values: Vec<f32>,
    /// The curve's colour (RGB).
    pub colour: [u8; 3],
}

/// Width of one panel, in pixels.
pub const PANEL_WIDTH: u32 = 600;

// Layout within a panel (pixels).
const TITLE_TOP: usize = 10;
const PANEL_TITLE_TOP: usize = 46;
const PLOT_LEFT: usize = 78;
const PLOT_RIGHT_MARGIN: usize = 28;
const PLOT_TOP: usize = 80;
const PLOT_HEIGHT: usize = 340;
const LEGEND_TOP: usize = PLOT_TOP + PLOT_HEIGHT + 66;
const LEGEND_ROW: usize = 24;
const BOTTOM_MARGIN: usize = 12;
const LINE_WIDTH: f32 = 2.4;

const WHITE: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [226, 226, 226];

/// Render the deletion and insertion curves: `(rgb, width, height)`, RGB8 row-major. A panel
/// is drawn for each non-empty list (deletion left, insertion right), [`PANEL_WIDTH`] wide
/// each; the height grows with the longest legend. `None` when both lists are empty.
pub fn render_curves(
    title: &str,
    deletion: &[Series],
    insertion: &[Series],
) -> Option<(Vec<u8>, u32, u32)> {
    let panels: Vec<(&str, &[Series])> = [
        ("Deletion (AUC: lower is better)", deletion),
        ("Insertion (AUC: higher is better)", insertion),
    ]
    .into_iter()
    .filter(|(_, s)| !s.is_empty())
    .collect();
    if panels.is_empty() {
        return None;
    }
    let rows = panels.iter().map(|(_, s)| s.len()).max().unwrap_or(1);
    let w = PANEL_WIDTH as usize * panels.len();
    let h = LEGEND_TOP + rows * LEGEND_ROW + BOTTOM_MARGIN;
    let mut canvas = Canvas::new(w, h);
    canvas.text_centered(w / 2, TITLE_TOP, title, Font::TITLE, INK, w - 20);
    for (i, (panel_title, series)) in panels.into_iter().enumerate() {
        draw_panel(&mut canvas, i * PANEL_WIDTH as usize, panel_title, series);
    }
    Some((canvas.rgb, w as u32, h as u32))
}

/// Write the deletion and insertion curves of several methods as one PNG at `path` (see
/// [`render_curves`]), atomically. Errors are [`Error::Output`] naming `path` (also when both
/// lists are empty: there is nothing to plot).
pub fn write_curves_png(
    path: &Path,
    title: &str,
    deletion: &[Series],
    insertion: &[Series],
) -> Result<()> {
    let Some((rgb, w, h)) = render_curves(title, deletion, insertion) else {
        return Err(Error::output(
            path,
            "nothing to plot: no deletion or insertion curves",
        ));
    };
    crate::image::write_png(path, &rgb, w, h)
}

fn draw_panel(c: &mut Canvas, left: usize, title: &str, series: &[Series]) {
    let pw = PANEL_WIDTH as usize;
    let (x0, y0) = (left + PLOT_LEFT, PLOT_TOP);
    let (x1, y1) = (left + pw - PLOT_RIGHT_MARGIN, PLOT_TOP + PLOT_HEIGHT);
    let (plot_w, plot_h) = ((x1 - x0) as f32, (y1 - y0) as f32);
    let to_px = |fx: f32, fy: f32| (x0 as f32 + fx * plot_w, y1 as f32 - fy * plot_h);

    c.text_centered(
        left + pw / 2,
        PANEL_TITLE_TOP,
        title,
        Font::HEADING,
        INK,
        pw - 20,
    );

    // Grid at quarters, frame, ticks and tick labels at 0, 0.5, 1.
    for q in 1..4 {
        let f = q as f32 / 4.0;
        let (gx, gy) = to_px(f, f);
        c.vline(gx.round() as usize, y0, y1, GRID);
        c.hline(x0, x1, gy.round() as usize, GRID);
    }
    c.rect_outline(x0, y0, x1, y1, INK);
    let tick = Font::TICK;
    for (f, label) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
        let (tx, ty) = to_px(f, f);
        let (tx, ty) = ((tx.round() as usize).min(x1), (ty.round() as usize).min(y1));
        c.vline(tx, y1, y1 + 5, INK);
        c.hline(x0 - 5, x0, ty, INK);
        c.text_centered(tx, y1 + 8, label, tick, INK, 60);
        let lw = tick.width(label);
        c.text(
            x0 - 8 - lw,
            ty.saturating_sub(tick.height() / 2),
            label,
            tick,
            INK,
        );
    }
    let label = Font::LABEL;
    c.text_centered(
        (x0 + x1) / 2,
        y1 + 30,
        "fraction of pixels",
        label,
        INK,
        x1 - x0,
    );
    let ylabel = "class probability";
    c.text_rotated(
        left + 14,
        (y0 + y1) / 2 + label.width(ylabel) / 2,
        ylabel,
        label,
        INK,
    );

    // Curves, clipped to the frame widened by the line's half width.
    let clip = (
        x0 as f32 - 2.0,
        y0 as f32 - 2.0,
        x1 as f32 + 2.0,
        y1 as f32 + 2.0,
    );
    for s in series {
        let n = s.values.len();
        let points: Vec<Option<(f32, f32)>> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let fx = if n > 1 {
                    i as f32 / (n - 1) as f32
                } else {
                    0.0
                };
                (!v.is_nan()).then(|| to_px(fx, v.clamp(0.0, 1.0)))
            })
            .collect();
        c.polyline(&points, LINE_WIDTH, s.colour, clip);
    }

    // Legend: swatch, label padded to the longest, AUC.
    let width_chars = (pw - 60 - 40) / label.char_width();
    let name_chars = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0)
        .min(width_chars.saturating_sub(10));
    for (i, s) in series.iter().enumerate() {
        let y = LEGEND_TOP + i * LEGEND_ROW;
        let mid = (y + label.height() / 2) as f32;
        let sx = (left + 40) as f32;
        c.polyline(
            &[Some((sx, mid)), Some((sx + 30.0, mid))],
            LINE_WIDTH + 0.6,
            s.colour,
            (0.0, 0.0, c.w as f32, c.h as f32),
        );
        let a = auc(&s.values);
        let auc_text = if a.is_finite() {
            format!("AUC {a:.3}")
        } else {
            "AUC n/a".to_owned()
        };
        let name = fit(&s.label, name_chars);
        let pad = name_chars.saturating_sub(name.chars().count());
        let line = format!("{name}{}  {auc_text}", " ".repeat(pad));
        c.text(left + 80, y, &line, label, INK);
    }
}

/// `text` cut to `max` characters, ending in `...` when cut.
fn fit(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let keep = max.saturating_sub(3);
    text.chars()
        .take(keep)
        .chain("...".chars())
        .take(max)
        .collect()
}

#[derive(Clone, Copy)]
struct Font {
    weight: FontWeight,
    size: RasterHeight,
}

impl Font {
    const TITLE: Font = Font {
        weight: FontWeight::Bold,
        size: RasterHeight::Size24,
    };
    const HEADING: Font = Font {
        weight: FontWeight::Bold,
        size: RasterHeight::Size20,
    };
    const LABEL: Font = Font {
        weight: FontWeight::Regular,
        size: RasterHeight::Size20,
    };
    const TICK: Font = Font {
        weight: FontWeight::Regular,
        size: RasterHeight::Size16,
    };

    fn char_width(self) -> usize {
        get_raster_width(self.weight, self.size)
    }

    fn height(self) -> usize {
        self.size.val()
    }

    fn width(self, text: &str) -> usize {
        text.chars().count() * self.char_width()
    }

    /// The glyph's coverage, row-major `char_width × height`; `?` for characters the font
    /// lacks (and a blank cell if even that failed).
    fn glyph(self, ch: char) -> Option<&'static [u8]> {
        get_raster(ch, self.weight, self.size)
            .or_else(|| get_raster('?', self.weight, self.size))
            .map(|r| r.pixels())
    }
}

/// An RGB8 image being drawn on.
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            rgb: WHITE.repeat(w * h),
        }
    }

    /// Blend `colour` over pixel (x, y) with opacity `alpha` in [0, 1]; outside: nothing.
    fn blend(&mut self, x: usize, y: usize, colour: [u8; 3], alpha: f32) {
        if x >= self.w || y >= self.h || alpha <= 0.0 {
            return;
        }
        let a = alpha.min(1.0);
        let i = (y * self.w + x) * 3;
        for (k, &c) in colour.iter().enumerate() {
            let old = f32::from(self.rgb[i + k]);
            self.rgb[i + k] = (old + (f32::from(c) - old) * a).round() as u8;
        }
    }

    fn hline(&mut self, x0: usize, x1: usize, y: usize, colour: [u8; 3]) {
        for x in x0..=x1 {
            self.blend(x, y, colour, 1.0);
        }
    }

    fn vline(&mut self, x: usize, y0: usize, y1: usize, colour: [u8; 3]) {
        for y in y0..=y1 {
            self.blend(x, y, colour, 1.0);
        }
    }

    fn rect_outline(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, colour: [u8; 3]) {
        self.hline(x0, x1, y0, colour);
        self.hline(x0, x1, y1, colour);
        self.vline(x0, y0, y1, colour);
        self.vline(x1, y0, y1, colour);
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: usize, y: usize, text: &str, font: Font, colour: [u8; 3]) {
        let (cw, ch) = (font.char_width(), font.height());
        for (n, c) in text.chars().enumerate() {
            let Some(px) = font.glyph(c) else { continue };
            for gy in 0..ch {
                for gx in 0..cw {
                    let a = f32::from(px[gy * cw + gx]) / 255.0;
                    self.blend(x + n * cw + gx, y + gy, colour, a);
                }
            }
        }
    }

    /// Text centred on `cx`, top at `y`, cut to `max_w` pixels.
    fn text_centered(
        &mut self,
        cx: usize,
        y: usize,
        text: &str,
        font: Font,
        colour: [u8; 3],
        max_w: usize,
    ) {
        let text = fit(text, max_w / font.char_width());
        let x = cx.saturating_sub(font.width(&text) / 2);
        self.text(x, y, &text, font, colour);
    }

    /// Text turned 90° anticlockwise (read bottom to top), starting at (x, y_bottom).
    fn text_rotated(&mut self, x: usize, y_bottom: usize, text: &str, font: Font, colour: [u8; 3]) {
        let (cw, ch) = (font.char_width(), font.height());
        for (n, c) in text.chars().enumerate() {
            let Some(px) = font.glyph(c) else { continue };
            for gy in 0..ch {
                for gx in 0..cw {
                    let a = f32::from(px[gy * cw + gx]) / 255.0;
                    let along = n * cw + gx;
                    if along <= y_bottom {
                        self.blend(x + gy, y_bottom - along, colour, a);
                    }
                }
            }
        }
    }

    /// An anti-aliased polyline `width` pixels wide through the points (None breaks it; a lone
    /// point is a dot). Coverage is accumulated per pixel (max over segments) and blended once,
    /// so joints do not darken. Pixels whose centres lie outside `clip` (x0, y0, x1, y1) are not
    /// drawn.
    fn polyline(
        &mut self,
        points: &[Option<(f32, f32)>],
        width: f32,
        colour: [u8; 3],
        clip: (f32, f32, f32, f32),
    ) {
        let r = width / 2.0;
        let mut segments = Vec::new();
        for (i, p) in points.iter().enumerate() {
            let Some(a) = *p else { continue };
            let prev = i.checked_sub(1).and_then(|j| points[j]);
            let next = points.get(i + 1).copied().flatten();
            if let Some(b) = next {
                segments.push((a, b));
            } else if prev.is_none() {
                segments.push((a, a));
            }
        }
        if segments.is_empty() {
            return;
        }
        let (bx0, by0) = (
            clip.0.max(0.0).floor() as usize,
            clip.1.max(0.0).floor() as usize,
        );
        let bx1 = (clip.2.ceil().max(0.0) as usize).min(self.w);
        let by1 = (clip.3.ceil().max(0.0) as usize).min(self.h);
        if bx1 <= bx0 || by1 <= by0 {
            return;
        }
        let cov_w = bx1 - bx0;
        let mut cov = vec![0.0f32; cov_w * (by1 - by0)];
        for ((ax, ay), (bx, by)) in segments {
            let lo_x = (ax.min(bx) - r - 1.0).floor().max(bx0 as f32) as usize;
            let hi_x = ((ax.max(bx) + r + 1.0).ceil().max(0.0) as usize).min(bx1);
            let lo_y = (ay.min(by) - r - 1.0).floor().max(by0 as f32) as usize;
            let hi_y = ((ay.max(by) + r + 1.0).ceil().max(0.0) as usize).min(by1);
            let (dx, dy) = (bx - ax, by - ay);
            let len2 = dx * dx + dy * dy;
            for py in lo_y..hi_y {
                for px in lo_x..hi_x {
                    let (cx, cy) = (px as f32 + 0.5, py as f32 + 0.5);
                    if cx < clip.0 || cx > clip.2 || cy < clip.1 || cy > clip.3 {
                        continue;
                    }
                    let t = if len2 > 0.0 {
                        (((cx - ax) * dx + (cy - ay) * dy) / len2).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    let (qx, qy) = (ax + t * dx - cx, ay + t * dy - cy);
                    let d = (qx * qx + qy * qy).sqrt();
                    let a = (r + 0.5 - d).clamp(0.0, 1.0);
                    let slot = &mut cov[(py - by0) * cov_w + (px - bx0)];
                    *slot = slot.max(a);
                }
            }
        }
        for (i, &a) in cov.iter().enumerate() {
            if a > 0.0 {
                self.blend(bx0 + i % cov_w, by0 + i / cov_w, colour, a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(label: &str, values: Vec<f32>, colour: [u8; 3]) -> Series {
        Series {
            label: label.into(),
            values,
            colour,
        }
    }

    /// Deletion falls, insertion rises (steps 0..=n).
    fn example(n: usize, shift: f32) -> (Vec<Series>, Vec<Series>) {
        let del = |k: f32| -> Vec<f32> {
            (0..=n)
                .map(|i| (-(k + shift) * i as f32 / n as f32).exp())
                .collect()
        };
        let ins = |k: f32| -> Vec<f32> {
            (0..=n)
                .map(|i| 1.0 - (-(k + shift) * i as f32 / n as f32).exp())
                .collect()
        };
        (
            vec![
                series("scorecam", del(8.0), [214, 39, 40]),
                series("gradcam", del(4.0), [31, 119, 180]),
                series("random", del(1.0), [127, 127, 127]),
            ],
            vec![
                series("scorecam", ins(8.0), [214, 39, 40]),
                series("gradcam", ins(4.0), [31, 119, 180]),
                series("random", ins(1.0), [127, 127, 127]),
            ],
        )
    }

    fn decode(path: &Path) -> image::RgbImage {
        image::ImageReader::open(path)
            .unwrap()
            .decode()
            .unwrap()
            .into_rgb8()
    }

    #[test]
    fn png_decodes_with_the_expected_size_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let (del, ins) = example(224, 0.0);
        write_curves_png(&path, "Score-CAM vs Grad-CAM, VGG16, 50 images", &del, &ins).unwrap();
        let img = decode(&path);
        let h = (LEGEND_TOP + 3 * LEGEND_ROW + BOTTOM_MARGIN) as u32;
        assert_eq!(img.dimensions(), (2 * PANEL_WIDTH, h));
        // Not blank: plenty of non-white pixels, each curve's colour present, text ink present.
        let non_white = img.pixels().filter(|p| p.0 != WHITE).count();
        assert!(non_white > 10_000, "{non_white} non-white pixels");
        for s in &del {
            assert!(
                img.pixels().any(|p| p.0 == s.colour),
                "colour {:?}",
                s.colour
            );
        }
        assert!(img.pixels().any(|p| p.0 == INK));
        // No stray temporary files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Keep a copy to look at when asked.
        if let Ok(out) = std::env::var("SCORECAM_PLOT_SAMPLE") {
            std::fs::copy(&path, out).unwrap();
        }
    }

    #[test]
    fn different_curves_give_different_images() {
        let (del, ins) = example(50, 0.0);
        let (a, ..) = render_curves("t", &del, &ins).unwrap();
        let (b, ..) = render_curves("t", &del, &ins).unwrap();
        assert_eq!(a, b, "rendering is deterministic");
        let (del2, ins2) = example(50, 2.0);
        let (c, ..) = render_curves("t", &del2, &ins2).unwrap();
        assert_ne!(a, c);
        let (d, ..) = render_curves("another title", &del, &ins).unwrap();
        assert_ne!(a, d);
        // Only the deletion curves differ: the insertion panel (right half) is unchanged.
        let (e, w, h) = render_curves("t", &del2, &ins).unwrap();
        let half = |img: &[u8], right: bool| -> Vec<u8> {
            let (w, h) = (w as usize, h as usize);
            (TITLE_TOP + 30..h)
                .flat_map(|y| {
                    let x0 = if right { w / 2 } else { 0 };
                    img[(y * w + x0) * 3..(y * w + x0 + w / 2) * 3].to_vec()
                })
                .collect()
        };
        assert_eq!(half(&a, true), half(&e, true));
        assert_ne!(half(&a, false), half(&e, false));
    }

    #[test]
    fn one_panel_when_one_game_is_given() {
        let (del, ins) = example(10, 0.0);
        let (_, w, _) = render_curves("t", &del, &[]).unwrap();
        assert_eq!(w, PANEL_WIDTH);
        let (_, w, _) = render_curves("t", &[], &ins[..1]).unwrap();
        assert_eq!(w, PANEL_WIDTH);
        assert!(render_curves("t", &[], &[]).is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.png");
        match write_curves_png(&path, "t", &[], &[]) {
            Err(Error::Output { path: p, msg }) => {
                assert_eq!(p, path);
                assert!(msg.contains("nothing to plot"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());
    }

    #[test]
    fn odd_curves_and_labels_do_not_panic() {
        let long = "x".repeat(500);
        let odd = vec![
            series("empty", vec![], [1, 2, 3]),
            series("one point", vec![0.5], [200, 0, 0]),
            series(
                "gaps",
                vec![0.1, f32::NAN, 0.9, 2.0, -1.0, f32::INFINITY],
                [0, 200, 0],
            ),
            series(&long, vec![1.0, 0.0], [0, 0, 200]),
            series("ünïcödé ✓ 漢字", vec![0.2, 0.4], [9, 9, 9]),
        ];
        let (rgb, w, h) = render_curves(&long, &odd, &odd).unwrap();
        assert_eq!(rgb.len(), (w * h * 3) as usize);
        assert!(
            rgb.chunks(3).any(|p| p == [200, 0, 0]),
            "the lone point is drawn"
        );
        assert_eq!(fit("abcdef", 4), "a...");
        assert_eq!(fit("abc", 4), "abc");
        assert_eq!(fit("abcdef", 2), "..");
    }

    #[test]
    fn write_failures_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/curves.png");
        let (del, _) = example(4, 0.0);
        match write_curves_png(&path, "t", &del, &[]) {
            Err(Error::Output { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
    }
}
