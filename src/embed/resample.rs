//! PIL's `Image.resize` for 8-bit RGB images with the BILINEAR and BICUBIC filters, exactly:
//! separable convolution whose support widens with the downscale factor (antialiasing), weights
//! normalised per output pixel then turned into 22-bit fixed point, one pass per axis rounded to
//! 8 bits (each only when that side changes; the order as Pillow 13.0 picks it). transformers'
//! PIL image processors resize through it, so equal bytes here mean equal pixel values there.

/// Fixed-point fraction bits of PIL's 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// PIL's bicubic `a` (Keys' cubic convolution with a = -0.5).
const BICUBIC_A: f64 = -0.5;

/// A PIL resampling filter (transformers' `resample`, PIL's `Image.Resampling` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (2): the triangle filter.
    Bilinear,
    /// `Image.BICUBIC` (3).
    Bicubic,
}

impl Filter {
    /// The filter of a PIL resample number; `None` for the ones not implemented
    /// (0 nearest, 1 lanczos, 4 box, 5 hamming).
    pub fn from_pil(code: i64) -> Option<Self> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear if x < 1.0 => 1.0 - x,
            Filter::Bicubic if x < 1.0 => ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0,
            Filter::Bicubic if x < 2.0 => (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A,
            _ => 0.0,
        }
    }
}

/// An 8-bit RGB image, rows of `width * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// For each output position: the first input position and the fixed-point weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // PIL multiplies by the reciprocal (dividing can round the other way).
    let inverse_scale = 1.0 / filter_scale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for out in 0..out_size {
        let center = (out as f64 + 0.5) * scale;
        // C's (int) cast truncates; negatives clamp to 0 either way.
        let low = ((center - support + 0.5) as i64).max(0) as usize;
        let high = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let raw: Vec<f64> = (low..high)
            .map(|x| filter.weight((x as f64 - center + 0.5) * inverse_scale))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|w| to_fixed(if total != 0.0 { w / total } else { *w }))
            .collect();
        first.push(low);
        weights.push(fixed);
    }
    Taps { first, weights }
}

fn to_fixed(weight: f64) -> i32 {
    let scaled = weight * f64::from(1u32 << PRECISION_BITS);
    if weight < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// PIL's `clip8`: drop the fraction bits, clamp to 0..=255.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One channel-interleaved convolution along rows (`horizontal`) or columns.
fn pass(image: &Rgb8, taps: &Taps, horizontal: bool) -> Rgb8 {
    let (width, height) = if horizontal {
        (taps.first.len(), image.height)
    } else {
        (image.width, taps.first.len())
    };
    let mut pixels = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let out = if horizontal { x } else { y };
            for channel in 0..3 {
                let mut sum: i64 = 1 << (PRECISION_BITS - 1);
                for (tap, &weight) in taps.weights[out].iter().enumerate() {
                    let source = taps.first[out] + tap;
                    let (sx, sy) = if horizontal { (source, y) } else { (x, source) };
                    let value = image.pixels[(sy * image.width + sx) * 3 + channel];
                    sum += i64::from(value) * i64::from(weight);
                }
                pixels[(y * width + x) * 3 + channel] = clip8(sum);
            }
        }
    }
    Rgb8 {
        width,
        height,
        pixels,
    }
}

/// Pillow 13.0's pass order (`ImagingResampleInner`): the vertical pass first when the height
/// shrinks by more than twice as many pixels as the width, else the horizontal one. Pillow 12
/// and older always start horizontally; the two orders round the intermediate differently (up
/// to one 8-bit level).
fn vertical_first(image: &Rgb8, width: usize, height: usize) -> bool {
    let shrink_height = image.height as i64 - height as i64;
    let shrink_width = image.width as i64 - width as i64;
    shrink_height > 0 && shrink_height > shrink_width * 2
}

/// `image.resize((width, height), resample=filter)` as Pillow 13.0 computes it for an RGB image.
pub fn resize(image: &Rgb8, width: usize, height: usize, filter: Filter) -> Rgb8 {
    let horizontal = |current: Rgb8| match width != current.width {
        true => pass(&current, &taps(current.width, width, filter), true),
        false => current,
    };
    let vertical = |current: Rgb8| match height != current.height {
        true => pass(&current, &taps(current.height, height, filter), false),
        false => current,
    };
    match vertical_first(image, width, height) {
        true => horizontal(vertical(image.clone())),
        false => vertical(horizontal(image.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_each_output_pixel_sum_to_one_in_fixed_point() {
        for (filter, input, output) in [(Filter::Bicubic, 97, 34), (Filter::Bilinear, 13, 40)] {
            let taps = taps(input, output, filter);
            for weights in &taps.weights {
                let total: i32 = weights.iter().sum();
                assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i32);
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let image = Rgb8 {
            width: 7,
            height: 5,
            pixels: vec![200; 7 * 5 * 3],
        };
        let resized = resize(&image, 3, 11, Filter::Bicubic);
        assert_eq!((resized.width, resized.height), (3, 11));
        assert!(resized.pixels.iter().all(|&p| p == 200));
    }
}
