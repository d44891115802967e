//! The applier's two kinds of work, and the typed rows it handles: a
//! [`Step`] (a PENDING transfer, a REQUESTED refund) with everything it is
//! called, a [`Claimed`] row in money-movement terms, the [`Outcome`] a row
//! leaves with, and a [`LockedAccount`] as read under its row lock. The SQL
//! of each step is in `store`; the algorithm in [`super::apply`].

use crate::account::AccountId;
use crate::outbox::EventType;
use crate::transfer::{FailureReason, RefundStatus, TransferId, TransferStatus};

/// The two kinds of work the applier does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// PENDING -> SUCCEEDED | FAILED: `amount` from `from_account` to `to_account`.
    Transfer,
    /// refund REQUESTED -> COMPLETED | FAILED: `refund_amount` back from
    /// `to_account` to `from_account`.
    Refund,
}

impl Step {
    pub const ALL: [Step; 2] = [Step::Transfer, Step::Refund];

    /// For logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Step::Transfer => "transfer",
            Step::Refund => "refund",
        }
    }

    /// The name of the span that covers a row from claim to commit.
    pub fn span_name(self) -> &'static str {
        match self {
            Step::Transfer => "transfer.apply",
            Step::Refund => "refund.apply",
        }
    }

    /// How an outcome is named in metrics and spans.
    pub fn outcome_name(self, outcome: Outcome) -> &'static str {
        match (self, outcome) {
            (Step::Transfer, Outcome::Succeeded) => "succeeded",
            (Step::Refund, Outcome::Succeeded) => "completed",
            (_, Outcome::Failed(_)) => "failed",
        }
    }

    /// The event a row leaving this step with `outcome` writes.
    pub fn event_type(self, outcome: Outcome) -> EventType {
        match (self, outcome) {
            (Step::Transfer, Outcome::Succeeded) => EventType::TransferSucceeded,
            (Step::Transfer, Outcome::Failed(_)) => EventType::TransferFailed,
            (Step::Refund, Outcome::Succeeded) => EventType::RefundCompleted,
            (Step::Refund, Outcome::Failed(_)) => EventType::RefundFailed,
        }
    }

    /// The state a row leaves this step's waiting state for, as stored.
    pub fn state_after(self, outcome: Outcome) -> &'static str {
        match self {
            Step::Transfer => Step::transfer_status(outcome).as_str(),
            Step::Refund => Step::refund_status(outcome).as_str(),
        }
    }

    /// The transfer status a transfer leaves PENDING for.
    pub fn transfer_status(outcome: Outcome) -> TransferStatus {
        match outcome {
            Outcome::Succeeded => TransferStatus::Succeeded,
            Outcome::Failed(_) => TransferStatus::Failed,
        }
    }

    /// The refund status a refund leaves REQUESTED for.
    pub fn refund_status(outcome: Outcome) -> RefundStatus {
        match outcome {
            Outcome::Succeeded => RefundStatus::Completed,
            Outcome::Failed(_) => RefundStatus::Failed,
        }
    }
}

/// A claimed row, in money-movement terms: `amount` leaves `debit_account`
/// for `credit_account` if it succeeds (for a refund, the transfer's
/// recipient pays its sender back).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: TransferId,
    pub debit_account: AccountId,
    pub credit_account: AccountId,
    pub amount: i64,
    /// When it was inserted (Unix seconds), for the enqueue -> applied metric.
    pub created_epoch: f64,
    /// The producer's W3C trace context, if it gave one.
    pub traceparent: Option<String>,
}

impl Claimed {
    /// Both accounts the row moves money between.
    pub fn accounts(&self) -> [AccountId; 2] {
        [self.debit_account, self.credit_account]
    }
}

/// How a claimed row leaves its waiting state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed(FailureReason),
}

impl Outcome {
    pub fn reason(self) -> Option<FailureReason> {
        match self {
            Outcome::Succeeded => None,
            Outcome::Failed(r) => Some(r),
        }
    }
}

/// An account as a batch read it under its row lock.
#[derive(Debug)]
pub struct LockedAccount {
    pub id: AccountId,
    pub balance: i64,
    pub daily_limit: Option<i64>,
    /// What left it by transfer so far on the current UTC day (every
    /// account keeps this, limited or not: a limit may be set at any time).
    pub spent_today: i64,
}
