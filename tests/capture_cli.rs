//! `dermedge devices` and `dermedge quality` end to end.

mod binary;

use binary::dermedge;
use dermedge_e2e::{fixtures, text};

#[test]
fn devices_reports_no_cameras_clearly() {
    let out = dermedge(&["devices"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // This machine has no V4L2 devices; a machine with a dermatoscope lists it with its formats.
    if !std::path::Path::new("/dev/video0").exists() {
        assert!(stdout.contains("no cameras found"), "{stdout}");
    }
}

#[test]
fn quality_gate_accepts_good_photos_and_names_the_problem_with_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixtures().join("images/astronaut-480.png");
    let img = image_bytes_darkened(&good);
    let dark = dir.path().join("dark.png");
    std::fs::write(&dark, img).unwrap();
    let out = dermedge(&["quality", good.to_str().unwrap(), dark.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].ends_with("accepted"), "{stdout}");
    assert!(lines[1].contains("too dark"), "{stdout}");
}

/// The fixture photo with every value multiplied by 0.15, as a PNG.
fn image_bytes_darkened(path: &std::path::Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let data: Vec<u8> = buf[..info.buffer_size()]
        .iter()
        .map(|&v| (v as f32 * 0.15) as u8)
        .collect();
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, info.width, info.height);
    enc.set_color(info.color_type);
    enc.set_depth(info.bit_depth);
    enc.write_header().unwrap().write_image_data(&data).unwrap();
    out
}
