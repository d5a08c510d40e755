//! The embedded label font (DejaVu Sans) and the text layout the grid needs: measuring, word
//! wrapping, shrink-to-fit into a box, and anti-aliased drawing onto RGB images.
use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage};

/// DejaVu Sans 2.37, copied from Debian's fonts-dejavu-core; license in
/// assets/fonts/LICENSE-DejaVu.txt (Bitstream Vera license, DejaVu changes public domain).
const DEJAVU_SANS: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Appended to text that still does not fit at the smallest size.
const ELLIPSIS: &str = "…";

/// The embedded font could not be parsed (a corrupted `assets/fonts/DejaVuSans.ttf`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the embedded font assets/fonts/DejaVuSans.ttf is not a valid TrueType font ({0}); restore it from /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf and rebuild"
)]
pub struct FontError(String);

/// A pixel rectangle on an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelRect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl PixelRect {
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x && x < self.x + self.width && y >= self.y && y < self.y + self.height
    }
}

/// How lines sit horizontally inside their box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Center,
    Right,
}

/// Text broken into lines at the size at which it fits its box.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedText {
    pub px: f32,
    pub lines: Vec<String>,
}

/// Sizes to try when fitting: from `max_px` down to `min_px`.
#[derive(Debug, Clone, Copy)]
pub struct SizeRange {
    pub max_px: f32,
    pub min_px: f32,
}

/// The embedded DejaVu Sans, ready to measure and draw.
pub struct LabelFont {
    font: FontRef<'static>,
}

impl LabelFont {
    /// Parses the embedded font.
    pub fn embedded() -> Result<Self, FontError> {
        let font = FontRef::try_from_slice(DEJAVU_SANS).map_err(|e| FontError(e.to_string()))?;
        Ok(Self { font })
    }

    /// Advance width of one line of text at `px`, kerning included.
    pub fn text_width(&self, text: &str, px: f32) -> f32 {
        let scaled = self.font.as_scaled(PxScale::from(px));
        let mut width = 0.0;
        let mut previous = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(prev) = previous {
                width += scaled.kern(prev, id);
            }
            width += scaled.h_advance(id);
            previous = Some(id);
        }
        width
    }

    /// Distance between baselines of consecutive lines at `px`.
    pub fn line_height(&self, px: f32) -> f32 {
        let scaled = self.font.as_scaled(PxScale::from(px));
        scaled.height() + scaled.line_gap()
    }

    /// Greedy word wrap to `max_width`; a word wider than the line is broken between characters.
    pub fn wrap(&self, text: &str, px: f32, max_width: f32) -> Vec<String> {
        let mut lines = Vec::new();
        for paragraph in text.split('\n') {
            let mut line = String::new();
            for word in paragraph.split_whitespace() {
                let candidate = if line.is_empty() {
                    word.to_string()
                } else {
                    format!("{line} {word}")
                };
                if self.text_width(&candidate, px) <= max_width {
                    line = candidate;
                    continue;
                }
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
                line = self.break_long_word(word, px, max_width, &mut lines);
            }
            lines.push(line);
        }
        lines
    }

    /// Pushes full-width pieces of `word` onto `lines` and returns the remainder.
    fn break_long_word(
        &self,
        word: &str,
        px: f32,
        max_width: f32,
        lines: &mut Vec<String>,
    ) -> String {
        let mut piece = String::new();
        for c in word.chars() {
            piece.push(c);
            if self.text_width(&piece, px) > max_width && piece.chars().count() > 1 {
                piece.pop();
                lines.push(std::mem::take(&mut piece));
                piece.push(c);
            }
        }
        piece
    }

    /// The largest size in `sizes` at which `text` wraps into `bounds`; at the smallest size the
    /// lines that do not fit are dropped and the last kept line ends with an ellipsis.
    pub fn fit(&self, text: &str, sizes: SizeRange, width: u32, height: u32) -> FittedText {
        let (width, height) = (width as f32, height as f32);
        let mut px = sizes.max_px;
        while px > sizes.min_px {
            let lines = self.wrap(text, px, width);
            if self.block_fits(&lines, px, width, height) {
                return FittedText { px, lines };
            }
            px -= 1.0;
        }
        let px = sizes.min_px;
        let lines = self.wrap(text, px, width);
        let max_lines = ((height / self.line_height(px)).floor() as usize).max(1);
        if lines.len() <= max_lines {
            return FittedText { px, lines };
        }
        let mut kept: Vec<String> = lines[..max_lines].to_vec();
        if let Some(last) = kept.last_mut() {
            *last = self.with_ellipsis(last, px, width);
        }
        FittedText { px, lines: kept }
    }

    fn block_fits(&self, lines: &[String], px: f32, width: f32, height: f32) -> bool {
        lines.len() as f32 * self.line_height(px) <= height
            && lines.iter().all(|line| self.text_width(line, px) <= width)
    }

    /// `line` shortened until `line…` fits `width`.
    fn with_ellipsis(&self, line: &str, px: f32, width: f32) -> String {
        let mut kept: Vec<char> = line.chars().collect();
        loop {
            let candidate: String = kept.iter().collect::<String>() + ELLIPSIS;
            if kept.is_empty() || self.text_width(&candidate, px) <= width {
                return candidate;
            }
            kept.pop();
        }
    }

    /// Draws fitted lines vertically centred in `rect`, clipped to it.
    pub fn draw(
        &self,
        image: &mut RgbImage,
        text: &FittedText,
        rect: PixelRect,
        align: Align,
        color: Rgb<u8>,
    ) {
        let line_height = self.line_height(text.px);
        let block_height = line_height * text.lines.len() as f32;
        let mut top = rect.y as f32 + ((rect.height as f32 - block_height) / 2.0).max(0.0);
        for line in &text.lines {
            let free = rect.width as f32 - self.text_width(line, text.px);
            let left = rect.x as f32
                + match align {
                    Align::Left => 0.0,
                    Align::Center => (free / 2.0).max(0.0),
                    Align::Right => free.max(0.0),
                };
            self.draw_line(image, line, (left, top), text.px, rect, color);
            top += line_height;
        }
    }

    /// Draws one line whose top-left corner is `origin`, blending glyph coverage into `image`.
    fn draw_line(
        &self,
        image: &mut RgbImage,
        line: &str,
        origin: (f32, f32),
        px: f32,
        clip: PixelRect,
        color: Rgb<u8>,
    ) {
        let scaled = self.font.as_scaled(PxScale::from(px));
        let baseline = origin.1 + scaled.ascent();
        let mut x = origin.0;
        let mut previous = None;
        for c in line.chars() {
            let id = scaled.glyph_id(c);
            if let Some(prev) = previous {
                x += scaled.kern(prev, id);
            }
            let glyph = id.with_scale_and_position(PxScale::from(px), point(x, baseline));
            if let Some(outlined) = self.font.outline_glyph(glyph) {
                let bounds = outlined.px_bounds();
                outlined.draw(|gx, gy, coverage| {
                    let px_x = bounds.min.x as i64 + gx as i64;
                    let px_y = bounds.min.y as i64 + gy as i64;
                    blend_pixel(image, (px_x, px_y), clip, color, coverage);
                });
            }
            x += scaled.h_advance(id);
            previous = Some(id);
        }
    }
}

/// Mixes `color` into the pixel at `at` with weight `coverage`, if it lies inside `clip`.
fn blend_pixel(
    image: &mut RgbImage,
    at: (i64, i64),
    clip: PixelRect,
    color: Rgb<u8>,
    coverage: f32,
) {
    let (Ok(x), Ok(y)) = (u32::try_from(at.0), u32::try_from(at.1)) else {
        return;
    };
    if !clip.contains(x, y) || x >= image.width() || y >= image.height() {
        return;
    }
    let weight = coverage.clamp(0.0, 1.0);
    let pixel = image.get_pixel_mut(x, y);
    for (channel, target) in pixel.0.iter_mut().zip(color.0) {
        let mixed = f32::from(*channel) * (1.0 - weight) + f32::from(target) * weight;
        *channel = mixed.round() as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn font() -> LabelFont {
        LabelFont::embedded().unwrap()
    }

    #[test]
    fn width_grows_with_text_and_size() {
        let font = font();
        let short = font.text_width("ab", 16.0);
        assert!(short > 0.0);
        assert!(font.text_width("abab", 16.0) > 1.9 * short);
        assert!((font.text_width("ab", 32.0) - 2.0 * short).abs() < 0.01);
    }

    #[test]
    fn wrap_keeps_words_and_breaks_overlong_ones() {
        let font = font();
        let lines = font.wrap(
            "alpha beta gamma",
            16.0,
            font.text_width("alpha beta", 16.0),
        );
        assert_eq!(lines, vec!["alpha beta", "gamma"]);
        let long = "db[learning_rate=2e-6,max_train_steps=400]";
        let lines = font.wrap(long, 16.0, 60.0);
        assert!(lines.len() > 3, "{lines:?}");
        assert_eq!(lines.concat(), long);
        assert!(lines.iter().all(|l| font.text_width(l, 16.0) <= 60.0));
    }

    #[test]
    fn fit_shrinks_then_truncates_with_ellipsis() {
        let font = font();
        let sizes = SizeRange {
            max_px: 20.0,
            min_px: 10.0,
        };
        let roomy = font.fit("seed 1", sizes, 200, 40);
        assert_eq!(
            roomy,
            FittedText {
                px: 20.0,
                lines: vec!["seed 1".to_string()]
            }
        );
        let tight = font.fit("a rather long label text", sizes, 120, 24);
        assert!(tight.px < 20.0 && tight.px >= 10.0);
        let hopeless = font.fit(&"word ".repeat(50), sizes, 60, 14);
        assert_eq!(hopeless.px, 10.0);
        assert_eq!(hopeless.lines.len(), 1);
        assert!(hopeless.lines[0].ends_with(ELLIPSIS));
        assert!(font.text_width(&hopeless.lines[0], 10.0) <= 60.0);
    }

    #[test]
    fn drawing_is_clipped_to_the_rect() {
        let font = font();
        let mut image = RgbImage::from_pixel(100, 40, Rgb([255, 255, 255]));
        let rect = PixelRect {
            x: 10,
            y: 10,
            width: 30,
            height: 20,
        };
        let text = FittedText {
            px: 18.0,
            lines: vec!["WWWWWWWW".to_string()],
        };
        font.draw(&mut image, &text, rect, Align::Left, Rgb([0, 0, 0]));
        let mut dark_inside = 0;
        for (x, y, pixel) in image.enumerate_pixels() {
            let dark = pixel.0 != [255, 255, 255];
            assert!(
                !dark || rect.contains(x, y),
                "ink outside the rect at ({x}, {y})"
            );
            dark_inside += usize::from(dark);
        }
        assert!(dark_inside > 50);
    }
}
