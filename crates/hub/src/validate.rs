//! What the hub accepts in a record a device wrote: the checks made on arrival, so that a record
//! that would break an export, a CSV cell or a page is refused with its reason (and counted as
//! a loss of that device) while the rest of its batch is stored.

use dermedge_record::{EmbeddingType, Record, RECORD_FORMAT};

/// Longest model id, head or class name.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest `source` kept.
pub const MAX_SOURCE_CHARS: usize = 256;
/// Most heads on one record, and classes on one head.
pub const MAX_HEADS: usize = 32;
pub const MAX_CLASSES: usize = 256;
/// Largest embedding dimension and thumbnail.
pub const MAX_DIM: u32 = 1 << 16;
pub const MAX_THUMBNAIL_BYTES: usize = 256 << 10;

/// Why `record` cannot be stored, or `None` when it can.
pub fn refusal(record: &Record) -> Option<String> {
    if record.format != RECORD_FORMAT {
        return Some(format!(
            "record format {}, expected {RECORD_FORMAT}",
            record.format
        ));
    }
    let id = &record.id;
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Some("id: expected 32 lowercase hex digits".into());
    }
    if let Some(why) = name("model_id", &record.model_id) {
        return Some(why);
    }
    let e = &record.embedding;
    if e.dim == 0 || e.dim > MAX_DIM {
        return Some(format!("embedding dim {}: expected 1 to {MAX_DIM}", e.dim));
    }
    let width = match e.dtype {
        EmbeddingType::F32 => 4,
        EmbeddingType::F16 => 2,
    };
    if e.data.len() != e.dim as usize * width {
        return Some(format!(
            "embedding: {} bytes, {} values of {width} bytes need {}",
            e.data.len(),
            e.dim,
            e.dim as usize * width
        ));
    }
    if record.heads.len() > MAX_HEADS {
        return Some(format!("{} heads: at most {MAX_HEADS}", record.heads.len()));
    }
    for head in &record.heads {
        if let Some(why) = name("head", &head.head) {
            return Some(why);
        }
        if head.classes.is_empty()
            || head.classes.len() > MAX_CLASSES
            || head.classes.len() != head.probabilities.len()
        {
            return Some(format!(
                "head {}: {} classes and {} probabilities (1 to {MAX_CLASSES}, one each)",
                head.head,
                head.classes.len(),
                head.probabilities.len()
            ));
        }
        if let Some(why) = head.classes.iter().find_map(|c| name("class", c)) {
            return Some(format!("head {}: {why}", head.head));
        }
        if head
            .probabilities
            .iter()
            .any(|p| !p.is_finite() || !(0.0..=1.0).contains(p))
        {
            return Some(format!(
                "head {}: probabilities must lie in [0, 1]",
                head.head
            ));
        }
    }
    if let Some(source) = &record.source {
        if source.chars().count() > MAX_SOURCE_CHARS || source.chars().any(char::is_control) {
            return Some(format!(
                "source: expected at most {MAX_SOURCE_CHARS} printable characters"
            ));
        }
    }
    if let Some(jpeg) = &record.thumbnail_jpeg {
        if jpeg.len() > MAX_THUMBNAIL_BYTES || !jpeg.starts_with(&[0xFF, 0xD8]) {
            return Some(format!(
                "thumbnail: expected a JPEG of at most {MAX_THUMBNAIL_BYTES} bytes"
            ));
        }
    }
    None
}

/// A name a person reads in a table: 1 to [`MAX_NAME_CHARS`] printable characters.
fn name(what: &str, text: &str) -> Option<String> {
    let n = text.chars().count();
    if n == 0 || n > MAX_NAME_CHARS || text.chars().any(char::is_control) {
        return Some(format!(
            "{what}: expected 1 to {MAX_NAME_CHARS} printable characters"
        ));
    }
    None
}

/// What the hub keeps of a record's `source`: the file name alone (a full input path can carry a
/// patient's name), unless `keep_paths`.
pub fn stored_source(source: Option<&str>, keep_paths: bool) -> Option<String> {
    let source = source?;
    if keep_paths {
        return Some(source.to_string());
    }
    let name = source.rsplit(['/', '\\']).next().unwrap_or(source);
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermedge_record::{new_record_id, HeadResult, StoredEmbedding};

    fn good() -> Record {
        Record {
            format: RECORD_FORMAT,
            id: new_record_id(),
            captured_at_ms: 1,
            device_id: "dev".into(),
            model_id: "df-mini".into(),
            precision: dermedge_record::Precision::Int8,
            embedding: StoredEmbedding::new(&[1.0, 2.0], EmbeddingType::F32),
            heads: vec![HeadResult {
                head: "kind".into(),
                classes: vec!["a".into(), "b".into()],
                probabilities: vec![0.25, 0.75],
                version: None,
            }],
            quality: None,
            source: Some("/home/jane-doe/clinic/img-1.png".into()),
            thumbnail_jpeg: Some(vec![0xFF, 0xD8, 0xFF]),
        }
    }

    #[test]
    fn forged_fields_are_refused_with_their_reason() {
        assert_eq!(refusal(&good()), None);
        type Edit = fn(&mut Record);
        // (A precision outside the known ones does not decode: `Precision`'s own refusal.)
        let cases: [(Edit, &str); 9] = [
            (|r| r.id = "abc\n,=cmd|' /C calc'!A0".into(), "id"),
            (|r| r.model_id = "m\nodel".into(), "model_id"),
            (|r| r.model_id = "x".repeat(65), "model_id"),
            (
                |r| r.embedding.data.pop().map(drop).unwrap_or(()),
                "embedding",
            ),
            (|r| r.embedding.dim = 0, "embedding dim"),
            (|r| r.heads[0].probabilities.push(0.0), "head kind"),
            (|r| r.heads[0].probabilities[0] = f32::NAN, "probabilities"),
            (|r| r.source = Some("a\r\nb".into()), "source"),
            (|r| r.thumbnail_jpeg = Some(b"GIF89a".to_vec()), "thumbnail"),
        ];
        for (edit, expected) in cases {
            let mut r = good();
            edit(&mut r);
            let why = refusal(&r).unwrap_or_else(|| panic!("accepted: {expected}"));
            assert!(why.contains(expected), "{why}");
        }
    }

    #[test]
    fn sources_keep_the_file_name_only() {
        let source = good().source;
        assert_eq!(
            stored_source(source.as_deref(), false).as_deref(),
            Some("img-1.png")
        );
        assert_eq!(
            stored_source(Some(r"C:\Users\Jane Doe\img.jpg"), false).as_deref(),
            Some("img.jpg")
        );
        assert_eq!(stored_source(source.as_deref(), true), source);
    }
}
