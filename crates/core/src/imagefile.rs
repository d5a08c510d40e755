//! Image files as every reader takes them (`images`, the training stages' instance and class
//! folders, `generate` outputs read back, the report): which files of a folder are images, and
//! one size limit checked from the file size and the header before a pixel is decoded, so a
//! header claiming 100000×100000 pixels is refused by name instead of aborting the process.
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use std::path::{Path, PathBuf};

/// Largest accepted width or height, in pixels.
pub const MAX_SIDE: u32 = 16_384;
/// Largest accepted pixel count (64 Mpx: 8192×8192, or a 60 Mpx camera's photos).
pub const MAX_PIXELS: u64 = 1 << 26;
/// Largest accepted file size (256 MiB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// The limit as the error messages state it.
pub const LIMIT_TEXT: &str = "16384 pixels per side, 67108864 pixels (64 Mpx) and 256 MiB per file";
/// Extensions of image files (compared lowercase).
pub const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Bytes the decoder may allocate: the largest image as 16-bit RGBA.
const MAX_ALLOC_BYTES: u64 = MAX_PIXELS * 8;

/// Whether `name` is hidden (starts with `.`): hidden files of an image folder are skipped.
pub fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}

/// Whether `path` has an image extension.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The images of a folder, sorted by name: every non-hidden file (sub-folders are ignored).
/// A non-hidden file without an image extension is an error naming it, so no file is
/// silently left out.
pub fn list_folder(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the folder `{}`: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| format!("cannot read the folder `{}`: {e}", dir.display()))?;
        let path = entry.path();
        if is_hidden(&entry.file_name()) || !path.is_file() || is_caption(&path) {
            continue;
        }
        if !has_image_extension(&path) {
            return Err(format!(
                "`{}` is not an image file ({}); move it out of the folder or start its name with `.`",
                path.display(),
                EXTENSIONS.join(", ")
            ));
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// The extension of caption files: `name.txt` beside `name.png` (kohya, OneTrainer and
/// EveryDream2 read captions so).
pub const CAPTION_EXTENSION: &str = "txt";

/// Whether `path` is the caption of an image beside it (`name.txt` next to `name.<image>`).
pub fn is_caption(path: &Path) -> bool {
    if path.extension().and_then(|e| e.to_str()) != Some(CAPTION_EXTENSION) {
        return false;
    }
    EXTENSIONS
        .iter()
        .any(|extension| path.with_extension(extension).is_file())
}

/// Checks the file size and the header's dimensions against the limit; returns (width,
/// height). The error names the file and the limit.
pub fn check(path: &Path) -> Result<(u32, u32), String> {
    decoder_within_limit(path).map(|decoder| decoder.dimensions())
}

/// Decodes an image to 8-bit RGB (EXIF orientation applied) once [`check`] passes.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, String> {
    let mut decoder = decoder_within_limit(path)?;
    let fail = |e: image::ImageError| undecodable(path, &e);
    let orientation = decoder.orientation().map_err(fail)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(fail)?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

fn decoder_within_limit(path: &Path) -> Result<Box<dyn ImageDecoder>, String> {
    let fail = |e: &dyn std::fmt::Display| undecodable(path, e);
    let size = std::fs::metadata(path).map_err(|e| fail(&e))?.len();
    if size > MAX_FILE_BYTES {
        return Err(over_limit(path, &format!("is {size} bytes")));
    }
    let reader = ImageReader::open(path)
        .map_err(|e| fail(&e))?
        .with_guessed_format()
        .map_err(|e| fail(&e))?;
    let mut decoder = reader.into_decoder().map_err(|e| fail(&e))?;
    let (width, height) = decoder.dimensions();
    if width > MAX_SIDE || height > MAX_SIDE || u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(over_limit(path, &format!("is {width}×{height} pixels")));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_ALLOC_BYTES);
    decoder.set_limits(limits).map_err(|e| fail(&e))?;
    Ok(Box::new(decoder))
}

fn undecodable(path: &Path, error: &dyn std::fmt::Display) -> String {
    format!(
        "`{}` does not decode as an image: {error}; replace or remove the file",
        path.display()
    )
}

fn over_limit(path: &Path, what: &str) -> String {
    format!(
        "`{}` {what}, over the image limit of {LIMIT_TEXT}; shrink it or remove it",
        path.display()
    )
}

/// A PNG whose header claims `width`×`height` pixels and whose pixel data is absent: the
/// hostile file of the tests (this crate's and the integration tests').
#[doc(hidden)]
pub fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (b"IHDR", ihdr),
        (b"IDAT", vec![0x78, 0x9c]),
        (b"IEND", vec![]),
    ] {
        let mut chunk = kind.to_vec();
        chunk.extend(&data);
        bytes.extend((data.len() as u32).to_be_bytes());
        bytes.extend(&chunk);
        bytes.extend(crc32(&chunk).to_be_bytes());
    }
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_over_the_limit_is_refused_by_name_before_decoding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("huge.png");
        for (width, height) in [
            (100_000, 100_000),
            (20_000, 20_000),
            (16_385, 1),
            (8193, 8192),
        ] {
            std::fs::write(&path, png_header(width, height)).expect("write");
            let expected = format!(
                "`{}` is {width}×{height} pixels, over the image limit of {LIMIT_TEXT}; shrink it or remove it",
                path.display()
            );
            assert_eq!(check(&path), Err(expected.clone()));
            assert_eq!(decode_rgb(&path).err(), Some(expected));
        }
        std::fs::write(&path, png_header(8192, 8192)).expect("write");
        assert_eq!(check(&path), Ok((8192, 8192)));
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(MAX_FILE_BYTES + 1).expect("sparse"); // costs no disk
        assert_eq!(
            check(&path),
            Err(format!(
                "`{}` is 268435457 bytes, over the image limit of {LIMIT_TEXT}; shrink it or remove it",
                path.display()
            ))
        );
    }

    #[test]
    fn a_folder_lists_non_hidden_images_and_refuses_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["b.PNG", "a.jpg", ".hidden.png", ".DS_Store"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        let names: Vec<String> = list_folder(dir.path())
            .expect("list")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["a.jpg", "b.PNG"]);
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        assert_eq!(
            list_folder(dir.path()),
            Err(format!(
                "`{}` is not an image file (png, jpg, jpeg, webp); move it out of the folder or start its name with `.`",
                dir.path().join("notes.txt").display()
            ))
        );
    }
}
