//! Transfers: their typed values and their two state machines.
//!
//! ```text
//!  status:         enqueue ──> PENDING ──(worker: funds moved)──────> SUCCEEDED
//!                                 │ └────(worker: no funds / limit / ──> FAILED
//!                                 │        max attempts of errors)
//!                                 └──────(cancel)─────────────────────> CANCELLED
//!
//!  refund_status:  NONE ──(refund request, only if SUCCEEDED)──> REQUESTED
//!                  REQUESTED ──(worker: money moved back)──> COMPLETED
//!                  REQUESTED ──(worker: recipient lacks funds)──> FAILED
//! ```
//!
//! Every arrow is one guarded `UPDATE ... WHERE id = .. AND <from-state>` whose
//! rows-affected is checked, in the same transaction as the outbox event it
//! causes; `store` holds every one of those statements. Who calls them:
//! [`enqueue`] creates rows; [`apply`] moves PENDING transfers and REQUESTED
//! refunds on (its rooms: [`step`] the two kinds of work and their rows,
//! `locks` the account locks, `decide` the pure decision, `pacing` when to
//! claim what, [`gather`] how long a woken pass waits at high rates,
//! `telemetry` spans and reports, [`busy`] accounts held elsewhere, `limits`
//! daily limits); [`cancel`] and [`refund`] take
//! requests; [`show`] reads one transfer's story.

pub mod apply;
pub mod busy;
pub mod cancel;
mod decide;
pub mod enqueue;
pub mod gather;
pub(crate) mod limits;
mod locks;
mod pacing;
pub mod polling;
pub mod refund;
pub mod show;
pub mod step;
pub(crate) mod store;
mod telemetry;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A transfer's id, assigned by the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct TransferId(pub i64);

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TransferId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse::<i64>().map(TransferId).map_err(|_| format!("transfer id must be an integer, got {s:?}"))
    }
}

/// An amount of money in minor units; always > 0 (checked when parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub fn new(value: i64) -> Result<Self, String> {
        if value > 0 {
            Ok(Amount(value))
        } else {
            Err(format!("amount must be > 0, got {value}"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v =
            s.trim().parse::<i64>().map_err(|_| format!("amount must be a whole number of minor units, got {s:?}"))?;
        Amount::new(v)
    }
}

/// The producer's idempotency key: 1 character to 2 KiB (UTF-8). The same
/// key with the same parameters finds the transfer it created; with other
/// parameters it is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The schema's bound (`transfers_idempotency_key_length`).
    pub const MAX_BYTES: usize = 2048;

    pub fn new(key: impl Into<String>) -> Result<Self, String> {
        let key = key.into();
        if key.is_empty() {
            return Err("idempotency key must not be empty".into());
        }
        if key.len() > Self::MAX_BYTES {
            return Err(format!("idempotency key must be at most {} bytes, got {}", Self::MAX_BYTES, key.len()));
        }
        if key.chars().any(char::is_control) {
            return Err("idempotency key must not contain control characters".into());
        }
        Ok(IdempotencyKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IdempotencyKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        IdempotencyKey::new(s)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A W3C trace context, as a producer sends it in its `traceparent` header:
/// `version-traceid-parentid-flags` (`00-<32 hex>-<16 hex>-<2 hex>`).
/// <https://www.w3.org/TR/trace-context/#traceparent-header>
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TraceParent(String);

impl TraceParent {
    pub fn new(value: &str) -> Result<Self, String> {
        let bad =
            || format!("traceparent must look like 00-<32 hex>-<16 hex>-<2 hex> (W3C trace context), got {value:?}");
        let parts: Vec<&str> = value.split('-').collect();
        let hex =
            |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match parts.as_slice() {
            [version, trace, parent, flags]
                if hex(version, 2) && *version != "ff" && hex(trace, 32) && hex(parent, 16) && hex(flags, 2) =>
            {
                if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
                    return Err(bad());
                }
                Ok(TraceParent(value.to_owned()))
            }
            _ => Err(bad()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trace this belongs to (the 32 hex digits).
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }
}

impl FromStr for TraceParent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TraceParent::new(s.trim())
    }
}

/// `transfers.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransferStatus {
    /// Enqueued (CLI, library or SQL INSERT); left by the worker's apply or by cancel.
    Pending,
    /// Terminal. Set by the worker when the money moved; a refund may follow.
    Succeeded,
    /// Terminal. Set by the worker: insufficient funds, daily limit exceeded,
    /// or repeated unexpected errors (reason `processing_error`).
    Failed,
    /// Terminal. Set by `cancel` while the transfer was still PENDING.
    Cancelled,
}

impl TransferStatus {
    pub const ALL: [TransferStatus; 4] =
        [TransferStatus::Pending, TransferStatus::Succeeded, TransferStatus::Failed, TransferStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Pending => "PENDING",
            TransferStatus::Succeeded => "SUCCEEDED",
            TransferStatus::Failed => "FAILED",
            TransferStatus::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for TransferStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransferStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TransferStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown transfer status {s:?}"))
    }
}

crate::text_state::text_state!(TransferStatus);

/// `transfers.refund_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefundStatus {
    /// No refund asked for. Left by a refund request (only on a SUCCEEDED transfer).
    None,
    /// Asked for; the worker claims it and moves the money back.
    Requested,
    /// Terminal. The worker moved the refund amount back to the sender.
    Completed,
    /// Terminal. The recipient no longer had the money.
    Failed,
}

impl RefundStatus {
    pub const ALL: [RefundStatus; 4] =
        [RefundStatus::None, RefundStatus::Requested, RefundStatus::Completed, RefundStatus::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::None => "NONE",
            RefundStatus::Requested => "REQUESTED",
            RefundStatus::Completed => "COMPLETED",
            RefundStatus::Failed => "FAILED",
        }
    }
}

impl fmt::Display for RefundStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RefundStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RefundStatus::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| format!("unknown refund status {s:?}"))
    }
}

crate::text_state::text_state!(RefundStatus);

/// Why a transfer (or a refund) FAILED: `transfers.failure_reason` and
/// `refund_failure_reason`, and the event's `reason`; one spelling each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The source (for a refund: the recipient) lacked the money.
    InsufficientFunds,
    /// The transfer would take the source past its daily limit.
    DailyLimitExceeded,
    /// It kept hitting an unexpected error of its own, `--max-attempts` times.
    ProcessingError,
}

impl FailureReason {
    pub const ALL: [FailureReason; 3] =
        [FailureReason::InsufficientFunds, FailureReason::DailyLimitExceeded, FailureReason::ProcessingError];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InsufficientFunds => "insufficient_funds",
            FailureReason::DailyLimitExceeded => "daily_limit_exceeded",
            FailureReason::ProcessingError => "processing_error",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FailureReason::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| format!("unknown failure reason {s:?}"))
    }
}

crate::text_state::text_state!(FailureReason);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_the_w3c_format() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::new(ok).unwrap().trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::new(bad).is_err(), "{bad:?}");
        }
    }
}
