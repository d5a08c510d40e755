//! Labeled grid PNG: exact layout, pixel-exact cells, text only inside label boxes, errors.
use dreampipe_kinds::grid::{
    BACKGROUND, CELL_GAP, COLUMN_LABEL_HEIGHT, GridSpec, LABEL_GAP, MARGIN, ROW_LABEL_WIDTH,
    TITLE_HEIGHT, write_grid_png,
};
use dreampipe_kinds::png::{GenerationParameters, read_parameters_text};
use image::{Rgb, RgbImage};

/// At least MIN_CELL_SIDE: drawn as they are (enlarged cells have a test of their own).
const CELL_W: u32 = 120;
const CELL_H: u32 = 100;

/// A distinct synthetic image per cell.
fn cell_image(row: u32, column: u32) -> RgbImage {
    RgbImage::from_fn(CELL_W, CELL_H, |x, y| {
        Rgb([
            (row * 90 + x * 5) as u8,
            (column * 70 + y * 6) as u8,
            ((x * y + row + column) % 251) as u8,
        ])
    })
}

fn spec(title: Option<&str>) -> GridSpec {
    GridSpec {
        title: title.map(str::to_string),
        row_labels: vec![
            "db[learning_rate=2e-6]".to_string(),
            "db[learning_rate=5e-6, max_train_steps=800, prior_loss_weight=1.0] a label far too long for one line".to_string(),
        ],
        column_labels: vec!["seed 1".to_string(), "seed 2".to_string(), "DPM++ 2M Karras, seed 3".to_string()],
        cells: (0..2).map(|r| (0..3).map(|c| cell_image(r, c)).collect()).collect(),
    }
}

/// (x, y) of cell (row, column), from the layout constants.
fn expected_cell_origin(row: u32, column: u32, title: bool) -> (u32, u32) {
    let title_band = if title { TITLE_HEIGHT + LABEL_GAP } else { 0 };
    let x = MARGIN + ROW_LABEL_WIDTH + LABEL_GAP + column * (CELL_W + CELL_GAP);
    let y = MARGIN + title_band + COLUMN_LABEL_HEIGHT + LABEL_GAP + row * (CELL_H + CELL_GAP);
    (x, y)
}

fn is_dark(pixel: &Rgb<u8>) -> bool {
    pixel.0.iter().all(|&v| v < 128)
}

fn within(x: u32, y: u32, (left, top, width, height): (u32, u32, u32, u32)) -> bool {
    x >= left && x < left + width && y >= top && y < top + height
}

fn write_and_decode(spec: &GridSpec) -> (RgbImage, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    write_grid_png(spec, &path, None).unwrap();
    (image::open(&path).unwrap().to_rgb8(), dir)
}

#[test]
fn grid_has_exact_size_and_cells_at_their_offsets() {
    let (grid, _dir) = write_and_decode(&spec(Some("DreamBooth <sweep> & seeds")));
    let width = MARGIN + ROW_LABEL_WIDTH + LABEL_GAP + 3 * CELL_W + 2 * CELL_GAP + MARGIN;
    let height = MARGIN
        + TITLE_HEIGHT
        + LABEL_GAP
        + COLUMN_LABEL_HEIGHT
        + LABEL_GAP
        + 2 * CELL_H
        + CELL_GAP
        + MARGIN;
    assert_eq!(grid.dimensions(), (width, height));
    assert_eq!(
        grid.dimensions(),
        (16 + 220 + 8 + 376 + 16, 16 + 36 + 8 + 40 + 8 + 208 + 16)
    );
    for row in 0..2 {
        for column in 0..3 {
            let (x0, y0) = expected_cell_origin(row, column, true);
            let source = cell_image(row, column);
            for (x, y, pixel) in source.enumerate_pixels() {
                assert_eq!(
                    grid.get_pixel(x0 + x, y0 + y),
                    pixel,
                    "cell ({row}, {column}) pixel ({x}, {y})"
                );
            }
        }
    }
}

#[test]
fn labels_have_ink_inside_their_boxes_and_nothing_else_outside_cells() {
    let (grid, _dir) = write_and_decode(&spec(Some("DreamBooth <sweep> & seeds")));
    let cells: Vec<_> = (0..2)
        .flat_map(|r| (0..3).map(move |c| (r, c)))
        .map(|(r, c)| {
            let (x, y) = expected_cell_origin(r, c, true);
            (x, y, CELL_W, CELL_H)
        })
        .collect();
    let title = (MARGIN, MARGIN, grid.width() - 2 * MARGIN, TITLE_HEIGHT);
    let column_labels: Vec<_> = (0..3)
        .map(|c| {
            (
                expected_cell_origin(0, c, true).0,
                MARGIN + TITLE_HEIGHT + LABEL_GAP,
                CELL_W,
                COLUMN_LABEL_HEIGHT,
            )
        })
        .collect();
    let row_labels: Vec<_> = (0..2)
        .map(|r| {
            (
                MARGIN,
                expected_cell_origin(r, 0, true).1,
                ROW_LABEL_WIDTH,
                CELL_H,
            )
        })
        .collect();
    let label_boxes: Vec<_> = std::iter::once(title)
        .chain(column_labels.iter().copied())
        .chain(row_labels.iter().copied())
        .collect();

    for &label in &label_boxes {
        let ink = (label.0..label.0 + label.2)
            .flat_map(|x| (label.1..label.1 + label.3).map(move |y| (x, y)))
            .filter(|&(x, y)| is_dark(grid.get_pixel(x, y)))
            .count();
        assert!(ink >= 10, "label box {label:?} has only {ink} dark pixels");
    }
    for (x, y, pixel) in grid.enumerate_pixels() {
        let in_cell = cells.iter().any(|&c| within(x, y, c));
        let in_label = label_boxes.iter().any(|&l| within(x, y, l));
        if !in_cell && !in_label {
            assert_eq!(
                *pixel, BACKGROUND,
                "gap/margin pixel ({x}, {y}) is not background"
            );
        }
    }
}

#[test]
fn without_title_the_title_band_is_gone_and_parameters_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    let parameters = GenerationParameters {
        prompt: "a photo of sks dog".to_string(),
        negative_prompt: String::new(),
        steps: 30,
        sampler: "DDIM".to_string(),
        guidance: 7.5,
        seed: 1,
        width: CELL_W as i64,
        height: CELL_H as i64,
        model_hash: "0123456789".to_string(),
        model_name: "tiny-sd".to_string(),
        extra: vec![],
    };
    let layout = write_grid_png(&spec(None), &path, Some(&parameters)).unwrap();
    let grid = image::open(&path).unwrap().to_rgb8();
    let height = MARGIN + COLUMN_LABEL_HEIGHT + LABEL_GAP + 2 * CELL_H + CELL_GAP + MARGIN;
    assert_eq!(grid.height(), height);
    assert_eq!((layout.width(), layout.height()), grid.dimensions());
    let (x0, y0) = expected_cell_origin(1, 2, false);
    assert_eq!(
        grid.get_pixel(x0 + 5, y0 + 7),
        cell_image(1, 2).get_pixel(5, 7)
    );
    assert_eq!(
        read_parameters_text(&path).unwrap(),
        Some(parameters.to_a1111_text())
    );
}

/// 32 × 24 pictures (under MIN_CELL_SIDE = 96 on their shorter side) are drawn four times as
/// large, each pixel a 4 × 4 block.
#[test]
fn small_cells_are_drawn_enlarged_pixel_by_pixel() {
    let small = |row: u32, column: u32| {
        RgbImage::from_fn(32, 24, |x, y| {
            Rgb([(x * 8) as u8, (y * 10) as u8, (row * 3 + column) as u8])
        })
    };
    let mut spec = spec(None);
    spec.cells = (0..2)
        .map(|r| (0..3).map(|c| small(r, c)).collect())
        .collect();
    let (grid, _dir) = write_and_decode(&spec);
    let layout = spec.layout().unwrap();
    assert_eq!(
        (layout.scale, layout.cell_width, layout.cell_height),
        (4, 128, 96)
    );
    assert_eq!(
        grid.dimensions(),
        (
            16 + 220 + 8 + 3 * 128 + 2 * 8 + 16,
            16 + 40 + 8 + 2 * 96 + 8 + 16
        )
    );
    for (row, column) in [(0, 0), (1, 2)] {
        let cell = layout.cell(row, column);
        let source = small(row, column);
        for (x, y, pixel) in grid.enumerate_pixels() {
            if x >= cell.x && x < cell.x + 128 && y >= cell.y && y < cell.y + 96 {
                let (sx, sy) = ((x - cell.x) / 4, (y - cell.y) / 4);
                assert_eq!(
                    pixel,
                    source.get_pixel(sx, sy),
                    "cell ({row}, {column}) at ({x}, {y})"
                );
            }
        }
    }
}

#[test]
fn a_cell_of_another_size_is_an_error_naming_the_cell() {
    let mut bad = spec(None);
    bad.cells[1][2] = RgbImage::new(32, 32);
    let dir = tempfile::tempdir().unwrap();
    let err = write_grid_png(&bad, &dir.path().join("g.png"), None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "image grid cell (row 1 \"db[learning_rate=5e-6, max_train_steps=800, prior_loss_weight=1.0] a label far too long \
         for one line\", column 2 \"DPM++ 2M Karras, seed 3\") is 32x32 but cell (row 0, column 0) is 120x100; \
         all grid images must have the same size"
    );
    assert!(!dir.path().join("g.png").exists());
}

#[test]
fn shape_errors_say_what_to_give() {
    let mut ragged = spec(None);
    ragged.cells[0].pop();
    let err = ragged.layout().unwrap_err().to_string();
    assert_eq!(
        err,
        "image grid row 0 (\"db[learning_rate=2e-6]\") has 2 images but the grid has 3 column labels; give one image per column"
    );
    let mut unlabeled = spec(None);
    unlabeled.row_labels.pop();
    assert_eq!(
        unlabeled.layout().unwrap_err().to_string(),
        "image grid has 2 rows of images but 1 row labels; give one label per row"
    );
    let empty = GridSpec {
        title: None,
        row_labels: vec![],
        column_labels: vec![],
        cells: vec![],
    };
    assert_eq!(
        empty.layout().unwrap_err().to_string(),
        "image grid has no cells; give at least one row and one column"
    );
}

#[test]
fn a_spec_loads_from_image_files_and_names_unreadable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<Vec<std::path::PathBuf>> = (0..2)
        .map(|r| {
            (0..3)
                .map(|c| {
                    let path = dir.path().join(format!("r{r}c{c}.png"));
                    cell_image(r, c).save(&path).unwrap();
                    path
                })
                .collect()
        })
        .collect();
    let reference = spec(None);
    let loaded = GridSpec::from_paths(
        None,
        reference.row_labels.clone(),
        reference.column_labels.clone(),
        &paths,
    )
    .unwrap();
    assert_eq!(loaded.cells, reference.cells);

    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let mut bad_paths = paths.clone();
    bad_paths[1][0] = broken.clone();
    let err = GridSpec::from_paths(None, vec![], vec![], &bad_paths)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: cannot read image: ", broken.display())),
        "{err}"
    );
    assert!(err.ends_with("; give a PNG, JPEG or WebP file"), "{err}");
}
