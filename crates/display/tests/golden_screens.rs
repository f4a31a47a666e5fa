//! Every screen at every supported size against a committed golden PNG.
//!
//! The test is the generator: `DERMEDGE_UPDATE_GOLDEN=1 cargo test -p dermedge-display --test
//! golden_screens` rewrites `tests/golden/*.png` from what it draws; look at them before
//! committing.

use std::path::PathBuf;

use dermedge_display::{draw, Canvas, HeadView, Screen, Status, SyncView};
use embedded_graphics::pixelcolor::Rgb888;
use image::RgbImage;

const SIZES: [(u32, u32); 3] = [(240, 240), (320, 240), (800, 480)];

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A deterministic stand-in for a camera frame: skin tones with a darker lesion.
fn frame() -> RgbImage {
    RgbImage::from_fn(160, 120, |x, y| {
        let (dx, dy) = (x as f32 - 84.0, y as f32 - 58.0);
        let r = (dx * dx / 1.3 + dy * dy).sqrt();
        if r < 28.0 {
            image::Rgb([110 - (r as u8), 62, 45])
        } else {
            image::Rgb([220 - (y / 8) as u8, 170 - (x / 10) as u8, 140])
        }
    })
}

fn status(sync: SyncView) -> Status {
    Status {
        device: "pi5-handheld-07".into(),
        queue_depth: 12,
        sync,
        captures: 34,
    }
}

fn check(name: &str, width: u32, height: u32, screen: &Screen, status: &Status) {
    let mut canvas = Canvas::new(width, height);
    draw(&mut canvas, screen, status).unwrap();
    let path = golden_dir().join(format!("{name}-{width}x{height}.png"));
    if std::env::var_os("DERMEDGE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        canvas.save_png(&path).unwrap();
        return;
    }
    let golden = image::open(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with DERMEDGE_UPDATE_GOLDEN=1",
                path.display()
            )
        })
        .to_rgb8();
    let drawn = canvas.to_image();
    let differing = golden
        .pixels()
        .zip(drawn.pixels())
        .filter(|(a, b)| a != b)
        .count();
    if differing > 0 {
        let actual =
            std::env::temp_dir().join(format!("dermedge-{name}-{width}x{height}.actual.png"));
        drawn.save(&actual).unwrap();
        panic!(
            "{name} at {width}x{height}: {differing} pixels differ from {}; drawn: {}",
            path.display(),
            actual.display()
        );
    }
}

fn every_size(name: &str, screen: &Screen, status: &Status) {
    for (w, h) in SIZES {
        check(name, w, h, screen, status);
    }
}

#[test]
fn preview() {
    let f = frame();
    every_size(
        "preview",
        &Screen::Preview {
            frame: &f,
            hint: "Hold still: capturing when sharp",
        },
        &status(SyncView::Synced { seconds_ago: 190 }),
    );
}

#[test]
fn quality_warning() {
    let f = frame();
    let reasons = vec![
        "too dark: add light or move closer".to_string(),
        "blurred: hold still and refocus".to_string(),
    ];
    every_size(
        "quality",
        &Screen::QualityWarning {
            frame: Some(&f),
            reasons: &reasons,
        },
        &status(SyncView::Offline {
            reason: "hub unreachable".into(),
        }),
    );
}

#[test]
fn result() {
    let heads = vec![
        HeadView::new(
            "condition",
            &["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"].map(String::from),
            &[0.02, 0.05, 0.11, 0.01, 0.09, 0.70, 0.02],
        ),
        HeadView::new(
            "image quality",
            &["good".into(), "poor".into()],
            &[0.93, 0.07],
        ),
    ];
    every_size(
        "result",
        &Screen::Result {
            heads: &heads,
            record: "3f2a9c01d4e5",
        },
        &status(SyncView::Waiting),
    );
}

#[test]
fn result_that_overflows_the_display_is_laid_out() {
    let classes: Vec<String> = (0..10)
        .map(|i| format!("very long condition name number {i} with qualifiers"))
        .collect();
    let probabilities: Vec<f32> = (0..10).map(|i| (10 - i) as f32 / 55.0).collect();
    let heads = vec![HeadView::new(
        "condition (ten classes, long names)",
        &classes,
        &probabilities,
    )];
    every_size(
        "result-overflow",
        &Screen::Result {
            heads: &heads,
            record: "3f2a9c01d4e5",
        },
        &status(SyncView::Synced { seconds_ago: 5 }),
    );
    // Nothing is drawn past the right edge mid-glyph: the rightmost text column of the
    // 240-wide screen stays background outside the bars.
    let mut canvas = Canvas::new(240, 240);
    draw(
        &mut canvas,
        &Screen::Result {
            heads: &heads,
            record: "x",
        },
        &status(SyncView::Disabled),
    )
    .unwrap();
    for y in 0..240 {
        assert!(
            [canvas.pixel(239, y), canvas.pixel(238, y)]
                .iter()
                .all(|p| *p == Rgb888::new(0, 0, 0) || *p == Rgb888::new(40, 44, 52)),
            "row {y} reaches the last column"
        );
    }
}

#[test]
fn result_without_heads() {
    every_size(
        "result-no-heads",
        &Screen::Result {
            heads: &[],
            record: "3f2a9c01d4e5",
        },
        &status(SyncView::Disabled),
    );
}

#[test]
fn status_screen() {
    let details = vec![
        "Model df-mini int8 on LiteRT 2.1.4 cpu, 4 threads".to_string(),
        "Last sync error: cannot reach the hub at http://hub.local:8787: connection refused"
            .to_string(),
    ];
    every_size(
        "status",
        &Screen::Status { details: &details },
        &status(SyncView::Offline {
            reason: "connection refused".into(),
        }),
    );
}

#[test]
fn error_screen() {
    every_size(
        "error",
        &Screen::Error {
            title: "Camera disconnected",
            message: "The USB dermatoscope was unplugged. Reconnect it; capture resumes by itself. Records taken so far are safe in the queue.",
        },
        &status(SyncView::Synced { seconds_ago: 7200 }),
    );
}
