//! The `toy_world` stage: a seeded generator of small captioned images for training and
//! demonstrating on CPU (issue #18's toy world): one flat shape (circle, square, triangle, star)
//! of one colour on a plain background of another, at a random position and size, captioned
//! `a red star on a blue background` (`images/NNNN.png` + `NNNN.txt`, the caption file beside
//! the image as kohya, OneTrainer and EveryDream2 read them). Plus a held-out subject the world
//! never shows: a star with orange and black diagonal stripes (`subject/NNNN.png`, class `star`),
//! the instance images of a DreamBooth run. Pure Rust, no downloads; the same seed writes the
//! same bytes.
use dreampipe_core::field;
use dreampipe_core::stages::params::{List, ParamTable, Params};
use dreampipe_core::stages::{ParamSpec, Stage, StageContext, StageError};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;

/// The world's shapes, colours and backgrounds (names as they appear in captions).
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 50, 170]),
    ("white", [245, 245, 245]),
];
pub const BACKGROUNDS: [(&str, [u8; 3]); 5] = [
    ("black", [15, 15, 15]),
    ("gray", [128, 128, 128]),
    ("blue", [40, 70, 220]),
    ("green", [30, 170, 60]),
    ("white", [245, 245, 245]),
];
/// The held-out subject: its class (a world shape) and its two stripe colours.
pub const SUBJECT_CLASS: &str = "star";
const SUBJECT_STRIPES: [[u8; 3]; 2] = [[245, 130, 20], [10, 10, 10]];
/// Stripe width of the subject, as a fraction of the image side.
const STRIPE_FRACTION: f64 = 0.08;
/// Shape radius range, as fractions of the image side.
const MIN_RADIUS: f64 = 0.15;
const MAX_RADIUS: f64 = 0.32;
/// Sub-pixel samples per axis (edges are anti-aliased by averaging them).
const SUPERSAMPLE: u32 = 3;
const MAX_COUNT: f64 = 100_000.0;
/// Keeps the subject's draws apart from the world's.
const SUBJECT_SALT: u64 = 0x7375_626a_6563_7421;

pub struct ToyWorldKind;

/// A `toy_world` stage's fields (its table is derived: [`Params`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct ToyWorldParams {
    /// world images
    #[param(default = 1000, range(1.0, MAX_COUNT))]
    pub count: u64,
    /// image side in pixels
    #[param(default = 64, range(16.0, 1024.0), multiple_of = 8)]
    pub size: u32,
    /// seed of the world
    #[param(default = 0, range(0.0, crate::sd::MAX_SEED))]
    pub seed: u64,
    /// instance images of the held-out subject
    #[param(default = 5, range(1.0, 100.0))]
    pub subject_images: u64,
    /// the shapes the world draws
    #[param(default = SHAPES, one_of = &SHAPES)]
    pub shapes: List<String>,
}

impl Stage for ToyWorldKind {
    fn kind(&self) -> &'static str {
        "toy_world"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Generates a seeded toy world of captioned images (one coloured shape on a plain background: `a red star on a blue background`) and a held-out subject (a star with orange and black stripes, class `star`). Output: `images/NNNN.png` with `NNNN.txt` captions, `subject/NNNN.png`, `manifest.json` (file, caption, shape, colour, background, centre, radius per image)."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        ToyWorldParams::param_specs()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let params: ToyWorldParams = ctx.typed()?;
        if params.shapes.is_empty() {
            return Err(dreampipe_core::stages::field_error(
                ctx,
                field!(ToyWorldParams, shapes),
                "give at least one shape",
            ));
        }
        let total = params.count + params.subject_images;
        let mut entries = Vec::new();
        for index in 0..params.count {
            ctx.check_cancelled()?;
            entries.push(write_world_image(ctx.out_dir, &params, index)?);
            ctx.progress.step(index + 1, total);
        }
        let mut subject = Vec::new();
        for index in 0..params.subject_images {
            ctx.check_cancelled()?;
            subject.push(write_subject_image(ctx.out_dir, &params, index)?);
            ctx.progress.step(params.count + index + 1, total);
        }
        let manifest = json!({
            "images": entries,
            "subject": {"class": SUBJECT_CLASS, "images": subject},
        });
        write_text(&ctx.out_dir.join("manifest.json"), &manifest.to_string())
    }
}

/// One world image: what is drawn where.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub shape: &'static str,
    pub colour: (&'static str, [u8; 3]),
    pub background: (&'static str, [u8; 3]),
    /// Centre (x, y) and radius in pixels.
    pub centre: (f64, f64),
    pub radius: f64,
}

impl Scene {
    /// `a red star on a blue background`.
    pub fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background",
            self.colour.0, self.shape, self.background.0
        )
    }
}

/// The scene of world image `index` (a pure function of seed, index, size and shapes).
pub fn scene(params: &ToyWorldParams, index: u64) -> Scene {
    let mut rng = SplitMix::new(params.seed, index);
    let shapes: Vec<&'static str> = (SHAPES.iter().copied())
        .filter(|s| params.shapes.iter().any(|p| p == s))
        .collect();
    let shape = shapes[rng.below(shapes.len() as u64) as usize];
    let colour = COLOURS[rng.below(COLOURS.len() as u64) as usize];
    let backgrounds: Vec<_> = (BACKGROUNDS.iter().copied())
        .filter(|(name, _)| *name != colour.0)
        .collect();
    let background = backgrounds[rng.below(backgrounds.len() as u64) as usize];
    let (centre, radius) = placement(&mut rng, params.size);
    Scene {
        shape,
        colour,
        background,
        centre,
        radius,
    }
}

/// A random radius and a centre that keeps the shape inside the image.
fn placement(rng: &mut SplitMix, size: u32) -> ((f64, f64), f64) {
    let side = f64::from(size);
    let radius = side * (MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * rng.unit());
    let span = side - 2.0 * radius;
    let centre = (radius + span * rng.unit(), radius + span * rng.unit());
    (centre, radius)
}

/// The picture of a world scene (its shape in its plain colour).
pub fn render_scene(params: &ToyWorldParams, scene: &Scene) -> RgbImage {
    render(params.size, scene, &|_, _| scene.colour.1)
}

/// The picture of a subject scene (its star in the subject's stripes).
pub fn render_subject(params: &ToyWorldParams, scene: &Scene) -> RgbImage {
    render(params.size, scene, &subject_fill(params.size))
}

/// Renders a scene; `fill` gives the shape's colour at a point (plain, or the subject's stripes).
fn render(size: u32, scene: &Scene, fill: &dyn Fn(f64, f64) -> [u8; 3]) -> RgbImage {
    let samples = f64::from(SUPERSAMPLE * SUPERSAMPLE);
    RgbImage::from_fn(size, size, |x, y| {
        let mut sum = [0.0f64; 3];
        for sy in 0..SUPERSAMPLE {
            for sx in 0..SUPERSAMPLE {
                let px = f64::from(x) + (f64::from(sx) + 0.5) / f64::from(SUPERSAMPLE);
                let py = f64::from(y) + (f64::from(sy) + 0.5) / f64::from(SUPERSAMPLE);
                let colour = match inside(scene, px, py) {
                    true => fill(px, py),
                    false => scene.background.1,
                };
                for (total, channel) in sum.iter_mut().zip(colour) {
                    *total += f64::from(channel);
                }
            }
        }
        Rgb(sum.map(|total| (total / samples).round() as u8))
    })
}

/// Whether point (x, y) is inside the scene's shape.
pub fn inside(scene: &Scene, x: f64, y: f64) -> bool {
    let (dx, dy) = (
        (x - scene.centre.0) / scene.radius,
        (y - scene.centre.1) / scene.radius,
    );
    match scene.shape {
        "circle" => dx * dx + dy * dy <= 1.0,
        "square" => dx.abs() <= 0.8 && dy.abs() <= 0.8,
        "triangle" => in_polygon(&regular_polygon(3, 1.0, 1.0), dx, dy),
        _ => in_polygon(&regular_polygon(5, 1.0, 0.45), dx, dy),
    }
}

/// The corners of a regular polygon (or a star when `inner` < `outer`) around the origin,
/// first corner pointing up.
fn regular_polygon(points: usize, outer: f64, inner: f64) -> Vec<(f64, f64)> {
    let corners = if inner < outer { points * 2 } else { points };
    (0..corners)
        .map(|i| {
            let radius = if inner < outer && i % 2 == 1 {
                inner
            } else {
                outer
            };
            let angle =
                -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::TAU / corners as f64;
            (radius * angle.cos(), radius * angle.sin())
        })
        .collect()
}

/// Even-odd point-in-polygon test.
fn in_polygon(corners: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut previous = corners[corners.len() - 1];
    for &corner in corners {
        let ((x1, y1), (x2, y2)) = (previous, corner);
        if (y1 > y) != (y2 > y) && x < (x2 - x1) * (y - y1) / (y2 - y1) + x1 {
            inside = !inside;
        }
        previous = corner;
    }
    inside
}

fn write_world_image(out: &Path, params: &ToyWorldParams, index: u64) -> Result<Value, StageError> {
    let scene = scene(params, index);
    let image = render_scene(params, &scene);
    let name = format!("{index:04}");
    let images = out.join(crate::output::IMAGES_DIR);
    save(&image, &images.join(format!("{name}.png")))?;
    write_text(&images.join(format!("{name}.txt")), &scene.caption())?;
    Ok(json!({
        "file": format!("images/{name}.png"),
        "caption": scene.caption(),
        "shape": scene.shape,
        "colour": scene.colour.0,
        "background": scene.background.0,
        "centre": [scene.centre.0, scene.centre.1],
        "radius": scene.radius,
    }))
}

/// Subject image `index`: the striped star at a random place on a random background.
pub fn subject_scene(params: &ToyWorldParams, index: u64) -> Scene {
    let mut rng = SplitMix::new(params.seed ^ SUBJECT_SALT, index);
    // Not black: the black stripes would merge with it and hide the star's outline.
    let backgrounds: Vec<_> = (BACKGROUNDS.iter().copied())
        .filter(|(name, _)| *name != "black")
        .collect();
    let background = backgrounds[rng.below(backgrounds.len() as u64) as usize];
    let (centre, radius) = placement(&mut rng, params.size);
    Scene {
        shape: SUBJECT_CLASS,
        colour: ("striped", SUBJECT_STRIPES[0]),
        background,
        centre,
        radius,
    }
}

/// The subject's fill: diagonal stripes of its two colours.
pub fn subject_fill(size: u32) -> impl Fn(f64, f64) -> [u8; 3] {
    let width = f64::from(size) * STRIPE_FRACTION;
    move |x, y| SUBJECT_STRIPES[((x + y) / width).floor().rem_euclid(2.0) as usize]
}

fn write_subject_image(
    out: &Path,
    params: &ToyWorldParams,
    index: u64,
) -> Result<Value, StageError> {
    let scene = subject_scene(params, index);
    let image = render_subject(params, &scene);
    let file = format!("subject/{index:04}.png");
    save(&image, &out.join(&file))?;
    Ok(json!({"file": file, "background": scene.background.0}))
}

fn save(image: &RgbImage, path: &Path) -> Result<(), StageError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io("create", dir, e))?;
    }
    image.save(path).map_err(|source| StageError::WriteImage {
        kind: "toy_world",
        path: path.to_path_buf(),
        source,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), StageError> {
    std::fs::write(path, text).map_err(|e| StageError::io("write", path, e))
}

/// SplitMix64 over (seed, index): one independent stream per image.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64, index: u64) -> Self {
        let mut mix = Self(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        mix.next();
        mix
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ToyWorldParams {
        ToyWorldParams {
            count: 20,
            size: 64,
            seed: 3,
            subject_images: 5,
            shapes: List(SHAPES.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<ToyWorldParams>(&ToyWorldKind.schema())
            .unwrap();
    }

    /// The caption says what the pixels show: the pixel at the shape's centre has the caption's
    /// colour, a corner the background's (a star's centre is inside it, as every shape's).
    #[test]
    fn captions_name_the_drawn_colours() {
        let params = params();
        for index in 0..params.count {
            let scene = scene(&params, index);
            let image = render(params.size, &scene, &|_, _| scene.colour.1);
            let (x, y) = (scene.centre.0 as u32, scene.centre.1 as u32);
            assert_eq!(
                image.get_pixel(x, y).0,
                scene.colour.1,
                "{}",
                scene.caption()
            );
            let corners = [(0, 0), (63, 0), (0, 63), (63, 63)];
            let background = corners
                .iter()
                .any(|&(cx, cy)| image.get_pixel(cx, cy).0 == scene.background.1);
            assert!(background, "{}", scene.caption());
            assert_ne!(scene.colour.0, scene.background.0);
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_world_and_another_seed_another() {
        let params = params();
        let scenes: Vec<Scene> = (0..params.count).map(|i| scene(&params, i)).collect();
        let again: Vec<Scene> = (0..params.count).map(|i| scene(&params, i)).collect();
        assert_eq!(scenes, again);
        let other = ToyWorldParams {
            seed: 4,
            ..params.clone()
        };
        assert_ne!(scene(&other, 0), scenes[0]);
        let shapes: std::collections::BTreeSet<&str> = scenes.iter().map(|s| s.shape).collect();
        assert_eq!(shapes.len(), SHAPES.len(), "20 images show every shape");
    }

    #[test]
    fn the_subject_is_a_striped_star_the_world_never_draws() {
        let params = params();
        let scene = subject_scene(&params, 0);
        let image = render(params.size, &scene, &subject_fill(params.size));
        let inside_colours: std::collections::BTreeSet<[u8; 3]> = (0..64u32)
            .flat_map(|y| (0..64u32).map(move |x| (x, y)))
            .filter(|&(x, y)| inside(&scene, f64::from(x) + 0.5, f64::from(y) + 0.5))
            .map(|(x, y)| image.get_pixel(x, y).0)
            .filter(|c| SUBJECT_STRIPES.contains(c))
            .collect();
        assert_eq!(inside_colours.len(), 2, "both stripe colours show");
        assert!(COLOURS.iter().all(|(_, c)| !SUBJECT_STRIPES.contains(c)));
    }
}
