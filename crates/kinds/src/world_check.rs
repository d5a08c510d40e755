//! The toy world's classifier: what a picture of the world shows — its background, the colour
//! and kind of its one shape, and whether the shape wears the held-out subject's orange and
//! black stripes — read with plain colour and geometry statistics, and what a prompt asks for.
//! Together they say whether a generated image matches its prompt (the `world_score` stage).
//!
//! Background: the median colour of the image's outer ring of pixels, the nearest world
//! background. Shape: the pixels far from that colour (the largest share of the image that is
//! not background); its colour is the nearest world colour to their mean; its kind comes from
//! its solidity (area over the area of its convex hull: a five-pointed star is about 0.56, the
//! others near 1) and, for the convex ones, how much of its bounding box it fills (square 1,
//! circle 0.79, triangle 0.5). Stripes: the shape holds both of the subject's tones — pixels
//! near its orange, and dark pixels inside it (a generated stripe is rarely pure black: the
//! DreamBooth models draw it dark red or brown, so darkness is luminance, not a colour; only
//! inner pixels count, since a bright shape's outline blended into a dark background is dark
//! too).
use crate::toy_world::{BACKGROUNDS, COLOURS, SHAPES, SUBJECT_CLASS};
use image::RgbImage;

/// Euclidean RGB distance beyond which a pixel is not background.
const FOREGROUND_DISTANCE: f64 = 70.0;
/// A shape smaller than this share of the image counts as none.
const MIN_SHAPE_SHARE: f64 = 0.015;
/// Below this solidity a shape is a star.
const STAR_SOLIDITY: f64 = 0.78;
/// Bounding-box fill above which a convex shape is a square, and below which a triangle.
const SQUARE_FILL: f64 = 0.9;
const TRIANGLE_FILL: f64 = 0.64;
/// The subject's orange, how close (RGB distance) a pixel must be to count as it, and the share
/// of the shape it must cover.
const ORANGE: [u8; 3] = [245, 130, 20];
const ORANGE_DISTANCE: f64 = 90.0;
const ORANGE_SHARE: f64 = 0.10;
/// A pixel darker than this luminance (0–255, Rec. 601 weights) is a dark stripe's, and dark
/// pixels must be this share of the shape's inner pixels (those whose four neighbours are in
/// the shape too).
const DARK_LUMINANCE: f64 = 50.0;
const DARK_SHARE: f64 = 0.10;

/// What a picture of the world shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub background: &'static str,
    /// The shape's colour and kind; None when no shape stands out.
    pub shape: Option<(&'static str, &'static str)>,
    /// Whether the shape wears the subject's stripes.
    pub striped: bool,
}

/// What a prompt asks for: a world caption (`a red star on a blue background`) names all three;
/// a prompt with the subject's identifier asks for the striped star.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Expectation {
    pub background: Option<&'static str>,
    pub colour: Option<&'static str>,
    pub shape: Option<&'static str>,
    pub subject: bool,
}

/// Reads a picture of the world.
pub fn read(image: &RgbImage) -> Reading {
    let border = median(&ring(image));
    let background = nearest(&BACKGROUNDS, border);
    let mask = foreground(image, border);
    let area = mask.iter().filter(|inside| **inside).count();
    let total = (image.width() * image.height()) as f64;
    if (area as f64) < MIN_SHAPE_SHARE * total {
        return Reading {
            background,
            shape: None,
            striped: false,
        };
    }
    let pixels: Vec<[u8; 3]> = (image.pixels().zip(&mask))
        .filter(|(_, inside)| **inside)
        .map(|(pixel, _)| pixel.0)
        .collect();
    let colour = nearest(&COLOURS, mean(&pixels));
    let shape = shape_of(&mask, image.width() as usize);
    Reading {
        background,
        shape: Some((colour, shape)),
        striped: striped(image, &mask, &pixels),
    }
}

/// What `prompt` asks for; `identifier` (e.g. `sks`) marks prompts of the subject.
pub fn expectation(prompt: &str, identifier: Option<&str>) -> Expectation {
    let words: Vec<String> = (prompt.split_whitespace())
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .collect();
    let position = |word: &str| words.iter().position(|w| w == word);
    let subject = identifier.is_some_and(|id| position(&id.to_lowercase()).is_some());
    let shape = SHAPES.iter().copied().find(|s| position(s).is_some());
    let shape_at = shape.and_then(position);
    let before = |index: Option<usize>| index.and_then(|i| i.checked_sub(1)).map(|i| &words[i]);
    let colour = (!subject)
        .then(|| before(shape_at))
        .flatten()
        .and_then(|word| COLOURS.iter().find(|(name, _)| name == word).map(|c| c.0));
    let background = before(position("background")).and_then(|word| {
        BACKGROUNDS
            .iter()
            .find(|(name, _)| name == word)
            .map(|b| b.0)
    });
    Expectation {
        background,
        colour,
        shape: if subject { Some(SUBJECT_CLASS) } else { shape },
        subject,
    }
}

/// The outer ring of pixels.
fn ring(image: &RgbImage) -> Vec<[u8; 3]> {
    let (width, height) = image.dimensions();
    (image.enumerate_pixels())
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == width || *y + 1 == height)
        .map(|(_, _, pixel)| pixel.0)
        .collect()
}

/// The per-channel median.
fn median(pixels: &[[u8; 3]]) -> [f64; 3] {
    std::array::from_fn(|channel| {
        let mut values: Vec<u8> = pixels.iter().map(|p| p[channel]).collect();
        values.sort_unstable();
        values.get(values.len() / 2).copied().map_or(0.0, f64::from)
    })
}

fn mean(pixels: &[[u8; 3]]) -> [f64; 3] {
    let count = pixels.len().max(1) as f64;
    std::array::from_fn(|channel| pixels.iter().map(|p| f64::from(p[channel])).sum::<f64>() / count)
}

fn distance(a: [f64; 3], b: [u8; 3]) -> f64 {
    (a.iter().zip(b))
        .map(|(x, y)| (x - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The name of the palette colour nearest to `colour`.
fn nearest(palette: &[(&'static str, [u8; 3])], colour: [f64; 3]) -> &'static str {
    (palette.iter())
        .min_by(|a, b| distance(colour, a.1).total_cmp(&distance(colour, b.1)))
        .map_or("", |(name, _)| name)
}

/// Row-major: whether each pixel is far from the background colour.
fn foreground(image: &RgbImage, background: [f64; 3]) -> Vec<bool> {
    (image.pixels())
        .map(|pixel| distance(background, pixel.0) > FOREGROUND_DISTANCE)
        .collect()
}

/// Whether the shape (`mask`, its `pixels`) wears the stripes: enough orange, and enough dark
/// among its inner pixels.
fn striped(image: &RgbImage, mask: &[bool], pixels: &[[u8; 3]]) -> bool {
    let share = |count: usize, of: usize| count as f64 / of.max(1) as f64;
    let orange = (pixels.iter())
        .filter(|p| distance(ORANGE.map(f64::from), **p) < ORANGE_DISTANCE)
        .count();
    let inner = inner_pixels(image, mask);
    let dark = inner
        .iter()
        .filter(|p| luminance(**p) < DARK_LUMINANCE)
        .count();
    share(orange, pixels.len()) >= ORANGE_SHARE && share(dark, inner.len()) >= DARK_SHARE
}

/// The pixels of the shape whose four neighbours are in it too.
fn inner_pixels(image: &RgbImage, mask: &[bool]) -> Vec<[u8; 3]> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let inside = |x: usize, y: usize| mask[y * width + x];
    let inner = |x: usize, y: usize| {
        (x > 0 && y > 0 && x + 1 < width && y + 1 < height)
            && inside(x, y)
            && [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]
                .iter()
                .all(|&(nx, ny)| inside(nx, ny))
    };
    (image.enumerate_pixels())
        .filter(|(x, y, _)| inner(*x as usize, *y as usize))
        .map(|(_, _, pixel)| pixel.0)
        .collect()
}

/// Luminance of an sRGB pixel with Rec. 601 weights, 0–255.
fn luminance(pixel: [u8; 3]) -> f64 {
    0.299 * f64::from(pixel[0]) + 0.587 * f64::from(pixel[1]) + 0.114 * f64::from(pixel[2])
}

/// The kind of the masked shape, from its solidity and bounding-box fill.
fn shape_of(mask: &[bool], width: usize) -> &'static str {
    let cells: Vec<(usize, usize)> = (mask.iter().enumerate())
        .filter(|(_, inside)| **inside)
        .map(|(index, _)| (index % width, index / width))
        .collect();
    let area = cells.len() as f64;
    let corners: Vec<(f64, f64)> = (cells.iter())
        .flat_map(|&(x, y)| {
            let (x, y) = (x as f64, y as f64);
            [(x, y), (x + 1.0, y), (x, y + 1.0), (x + 1.0, y + 1.0)]
        })
        .collect();
    let solidity = area / hull_area(corners.clone()).max(1.0);
    if solidity < STAR_SOLIDITY {
        return "star";
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = corners.into_iter().unzip();
    let span = |v: &[f64]| {
        v.iter().copied().fold(f64::MIN, f64::max) - v.iter().copied().fold(f64::MAX, f64::min)
    };
    let fill = area / (span(&xs) * span(&ys)).max(1.0);
    match fill {
        f if f >= SQUARE_FILL => "square",
        f if f < TRIANGLE_FILL => "triangle",
        _ => "circle",
    }
}

/// The area of the convex hull of `points` (Andrew's monotone chain, then the shoelace sum).
fn hull_area(mut points: Vec<(f64, f64)>) -> f64 {
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    points.dedup();
    if points.len() < 3 {
        return 0.0;
    }
    let cross = |o: (f64, f64), a: (f64, f64), b: (f64, f64)| {
        (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
    };
    let mut hull: Vec<(f64, f64)> = Vec::new();
    for pass in [points.clone(), points.into_iter().rev().collect()] {
        let start = hull.len();
        for point in pass {
            while hull.len() >= start + 2
                && cross(hull[hull.len() - 2], hull[hull.len() - 1], point) <= 0.0
            {
                hull.pop();
            }
            hull.push(point);
        }
        hull.pop();
    }
    let twice: f64 = (0..hull.len())
        .map(|i| {
            let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
            a.0 * b.1 - b.0 * a.1
        })
        .sum();
    twice.abs() / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy_world::{self, ToyWorldParams};

    fn params(size: u32) -> ToyWorldParams {
        ToyWorldParams {
            count: 0,
            size,
            seed: 0,
            subject_images: 0,
            shapes: dreampipe_core::stages::params::List(
                SHAPES.iter().map(|s| s.to_string()).collect(),
            ),
        }
    }

    /// On the world's own pictures (which the classifier must read to be of any use on generated
    /// ones), at the demo's size and at twice it.
    #[test]
    fn reads_the_world_it_was_made_for() {
        for size in [32, 64] {
            let params = params(size);
            let (mut right, count) = (0, 400);
            for index in 0..count {
                let scene = toy_world::scene(&params, index);
                let image = toy_world::render_scene(&params, &scene);
                let reading = read(&image);
                let expected = expectation(&scene.caption(), None);
                let ok = reading.background == expected.background.unwrap()
                    && reading.shape == Some((expected.colour.unwrap(), scene.shape))
                    && !reading.striped;
                right += usize::from(ok);
            }
            let rate = right as f64 / count as f64;
            println!("{size} px: {right} of {count} world images read right");
            assert!(rate >= 0.95, "{size} px: only {rate} read right");
        }
    }

    #[test]
    fn finds_the_subjects_stripes() {
        let params = params(32);
        for index in 0..20 {
            let scene = toy_world::subject_scene(&params, index);
            let image = toy_world::render_subject(&params, &scene);
            let reading = read(&image);
            assert!(reading.striped, "subject image {index}: {reading:?}");
        }
    }

    /// As the DreamBooth models draw the subject: its stripes dark red (over 90 from black: the
    /// first classifier missed them), its orange redder.
    #[test]
    fn finds_stripes_drawn_dark_red() {
        let params = params(32);
        for index in 0..20 {
            let scene = toy_world::subject_scene(&params, index);
            let mut image = toy_world::render_subject(&params, &scene);
            for pixel in image.pixels_mut() {
                pixel.0 = match pixel.0 {
                    [10, 10, 10] => [110, 10, 10],
                    [245, 130, 20] => [230, 90, 30],
                    other => other,
                };
            }
            let reading = read(&image);
            assert!(reading.striped, "subject image {index}: {reading:?}");
        }
    }

    #[test]
    fn prompts_say_what_they_ask_for() {
        assert_eq!(
            expectation("a red star on a blue background", None),
            Expectation {
                background: Some("blue"),
                colour: Some("red"),
                shape: Some("star"),
                subject: false
            }
        );
        assert_eq!(
            expectation("a photo of sks star on a white background", Some("sks")),
            Expectation {
                background: Some("white"),
                colour: None,
                shape: Some("star"),
                subject: true
            }
        );
        assert_eq!(expectation("a dog", None), Expectation::default());
    }
}
