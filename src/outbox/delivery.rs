//! What happened to one event at SQS, and why: every failure classified
//! where it is seen, as the message's own fault (a rejection, counted toward
//! dead), a per-entry hiccup that is not its fault (throttling, an internal
//! error: retried later, not counted), or an outage of the whole call (never
//! counted). A leaf module: the error type and the relay use it.

use std::fmt;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::operation::RequestId;
use aws_sdk_sqs::types::BatchResultErrorEntry;

/// An SQS call that failed as a whole, with what SQS (or the network) said:
/// its error code when SQS answered, the request id to quote to AWS support,
/// and the full error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsFailure {
    /// What was being done ("SendMessageBatch", "CreateQueue x", ...).
    pub call: String,
    pub code: Option<String>,
    pub request_id: Option<String>,
    pub message: String,
}

impl SqsFailure {
    pub fn from_sdk<E, R>(call: impl Into<String>, err: &aws_sdk_sqs::error::SdkError<E, R>) -> SqsFailure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let meta = err.as_service_error().map(|e| e.meta());
        SqsFailure {
            call: call.into(),
            code: err.code().map(str::to_owned),
            request_id: meta.and_then(|m| m.request_id()).map(str::to_owned),
            message: DisplayErrorContext(err).to_string(),
        }
    }
}

impl fmt::Display for SqsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.call)?;
        if let Some(code) = &self.code {
            write!(f, ": {code}")?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " (request id {id})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SqsFailure {}

/// A failure SQS reported for one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    pub code: String,
    pub message: String,
    pub sender_fault: bool,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sender fault: {}): {}", self.code, self.sender_fault, self.message)
    }
}

impl From<&BatchResultErrorEntry> for EntryError {
    fn from(e: &BatchResultErrorEntry) -> Self {
        EntryError {
            code: e.code().to_owned(),
            message: e.message().unwrap_or_default().to_owned(),
            sender_fault: e.sender_fault(),
        }
    }
}

/// Per-entry codes caused by the message itself: sending it again cannot
/// help, so each counts toward the event's `max_attempts`. LocalStack (and, by
/// some reports, SQS) flags `InvalidMessageContents` as no sender fault, so
/// the code decides before the flag does.
const MESSAGE_FAULT_CODES: &[&str] = &[
    "InvalidMessageContents",
    "InvalidParameter",
    "InvalidParameterValue",
    "InvalidParameterValueException",
    "ValidationError",
    "InvalidAttributeName",
    "InvalidAttributeValue",
    "MessageTooLong",
    "MissingParameter",
    "InvalidBatchEntryId",
];

/// Per-entry codes that are not the message's fault: throttling, SQS's own
/// trouble, and KMS (a disabled or throttled key is the queue's set-up).
fn is_transient_entry_code(code: &str) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "Throttling"
            | "Throttled"
            | "ThrottledException"
            | "RequestThrottled"
            | "ServiceUnavailable"
            | "InternalError"
            | "InternalFailure"
            | "ServiceUnavailableException"
    ) || code.starts_with("KMS.")
        || code.starts_with("Kms")
}

/// What happened to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// SQS accepted it.
    Sent,
    /// SQS refused this entry because of the message itself (or it is larger
    /// than any SQS message can be): counts as an attempt, and the event is
    /// dead after the configured maximum.
    Rejected(EntryError),
    /// SQS failed this entry for a reason that is not the message's
    /// (throttling, an internal error): this event is retried later with
    /// backoff, never counted, and the other events are not held back.
    Deferred(EntryError),
    /// The whole call failed (unreachable, timed out, throttled, 5xx, queue
    /// missing, credentials, a malformed request): an outage, never counted
    /// against any event, however many the call carried.
    Unavailable(SqsFailure),
}

impl Delivery {
    /// Classifies a per-entry failure: by its code first, then by its
    /// `SenderFault` flag.
    pub fn for_entry(error: EntryError) -> Delivery {
        if MESSAGE_FAULT_CODES.contains(&error.code.as_str()) {
            Delivery::Rejected(error)
        } else if is_transient_entry_code(&error.code) || !error.sender_fault {
            Delivery::Deferred(error)
        } else {
            Delivery::Rejected(error)
        }
    }

    /// What happened, in a word (for spans).
    pub fn name(&self) -> &'static str {
        match self {
            Delivery::Sent => "sent",
            Delivery::Rejected(_) => "rejected",
            Delivery::Deferred(_) => "deferred",
            Delivery::Unavailable(_) => "unavailable",
        }
    }
}
