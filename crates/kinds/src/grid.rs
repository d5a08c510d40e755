//! Labeled image grids: a rows × columns table of equally sized RGB images with row labels on
//! the left, column labels on top and an optional title, composed into one PNG. Images smaller
//! than [`MIN_CELL_SIDE`] are drawn enlarged by a whole factor, each pixel a square block.
//!
//! Layout (all constants below, in pixels):
//! ```text
//! MARGIN
//! [title: TITLE_HEIGHT] LABEL_GAP                                       (only with a title)
//! [row-label column: ROW_LABEL_WIDTH] LABEL_GAP [col label: COLUMN_LABEL_HEIGHT] LABEL_GAP
//!                                               [cell] CELL_GAP [cell] ...
//!                                               CELL_GAP
//!                                               [cell] CELL_GAP [cell] ...          MARGIN
//! ```
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::font::{Align, FontError, LabelFont, PixelRect, SizeRange};
use crate::png::{GenerationParameters, PngError, write_rgb_png};

/// Why a grid PNG could not be made from image files: a cell that does not read, a grid of the
/// wrong shape, the label font, or the PNG write (the wording `dreampipe_core::report::ReportError`
/// used when the grid lived in the report).
#[derive(Debug, thiserror::Error)]
pub enum GridPngError {
    #[error(transparent)]
    Font(#[from] FontError),
    #[error(transparent)]
    Grid(#[from] GridError),
    #[error(transparent)]
    Png(#[from] PngError),
    #[error("{path}: cannot read image: {reason}; give a PNG, JPEG or WebP file")]
    ImageRead { path: PathBuf, reason: String },
}

/// Blank space around the whole grid.
pub const MARGIN: u32 = 16;
/// Space between neighbouring cells.
pub const CELL_GAP: u32 = 8;
/// Space between a label box and the cells it labels.
pub const LABEL_GAP: u32 = 8;
/// Width of the row-label column: fits `db[learning_rate=2e-6]` on one line at 16 px.
pub const ROW_LABEL_WIDTH: u32 = 220;
/// Height of the column-label row: two lines of 16 px text (line height ≈ 18.6 px).
pub const COLUMN_LABEL_HEIGHT: u32 = 40;
/// Height of the title band: one line of 24 px text (line height ≈ 28 px) plus breathing room.
pub const TITLE_HEIGHT: u32 = 36;
/// Label sizes: start large and shrink until the wrapped label fits its box.
pub const LABEL_SIZES: SizeRange = SizeRange {
    max_px: 16.0,
    min_px: 9.0,
};
/// Title sizes.
pub const TITLE_SIZES: SizeRange = SizeRange {
    max_px: 24.0,
    min_px: 12.0,
};
/// Cells whose shorter side is under this are drawn enlarged by the smallest whole factor that
/// reaches it (nearest neighbour: each pixel a square block, nothing smoothed), so that small
/// samples — the toy world's 32 px — can be seen and a `seed 0` label fits above them.
pub const MIN_CELL_SIDE: u32 = 96;
/// Page colour behind labels and in gaps.
pub const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
/// Label ink.
pub const TEXT_COLOR: Rgb<u8> = Rgb([17, 17, 17]);

/// What to compose: `cells[row][column]`, one label per row and per column.
#[derive(Debug, Clone)]
pub struct GridSpec {
    pub title: Option<String>,
    pub row_labels: Vec<String>,
    pub column_labels: Vec<String>,
    pub cells: Vec<Vec<RgbImage>>,
}

/// Where everything sits in a composed grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub rows: u32,
    pub columns: u32,
    /// A cell's size as drawn: the images' size times `scale`.
    pub cell_width: u32,
    pub cell_height: u32,
    /// The whole factor images are enlarged by (1: drawn as they are).
    pub scale: u32,
    pub has_title: bool,
}

/// The whole factor that brings a `width` × `height` image's shorter side to [`MIN_CELL_SIDE`].
pub fn display_scale(width: u32, height: u32) -> u32 {
    MIN_CELL_SIDE.div_ceil(width.min(height).max(1)).max(1)
}

impl GridLayout {
    fn title_band(&self) -> u32 {
        if self.has_title {
            TITLE_HEIGHT + LABEL_GAP
        } else {
            0
        }
    }

    fn first_cell_x(&self) -> u32 {
        MARGIN + ROW_LABEL_WIDTH + LABEL_GAP
    }

    fn first_cell_y(&self) -> u32 {
        MARGIN + self.title_band() + COLUMN_LABEL_HEIGHT + LABEL_GAP
    }

    fn span(count: u32, size: u32) -> u32 {
        count * size + count.saturating_sub(1) * CELL_GAP
    }

    /// Total image width.
    pub fn width(&self) -> u32 {
        self.first_cell_x() + Self::span(self.columns, self.cell_width) + MARGIN
    }

    /// Total image height.
    pub fn height(&self) -> u32 {
        self.first_cell_y() + Self::span(self.rows, self.cell_height) + MARGIN
    }

    /// The rectangle of cell (`row`, `column`).
    pub fn cell(&self, row: u32, column: u32) -> PixelRect {
        PixelRect {
            x: self.first_cell_x() + column * (self.cell_width + CELL_GAP),
            y: self.first_cell_y() + row * (self.cell_height + CELL_GAP),
            width: self.cell_width,
            height: self.cell_height,
        }
    }

    /// The label box left of `row`.
    pub fn row_label(&self, row: u32) -> PixelRect {
        let cell = self.cell(row, 0);
        PixelRect {
            x: MARGIN,
            y: cell.y,
            width: ROW_LABEL_WIDTH,
            height: self.cell_height,
        }
    }

    /// The label box above `column`.
    pub fn column_label(&self, column: u32) -> PixelRect {
        let cell = self.cell(0, column);
        PixelRect {
            x: cell.x,
            y: MARGIN + self.title_band(),
            width: self.cell_width,
            height: COLUMN_LABEL_HEIGHT,
        }
    }

    /// The title band, if the grid has a title.
    pub fn title(&self) -> Option<PixelRect> {
        self.has_title.then(|| PixelRect {
            x: MARGIN,
            y: MARGIN,
            width: self.width() - 2 * MARGIN,
            height: TITLE_HEIGHT,
        })
    }
}

/// Why a grid could not be composed.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("image grid has no cells; give at least one row and one column")]
    Empty,
    #[error(
        "image grid row {row} ({label:?}) has {found} images but the grid has {expected} column labels; give one image per column"
    )]
    RaggedRow {
        row: usize,
        label: String,
        found: usize,
        expected: usize,
    },
    #[error(
        "image grid has {found} rows of images but {expected} row labels; give one label per row"
    )]
    RowLabelCount { found: usize, expected: usize },
    #[error(
        "image grid cell (row {row} {row_label:?}, column {column} {column_label:?}) is {found_width}x{found_height} \
         but cell (row 0, column 0) is {expected_width}x{expected_height}; all grid images must have the same size"
    )]
    CellSize {
        row: usize,
        column: usize,
        row_label: String,
        column_label: String,
        found_width: u32,
        found_height: u32,
        expected_width: u32,
        expected_height: u32,
    },
}

impl GridSpec {
    /// Loads `paths[row][column]` (PNG, JPEG or WebP) into a spec.
    pub fn from_paths(
        title: Option<String>,
        row_labels: Vec<String>,
        column_labels: Vec<String>,
        paths: &[Vec<PathBuf>],
    ) -> Result<Self, GridPngError> {
        let cells = paths
            .iter()
            .map(|row| {
                row.iter()
                    .map(|path| load_rgb(path))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            title,
            row_labels,
            column_labels,
            cells,
        })
    }

    /// Checks the shape and that every cell has the size of the first; returns the layout.
    pub fn layout(&self) -> Result<GridLayout, GridError> {
        let first = self
            .cells
            .first()
            .and_then(|row| row.first())
            .ok_or(GridError::Empty)?;
        if self.cells.len() != self.row_labels.len() {
            return Err(GridError::RowLabelCount {
                found: self.cells.len(),
                expected: self.row_labels.len(),
            });
        }
        for (row, images) in self.cells.iter().enumerate() {
            self.check_row(row, images, first)?;
        }
        let scale = display_scale(first.width(), first.height());
        Ok(GridLayout {
            rows: self.cells.len() as u32,
            columns: self.column_labels.len() as u32,
            cell_width: first.width() * scale,
            cell_height: first.height() * scale,
            scale,
            has_title: self.title.is_some(),
        })
    }

    fn check_row(
        &self,
        row: usize,
        images: &[RgbImage],
        first: &RgbImage,
    ) -> Result<(), GridError> {
        if images.len() != self.column_labels.len() {
            let label = self.row_labels[row].clone();
            return Err(GridError::RaggedRow {
                row,
                label,
                found: images.len(),
                expected: self.column_labels.len(),
            });
        }
        let mismatch = images
            .iter()
            .position(|image| image.dimensions() != first.dimensions());
        match mismatch {
            None => Ok(()),
            Some(column) => Err(GridError::CellSize {
                row,
                column,
                row_label: self.row_labels[row].clone(),
                column_label: self.column_labels[column].clone(),
                found_width: images[column].width(),
                found_height: images[column].height(),
                expected_width: first.width(),
                expected_height: first.height(),
            }),
        }
    }
}

/// Composes the grid into one image.
pub fn compose_grid(
    spec: &GridSpec,
    font: &LabelFont,
) -> Result<(RgbImage, GridLayout), GridError> {
    let layout = spec.layout()?;
    let mut canvas = RgbImage::from_pixel(layout.width(), layout.height(), BACKGROUND);
    if let (Some(title), Some(rect)) = (&spec.title, layout.title()) {
        let fitted = font.fit(title, TITLE_SIZES, rect.width, rect.height);
        font.draw(&mut canvas, &fitted, rect, Align::Left, TEXT_COLOR);
    }
    for (column, label) in spec.column_labels.iter().enumerate() {
        let rect = layout.column_label(column as u32);
        let fitted = font.fit(label, LABEL_SIZES, rect.width, rect.height);
        font.draw(&mut canvas, &fitted, rect, Align::Center, TEXT_COLOR);
    }
    for (row, (label, images)) in spec.row_labels.iter().zip(&spec.cells).enumerate() {
        let rect = layout.row_label(row as u32);
        let fitted = font.fit(label, LABEL_SIZES, rect.width, rect.height);
        font.draw(&mut canvas, &fitted, rect, Align::Right, TEXT_COLOR);
        for (column, image) in images.iter().enumerate() {
            let cell = layout.cell(row as u32, column as u32);
            let drawn = enlarged(image, layout.scale);
            image::imageops::replace(&mut canvas, &*drawn, i64::from(cell.x), i64::from(cell.y));
        }
    }
    Ok((canvas, layout))
}

/// `image` with each pixel a `scale` × `scale` block.
fn enlarged(image: &RgbImage, scale: u32) -> std::borrow::Cow<'_, RgbImage> {
    if scale == 1 {
        return std::borrow::Cow::Borrowed(image);
    }
    let (width, height) = (image.width() * scale, image.height() * scale);
    let block = |x: u32, y: u32| *image.get_pixel(x / scale, y / scale);
    std::borrow::Cow::Owned(RgbImage::from_fn(width, height, block))
}

/// Composes the grid and writes it as a PNG, with an A1111 "parameters" chunk if given.
pub fn write_grid_png(
    spec: &GridSpec,
    path: &Path,
    parameters: Option<&GenerationParameters>,
) -> Result<GridLayout, GridPngError> {
    let font = LabelFont::embedded()?;
    let (canvas, layout) = compose_grid(spec, &font)?;
    write_rgb_png(
        path,
        canvas.as_raw(),
        canvas.width(),
        canvas.height(),
        parameters,
    )?;
    Ok(layout)
}

/// Loads an image file (PNG, JPEG, WebP) within the image limit as 8-bit RGB, e.g. a sample
/// written by a stage.
pub fn load_rgb(path: &Path) -> Result<RgbImage, GridPngError> {
    dreampipe_core::imagefile::decode_rgb(path).map_err(|reason| GridPngError::ImageRead {
        path: PathBuf::from(path),
        reason,
    })
}
