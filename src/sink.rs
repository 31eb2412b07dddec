//! Where flushed records go: the [`Sink`] interface, and the NDJSON file sink
//! used by `spanbuf replay`.
//!
//! A sink returns only once its records are durably handed off (written and
//! flushed for a file; acknowledged by the broker for Kafka). The flusher
//! cleans up Redis only after that. A sink must not retry forever: it returns
//! an error, the segments stay buffered and a later cycle delivers them.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use crate::span::record::{FlushedSegment, RecordError};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink: encoding a record failed: {0}")]
    Encode(#[from] RecordError),
    #[error("sink: writing records failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("sink: delivery failed: {0}")]
    Delivery(String),
}

/// Receives the records of a flush cycle and confirms their delivery.
pub trait Sink: Send + Sync {
    /// Delivers every record, in order; `Ok` means all of them are handed off.
    fn deliver(
        &self,
        records: &[FlushedSegment],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Writes one JSON record per line to a file or stdout.
pub struct NdjsonSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl NdjsonSink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }

    /// `-` is stdout; anything else a file, created or truncated.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        if path == Path::new("-") {
            return Ok(Self::new(Box::new(std::io::stdout())));
        }
        let file = std::fs::File::create(path)?;
        Ok(Self::new(Box::new(std::io::BufWriter::new(file))))
    }
}

impl Sink for NdjsonSink {
    async fn deliver(&self, records: &[FlushedSegment]) -> Result<(), SinkError> {
        let mut buf = Vec::new();
        for record in records {
            buf.extend_from_slice(&record.to_json()?);
            buf.push(b'\n');
        }
        // A poisoned lock means a writer panicked mid-write; the stream may be
        // torn, so refuse rather than append to it.
        let mut out = self.out.lock().map_err(|_| {
            SinkError::Delivery("output stream poisoned by an earlier panic".into())
        })?;
        out.write_all(&buf)?;
        out.flush()?;
        Ok(())
    }
}
