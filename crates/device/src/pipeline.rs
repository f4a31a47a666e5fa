//! Frame → quality gate → embedding → heads → record.

use std::collections::BTreeMap;
use std::io::Cursor;

use dermedge_core::quality::{QualityThresholds, QualityVerdict};
use dermedge_core::{Embedder, RgbImage};
use dermedge_head::{HeadError, LinearHead};
use dermedge_record::{
    new_record_id, EmbeddingType, HeadResult, QualityResult, Record, StoredEmbedding, RECORD_FORMAT,
};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("embedding failed: {0}")]
    Embed(#[from] dermedge_core::EmbedError),
    #[error("thumbnail: {0}")]
    Thumbnail(String),
}

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub device_id: String,
    pub quality: QualityThresholds,
    /// Queue embeddings as f16 (half the bytes) instead of f32.
    pub embedding_type: EmbeddingType,
    /// Longest side of the JPEG thumbnail kept with each record; `None` keeps none.
    pub thumbnail_side: Option<u32>,
    pub thumbnail_quality: u8,
}

impl PipelineOptions {
    pub fn new(device_id: &str) -> Self {
        Self {
            device_id: device_id.into(),
            quality: QualityThresholds::default(),
            embedding_type: EmbeddingType::F32,
            thumbnail_side: Some(96),
            thumbnail_quality: 80,
        }
    }
}

/// What became of a frame.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The quality gate refused it: nothing was embedded.
    Refused(QualityVerdict),
    /// Embedded; the record is ready to queue, with the embedding as computed.
    Accepted {
        record: Box<Record>,
        verdict: QualityVerdict,
        embedding: Vec<f32>,
    },
}

pub struct Pipeline<E: Embedder> {
    embedder: E,
    heads: Vec<LinearHead>,
    options: PipelineOptions,
}

impl<E: Embedder> Pipeline<E> {
    /// Every head must be bound to the embedder's model; a mismatch is refused here, before any
    /// capture.
    pub fn new(
        embedder: E,
        heads: Vec<LinearHead>,
        options: PipelineOptions,
    ) -> Result<Self, PipelineError> {
        let model = &embedder.manifest().model;
        for head in &heads {
            head.check_model(&model.id, model.embedding_dim)?;
        }
        Ok(Self {
            embedder,
            heads,
            options,
        })
    }

    pub fn embedder(&self) -> &E {
        &self.embedder
    }

    pub fn heads(&self) -> &[LinearHead] {
        &self.heads
    }

    /// Run `head` from the next capture on, in place of the head of its name (or beside the
    /// others); refused, the heads unchanged, if it is bound to another model.
    pub fn install_head(&mut self, head: LinearHead) -> Result<(), PipelineError> {
        let model = &self.embedder.manifest().model;
        head.check_model(&model.id, model.embedding_dim)?;
        match self.heads.iter_mut().find(|h| h.name == head.name) {
            Some(slot) => *slot = head,
            None => self.heads.push(head),
        }
        Ok(())
    }

    pub fn judge(&self, image: &RgbImage) -> QualityVerdict {
        self.options.quality.judge(image)
    }

    /// Gate, embed and classify `image`, captured at `captured_at_ms` from `source`.
    pub fn process(
        &mut self,
        image: &RgbImage,
        captured_at_ms: i64,
        source: Option<String>,
    ) -> Result<Outcome, PipelineError> {
        let verdict = self.judge(image);
        if !verdict.accepted {
            return Ok(Outcome::Refused(verdict));
        }
        let embedding = self.embedder.embed(image)?.values;
        let heads = self
            .heads
            .iter()
            .map(|h| HeadResult {
                head: h.name.clone(),
                classes: h.classes.clone(),
                probabilities: h.predict(&embedding),
                version: h.version,
            })
            .collect();
        let thumbnail_jpeg = self
            .options
            .thumbnail_side
            .map(|side| thumbnail(image, side, self.options.thumbnail_quality))
            .transpose()?;
        let model = &self.embedder.manifest().model;
        let record = Record {
            format: RECORD_FORMAT,
            id: new_record_id(),
            captured_at_ms,
            device_id: self.options.device_id.clone(),
            model_id: model.id.clone(),
            precision: model.precision,
            embedding: StoredEmbedding::new(&embedding, self.options.embedding_type),
            heads,
            quality: Some(quality_result(&verdict)),
            source,
            thumbnail_jpeg,
        };
        Ok(Outcome::Accepted {
            record: Box::new(record),
            verdict,
            embedding,
        })
    }
}

pub fn quality_result(verdict: &QualityVerdict) -> QualityResult {
    let m = &verdict.measures;
    QualityResult {
        acceptable: verdict.accepted,
        reasons: verdict
            .issues
            .iter()
            .map(|i| i.message().to_string())
            .collect(),
        metrics: BTreeMap::from([
            ("mean_luminance".to_string(), m.mean_luminance),
            ("clipped_dark".to_string(), m.clipped_dark),
            ("clipped_bright".to_string(), m.clipped_bright),
            ("sharpness".to_string(), m.sharpness),
            ("colour_cast".to_string(), m.colour_cast),
        ]),
    }
}

fn thumbnail(image: &RgbImage, side: u32, quality: u8) -> Result<Vec<u8>, PipelineError> {
    let small = image::imageops::thumbnail(image, side, side);
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(&small)
        .map_err(|e| PipelineError::Thumbnail(e.to_string()))?;
    Ok(out.into_inner())
}
