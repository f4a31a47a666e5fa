//! Image files to model input tensors: decoding with bounded memory, EXIF orientation, and a
//! resize + value mapping that reproduces TensorFlow's `tf.image.resize(bilinear)` followed by
//! `pixel * scale + offset`, written straight into the caller's tensor buffer.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::manifest::{ColorOrder, InputSpec, Layout, ResizeFilter, TensorDtype};
use crate::RgbImage;

/// Bounds on what the decoder accepts, so a hostile or mistaken file cannot exhaust memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width or height in pixels.
    pub max_side: u32,
    /// Smallest accepted width or height in pixels (a 1×1 image carries no skin).
    pub min_side: u32,
    /// Most bytes the decoder may allocate for one image.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_side: 12_000,
            min_side: 16,
            max_alloc_bytes: 512 << 20,
        }
    }
}

/// Why a file could not be turned into an RGB image.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: empty file (0 bytes); expected a PNG, JPEG, BMP, TIFF or WebP image")]
    Empty { path: PathBuf },
    #[error("{path}: not a recognised image (starts with {magic}); expected PNG, JPEG, BMP, TIFF or WebP")]
    UnknownFormat { path: PathBuf, magic: String },
    #[error("{path}: image is {width}×{height} px; {reason}")]
    BadSize {
        path: PathBuf,
        width: u32,
        height: u32,
        reason: String,
    },
    #[error("{path}: corrupt or unsupported {format} image: {message}")]
    Corrupt {
        path: PathBuf,
        format: String,
        message: String,
    },
    #[error("input buffer holds {actual} values of {dtype}; the manifest's input needs {expected} of {expected_dtype}")]
    Buffer {
        actual: usize,
        dtype: &'static str,
        expected: usize,
        expected_dtype: &'static str,
    },
}

/// Decode an image file to RGB8, applying EXIF orientation; grayscale is expanded, alpha dropped
/// (as `tf.io.decode_image(channels=3)` does) and 16-bit samples keep their high byte (as TensorFlow's PNG decoder does).
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    let bytes = fs::read(path).map_err(|cause| DecodeError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    decode_bytes(&bytes, path, limits)
}

/// Decode encoded image bytes; `path` only names the source in errors.
pub fn decode_bytes(
    bytes: &[u8],
    path: &Path,
    limits: &DecodeLimits,
) -> Result<RgbImage, DecodeError> {
    let path_buf = || path.to_path_buf();
    if bytes.is_empty() {
        return Err(DecodeError::Empty { path: path_buf() });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|cause| DecodeError::Read {
            path: path_buf(),
            cause,
        })?;
    let Some(format) = reader.format() else {
        return Err(DecodeError::UnknownFormat {
            path: path_buf(),
            magic: describe_magic(bytes),
        });
    };
    let format_name = format!("{format:?}").to_uppercase();
    let corrupt = |e: image::ImageError| DecodeError::Corrupt {
        path: path_buf(),
        format: format_name.clone(),
        message: e.to_string(),
    };
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let bad_size = |reason: String| DecodeError::BadSize {
        path: path_buf(),
        width,
        height,
        reason,
    };
    if width.min(height) < limits.min_side {
        return Err(bad_size(format!(
            "at least {} px per side expected",
            limits.min_side
        )));
    }
    if width.max(height) > limits.max_side {
        return Err(bad_size(format!(
            "at most {} px per side accepted (refused before decoding)",
            limits.max_side
        )));
    }
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_alloc_bytes);
    let needed = decoder.total_bytes();
    if needed > limits.max_alloc_bytes {
        return Err(bad_size(format!(
            "decoding needs {needed} bytes, more than the {} byte limit",
            limits.max_alloc_bytes
        )));
    }
    decoder.set_limits(image_limits).map_err(corrupt)?;
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(into_rgb8(image))
}

/// RGB8 as TensorFlow's decoders produce it: 16-bit samples keep their high byte
/// (libpng's strip-16), where `DynamicImage::into_rgb8` would round `v / 257`.
fn into_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let wide = image.into_rgb16();
            let (w, h) = wide.dimensions();
            let narrow = wide
                .into_raw()
                .into_iter()
                .map(|v| (v >> 8) as u8)
                .collect();
            RgbImage::from_raw(w, h, narrow).expect("same dimensions, three channels")
        }
        other => other.into_rgb8(),
    }
}

fn describe_magic(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    if head
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ' || b.is_ascii_whitespace())
    {
        format!("text {:?}", String::from_utf8_lossy(head))
    } else {
        head.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Affine quantisation of a tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantParams {
    pub scale: f32,
    pub zero_point: i64,
}

/// The model input tensor to fill, in the model's own element type.
pub enum InputBuffer<'a> {
    F32(&'a mut [f32]),
    U8(&'a mut [u8]),
    I8(&'a mut [i8]),
}

impl InputBuffer<'_> {
    fn len(&self) -> usize {
        match self {
            InputBuffer::F32(b) => b.len(),
            InputBuffer::U8(b) => b.len(),
            InputBuffer::I8(b) => b.len(),
        }
    }

    fn dtype(&self) -> &'static str {
        match self {
            InputBuffer::F32(_) => "float32",
            InputBuffer::U8(_) => "uint8",
            InputBuffer::I8(_) => "int8",
        }
    }
}

/// One axis of a bilinear resize: for each output index the two source indices and the weight
/// of the second, computed exactly as TensorFlow's `resize_bilinear` (half-pixel centres) does.
#[derive(Debug, Default, Clone)]
struct AxisTable {
    src_len: u32,
    lower: Vec<u32>,
    upper: Vec<u32>,
    lerp: Vec<f32>,
}

impl AxisTable {
    fn rebuild(&mut self, src_len: u32, dst_len: u32) {
        if self.src_len == src_len && self.lower.len() == dst_len as usize {
            return;
        }
        self.src_len = src_len;
        self.lower.clear();
        self.upper.clear();
        self.lerp.clear();
        let scale = src_len as f32 / dst_len as f32;
        for i in 0..dst_len {
            let pos = (i as f32 + 0.5) * scale - 0.5;
            let floor = pos.floor();
            self.lower.push(floor.max(0.0) as u32);
            self.upper
                .push((pos.ceil() as i64).clamp(0, src_len as i64 - 1) as u32);
            self.lerp.push(pos - floor);
        }
    }
}

/// Resizes and maps RGB8 images into model input tensors as a manifest's `[input]` describes.
///
/// Reuses its interpolation tables between frames of the same size, so steady-state
/// preprocessing allocates nothing: it writes into the caller's tensor buffer.
pub struct Preprocessor {
    spec: InputSpec,
    quant: Option<QuantParams>,
    rows: AxisTable,
    cols: AxisTable,
}

impl Preprocessor {
    /// `quant` must be the input tensor's quantisation when the input dtype is uint8/int8.
    pub fn new(spec: &InputSpec, quant: Option<QuantParams>) -> Self {
        Self {
            spec: spec.clone(),
            quant,
            rows: AxisTable::default(),
            cols: AxisTable::default(),
        }
    }

    pub fn spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Fill `out` (one batch element) from `image`.
    pub fn run(&mut self, image: &RgbImage, out: InputBuffer<'_>) -> Result<(), DecodeError> {
        let (w, h) = (self.spec.width, self.spec.height);
        let expected = (w * h * 3) as usize;
        let expected_dtype = self.spec.dtype.as_str();
        if out.len() != expected || out.dtype() != expected_dtype {
            return Err(DecodeError::Buffer {
                actual: out.len(),
                dtype: out.dtype(),
                expected,
                expected_dtype,
            });
        }
        match self.spec.resize_filter {
            ResizeFilter::Bilinear => {
                self.rows.rebuild(image.height(), h);
                self.cols.rebuild(image.width(), w);
            }
        }
        let (scale, offset) = (self.spec.scale, self.spec.offset);
        let quant = self.quant.unwrap_or(QuantParams {
            scale: 1.0,
            zero_point: 0,
        });
        let inv_qscale = 1.0 / quant.scale;
        let zp = quant.zero_point as f32;
        let channel_src = match self.spec.color_order {
            ColorOrder::Rgb => [0usize, 1, 2],
            ColorOrder::Bgr => [2usize, 1, 0],
        };
        let plane = (w * h) as usize;
        let index = |y: usize, x: usize, c: usize| -> usize {
            match self.spec.layout {
                Layout::Nhwc => (y * w as usize + x) * 3 + c,
                Layout::Nchw => c * plane + y * w as usize + x,
            }
        };
        let src = image.as_raw();
        let stride = image.width() as usize * 3;
        let mut out = out;
        for y in 0..h as usize {
            let (y0, y1, ly) = (
                self.rows.lower[y] as usize,
                self.rows.upper[y] as usize,
                self.rows.lerp[y],
            );
            for x in 0..w as usize {
                let (x0, x1, lx) = (
                    self.cols.lower[x] as usize,
                    self.cols.upper[x] as usize,
                    self.cols.lerp[x],
                );
                for (c, &sc) in channel_src.iter().enumerate() {
                    let px = |yy: usize, xx: usize| src[yy * stride + xx * 3 + sc] as f32;
                    let (tl, tr, bl, br) = (px(y0, x0), px(y0, x1), px(y1, x0), px(y1, x1));
                    let top = tl + (tr - tl) * lx;
                    let bottom = bl + (br - bl) * lx;
                    let value = (top + (bottom - top) * ly) * scale + offset;
                    let i = index(y, x, c);
                    match &mut out {
                        InputBuffer::F32(b) => b[i] = value,
                        InputBuffer::U8(b) => {
                            b[i] = (value * inv_qscale + zp).round().clamp(0.0, 255.0) as u8
                        }
                        InputBuffer::I8(b) => {
                            b[i] = (value * inv_qscale + zp).round().clamp(-128.0, 127.0) as i8
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Convenience for tests and tools: preprocess into a new float tensor (input dtype float32).
    pub fn to_f32(&mut self, image: &RgbImage) -> Result<Vec<f32>, DecodeError> {
        let mut v = vec![0f32; (self.spec.width * self.spec.height * 3) as usize];
        if self.spec.dtype != TensorDtype::Float32 {
            return Err(DecodeError::Buffer {
                actual: v.len(),
                dtype: "float32",
                expected: v.len(),
                expected_dtype: self.spec.dtype.as_str(),
            });
        }
        self.run(image, InputBuffer::F32(&mut v))?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ModelManifest;

    fn spec(w: u32, h: u32, dtype: TensorDtype, layout: Layout, color: ColorOrder) -> InputSpec {
        InputSpec {
            width: w,
            height: h,
            channels: 3,
            layout,
            color_order: color,
            dtype,
            resize_filter: ResizeFilter::Bilinear,
            scale: 1.0 / 255.0,
            offset: 0.0,
            quantization: None,
        }
    }

    #[test]
    fn identity_size_copies_pixels_scaled() {
        let img = RgbImage::from_fn(4, 3, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 20) as u8, 200])
        });
        let mut p = Preprocessor::new(
            &spec(4, 3, TensorDtype::Float32, Layout::Nhwc, ColorOrder::Rgb),
            None,
        );
        let v = p.to_f32(&img).unwrap();
        for y in 0..3 {
            for x in 0..4 {
                let px = img.get_pixel(x, y).0;
                for c in 0..3 {
                    let got = v[((y * 4 + x) * 3 + c) as usize];
                    assert!((got - px[c as usize] as f32 / 255.0).abs() < 1e-7);
                }
            }
        }
    }

    #[test]
    fn upscale_two_to_four_matches_half_pixel_bilinear() {
        // TensorFlow: resize([0, 100] -> 4) with half-pixel centres gives [0, 25, 75, 100].
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([(x * 100) as u8, 0, 0]));
        let mut s = spec(4, 1, TensorDtype::Float32, Layout::Nhwc, ColorOrder::Rgb);
        s.scale = 1.0;
        let v = Preprocessor::new(&s, None).to_f32(&img).unwrap();
        let red: Vec<f32> = v.chunks(3).map(|c| c[0]).collect();
        assert_eq!(red, vec![0.0, 25.0, 75.0, 100.0]);
    }

    #[test]
    fn bgr_and_nchw_reorder_channels() {
        let img = RgbImage::from_pixel(2, 2, image::Rgb([10, 20, 30]));
        let mut s = spec(2, 2, TensorDtype::Float32, Layout::Nchw, ColorOrder::Bgr);
        s.scale = 1.0;
        let v = Preprocessor::new(&s, None).to_f32(&img).unwrap();
        assert_eq!(
            v,
            vec![30.0, 30.0, 30.0, 30.0, 20.0, 20.0, 20.0, 20.0, 10.0, 10.0, 10.0, 10.0]
        );
    }

    #[test]
    fn quantised_inputs_use_scale_and_zero_point() {
        let img = RgbImage::from_pixel(2, 2, image::Rgb([0, 128, 255]));
        let q = QuantParams {
            scale: 1.0 / 255.0,
            zero_point: -128,
        };
        let mut s = spec(2, 2, TensorDtype::Int8, Layout::Nhwc, ColorOrder::Rgb);
        s.quantization = Some(crate::manifest::QuantSpec {
            scale: q.scale,
            zero_point: q.zero_point,
        });
        let mut out = vec![0i8; 12];
        Preprocessor::new(&s, Some(q))
            .run(&img, InputBuffer::I8(&mut out))
            .unwrap();
        assert_eq!(&out[..3], &[-128, 0, 127]);

        let qu = QuantParams {
            scale: 1.0 / 255.0,
            zero_point: 0,
        };
        let mut s = spec(2, 2, TensorDtype::Uint8, Layout::Nhwc, ColorOrder::Rgb);
        s.quantization = Some(crate::manifest::QuantSpec {
            scale: qu.scale,
            zero_point: 0,
        });
        let mut out = vec![0u8; 12];
        Preprocessor::new(&s, Some(qu))
            .run(&img, InputBuffer::U8(&mut out))
            .unwrap();
        assert_eq!(&out[..3], &[0, 128, 255]);
    }

    #[test]
    fn wrong_buffer_is_an_error_not_a_panic() {
        let img = RgbImage::from_pixel(2, 2, image::Rgb([0, 0, 0]));
        let mut p = Preprocessor::new(
            &spec(2, 2, TensorDtype::Float32, Layout::Nhwc, ColorOrder::Rgb),
            None,
        );
        let mut small = vec![0f32; 5];
        let err = p
            .run(&img, InputBuffer::F32(&mut small))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 12"), "{err}");
        let mut wrong_type = vec![0u8; 12];
        assert!(p.run(&img, InputBuffer::U8(&mut wrong_type)).is_err());
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn read_reference(name: &str) -> (Vec<usize>, Vec<f32>) {
        use std::io::Read;
        let gz = fs::read(
            fixtures()
                .join("reference")
                .join(format!("{name}.input.npy.gz")),
        )
        .unwrap();
        let mut npy = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut npy)
            .unwrap();
        let (shape, values) = crate::npy::read_f32(&npy).unwrap();
        (shape, values)
    }

    /// The Rust preprocessing agrees with the fixture graph's TensorFlow preprocessing
    /// (decode -> bilinear resize -> /255) to within 1/255 per value on every fixture image.
    #[test]
    fn matches_tensorflow_reference_on_fixture_images() {
        let manifest = ModelManifest::load(fixtures().join("df-mini/df-mini.fp32.toml")).unwrap();
        let index: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(fixtures().join("reference/index.json")).unwrap(),
        )
        .unwrap();
        let rows: Vec<usize> = index["reference_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut pre = Preprocessor::new(&manifest.input, None);
        let images = index["images"].as_array().unwrap();
        assert!(images.len() >= 8);
        for name in images {
            let name = name.as_str().unwrap();
            let img = decode_file(
                &fixtures().join("images").join(name),
                &DecodeLimits::default(),
            )
            .unwrap();
            let ours = pre.to_f32(&img).unwrap();
            let (shape, reference) = read_reference(name);
            assert_eq!(shape, vec![rows.len(), 448, 3], "{name}");
            let mut worst = 0f32;
            for (ri, &row) in rows.iter().enumerate() {
                let ours_row = &ours[row * 448 * 3..(row + 1) * 448 * 3];
                let ref_row = &reference[ri * 448 * 3..(ri + 1) * 448 * 3];
                for (a, b) in ours_row.iter().zip(ref_row) {
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(
                worst <= 1.0 / 255.0,
                "{name}: max abs difference {worst} > 1/255"
            );
        }
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn bad_files_give_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DecodeLimits::default();
        let empty = write(dir.path(), "empty.png", b"");
        let err = decode_file(&empty, &limits).unwrap_err();
        assert!(
            matches!(err, DecodeError::Empty { .. }) && err.to_string().contains("empty.png"),
            "{err}"
        );

        let text = write(
            dir.path(),
            "notes.png",
            b"these are clinic notes, not a photo\n",
        );
        let err = decode_file(&text, &limits).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownFormat { .. }), "{err}");
        assert!(
            err.to_string().contains("notes.png") && err.to_string().contains("text"),
            "{err}"
        );

        let mut one = Vec::new();
        RgbImage::from_pixel(1, 1, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut one), image::ImageFormat::Png)
            .unwrap();
        let err = decode_file(&write(dir.path(), "dot.png", &one), &limits).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::BadSize {
                    width: 1,
                    height: 1,
                    ..
                }
            ),
            "{err}"
        );

        let mut good = Vec::new();
        RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut good), image::ImageFormat::Png)
            .unwrap();
        let truncated = write(dir.path(), "cut.png", &good[..good.len() / 2]);
        let err = decode_file(&truncated, &limits).unwrap_err();
        assert!(err.to_string().contains("cut.png"), "{err}");
        assert!(decode_file(&dir.path().join("absent.png"), &limits).is_err());
    }

    /// A 20000×20000 PNG (about 1 MB compressed, 1.2 GB decoded) is refused from its header.
    #[test]
    fn huge_png_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        let file = fs::File::create(&path).unwrap();
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 20_000, 20_000);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_compression(png::Compression::Fastest);
        let mut writer = encoder
            .write_header()
            .unwrap()
            .into_stream_writer()
            .unwrap();
        let row = vec![0u8; 20_000 * 3];
        use std::io::Write;
        for _ in 0..200 {
            writer.write_all(&row).unwrap();
        }
        drop(writer); // an incomplete image data stream: the header alone must be enough to refuse
        let err = decode_file(&path, &DecodeLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::BadSize {
                    width: 20_000,
                    height: 20_000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 40×20 landscape JPEG tagged "rotate 90° clockwise" (orientation 6) decodes 20×40.
        let img = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        });
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        // Insert an APP1 Exif segment with Orientation=6 after SOI.
        let tiff: Vec<u8> = [
            b"MM\0\x2a\0\0\0\x08".as_slice(),
            &[0, 1],                                     // one IFD entry
            &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0], // Orientation, SHORT, 1, value 6
            &[0, 0, 0, 0],
        ]
        .concat();
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let len = (app1.len() + 2) as u16;
        let mut tagged = vec![0xff, 0xd8, 0xff, 0xe1];
        tagged.extend_from_slice(&len.to_be_bytes());
        tagged.extend_from_slice(&app1);
        tagged.extend_from_slice(&jpeg[2..]);
        let dir = tempfile::tempdir().unwrap();
        let decoded = decode_file(
            &write(dir.path(), "rotated.jpg", &tagged),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(decoded.dimensions(), (20, 40));
        // Rotating 90° clockwise puts the left (red) half on top.
        assert!(decoded.get_pixel(10, 5).0[0] > 200 && decoded.get_pixel(10, 35).0[2] > 200);
    }
}
