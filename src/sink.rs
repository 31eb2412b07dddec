//! Where flushed records go: the [`Sink`] interface, and the NDJSON file sink
//! used by `spanbuf replay`.
//!
//! A sink returns only once its records are durably handed off (written and
//! flushed for a file; acknowledged by the broker for Kafka), and says, per
//! record, what did not go out and whether a retry can help
//! ([`Undelivered`]). The flusher cleans up Redis only for segments whose
//! records all went out (or can never go out: counted as dropped). A sink
//! must not retry forever: the segments of a record that may go out later
//! stay buffered and a later cycle delivers them.

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

/// Why one record of a delivery did not go out.
#[derive(Debug, Clone, PartialEq)]
pub enum Undelivered {
    /// May go out later (broker down, timeout, queue full): its segment stays
    /// buffered.
    Retry(String),
    /// Can never go out as it is (larger than the broker accepts, not
    /// encodable): its spans count as dropped with `reason` (one of
    /// [`crate::metrics::DROP_REASONS`]) and its segment is cleaned up, so it
    /// cannot hold back the others for good.
    Rejected {
        reason: &'static str,
        detail: String,
    },
}

/// What became of the records of one [`Sink::deliver`] call: every record not
/// listed was handed off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delivery {
    /// `(index into the records, why)`, in index order.
    pub undelivered: Vec<(usize, Undelivered)>,
}

impl Delivery {
    /// Every record went out.
    pub fn complete() -> Delivery {
        Delivery::default()
    }

    /// Every record failed the same retryable way.
    pub fn all_retry(records: usize, why: &str) -> Delivery {
        Delivery {
            undelivered: (0..records)
                .map(|i| (i, Undelivered::Retry(why.to_owned())))
                .collect(),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.undelivered.is_empty()
    }

    /// The first failure's text, for a log line.
    pub fn first_error(&self) -> Option<&str> {
        self.undelivered.first().map(|(_, u)| match u {
            Undelivered::Retry(why) => why.as_str(),
            Undelivered::Rejected { detail, .. } => detail.as_str(),
        })
    }
}

/// Receives the records of a flush cycle and confirms their delivery.
pub trait Sink: Send + Sync {
    /// Delivers every record, in order. `Ok` lists the records that did not go
    /// out; `Err` means none of them is known to have gone out (e.g. the file
    /// could not be written).
    fn deliver(
        &self,
        records: &[FlushedSegment],
    ) -> impl Future<Output = Result<Delivery, SinkError>> + Send;
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
    async fn deliver(&self, records: &[FlushedSegment]) -> Result<Delivery, SinkError> {
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
        Ok(Delivery::complete())
    }
}
