//! Enqueueing transfers: one at a time inside any executor (so a producer can
//! enqueue inside its own transaction), or in bulk from JSON lines.
//!
//! A SQL producer needs none of this: `INSERT INTO transfers (idempotency_key,
//! from_account, to_account, amount) VALUES (...)` is enough, and the schema
//! rejects bad rows. This module adds idempotency with a clear answer: the same
//! key with the same parameters returns the existing transfer (`created:
//! false`), with other parameters it is refused (exit 3) and nothing is written.
//!
//! # Example
//!
//! ```rust,ignore
//! let t = NewTransfer::new(AccountId(1), AccountId(2), Amount::new(250)?, Some(IdempotencyKey::new("order-42")?))?
//!     .with_guard(Some(Guard::new("user-1:purchase")?)); // refused while another request holds it
//! let e = enqueue(&pool, &t).await?;
//! assert!(e.created); // the same key and parameters again: created == false, same id
//! ```

use std::collections::{HashMap, HashSet};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::{Acquire, PgConnection, Postgres};

use crate::account::AccountId;
use crate::concurrency::advisory::Guard;
use crate::db;
use crate::error::{Error, Refusal, Result};
use crate::transfer::{limits, Amount, IdempotencyKey, TraceParent, TransferId, TransferStatus};

/// A transfer to enqueue, with typed, already-validated values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransfer {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    /// `None` generates a fresh key (`auto-<random hex>`): no idempotency.
    pub key: Option<IdempotencyKey>,
    /// The producer's trace context, carried by every event of the transfer.
    pub traceparent: Option<TraceParent>,
    /// A duplicate-request guard held for the enqueue's transaction: while
    /// another request holds it, this one is refused at once (see [`Guard`]).
    pub guard: Option<Guard>,
}

impl NewTransfer {
    /// Validates what the types alone cannot: the two accounts differ.
    pub fn new(from: AccountId, to: AccountId, amount: Amount, key: Option<IdempotencyKey>) -> Result<Self> {
        if from == to {
            return Err(Error::invalid(format!("from and to must be different accounts, both are {from}")));
        }
        Ok(NewTransfer { from, to, amount, key, traceparent: None, guard: None })
    }

    /// Attaches the producer's W3C trace context: the events published for
    /// this transfer carry it (SQS message attribute `traceparent`).
    pub fn with_traceparent(mut self, traceparent: Option<TraceParent>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// Enqueues under a duplicate-request guard: refused (exit 3, nothing
    /// written) while another transaction holds it. Inside a producer's own
    /// transaction the guard is held until that transaction ends.
    pub fn with_guard(mut self, guard: Option<Guard>) -> Self {
        self.guard = guard;
        self
    }

    fn key_or_generated(&self) -> String {
        match &self.key {
            Some(k) => k.as_str().to_owned(),
            None => format!("auto-{:032x}", rand::thread_rng().gen::<u128>()),
        }
    }
}

/// What `enqueue` printed and returns: the contract's JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub transfer_id: TransferId,
    pub status: TransferStatus,
    pub created: bool,
}

// `ON CONFLICT DO UPDATE ... WHERE <same parameters>` instead of `DO NOTHING`:
// it returns the existing row even when another transaction committed it after
// this statement's snapshot was taken (DO NOTHING + SELECT would miss it), and
// its WHERE makes a key reused with other parameters return no row, so that
// case is detected without writing anything. `xmax = 0` is true only for a
// freshly inserted row. (The statement is in `insert` below.)

/// Enqueues one transfer, with a pool, a connection, or the producer's own
/// open transaction (`&mut *tx` or `&mut tx`: then workers see the transfer
/// only after the producer commits, and a rollback leaves nothing).
///
/// It takes [`Acquire`] rather than a bare executor because a source account
/// with a daily limit needs two statements (serialize, then check and insert);
/// inside a producer's transaction it runs in a savepoint.
pub async fn enqueue<'a, A>(db: A, transfer: &NewTransfer) -> Result<Enqueued>
where
    A: Acquire<'a, Database = Postgres>,
{
    let mut tx = db.begin().await?;
    if let Some(guard) = &transfer.guard {
        if let Err(refused) = guard.take(&mut tx).await {
            tx.rollback().await?;
            return Err(refused);
        }
    }
    let item = Item { line: None, transfer, key: transfer.key_or_generated() };
    // Roll back explicitly on error: a refused key holds a row lock (ON
    // CONFLICT DO UPDATE locks the row even when its WHERE is false) that must
    // go now, not whenever the dropped transaction's connection is next used.
    match insert(&mut tx, std::slice::from_ref(&item)).await {
        Ok(mut out) => {
            tx.commit().await?;
            Ok(out.remove(0))
        }
        Err(e) => {
            tx.rollback().await?;
            Err(constraint_error(e, transfer))
        }
    }
}

/// One transfer to insert, with its key decided and, in a file, its line.
struct Item<'t> {
    line: Option<usize>,
    transfer: &'t NewTransfer,
    key: String,
}

/// How many rows one INSERT carries.
const INSERT_CHUNK: usize = 1000;

/// Checks daily limits, then inserts (idempotently) every item, whose keys
/// must be distinct. Any item that cannot be accepted fails the whole call.
///
/// A key whose transfer was pruned is still known (`retired_keys`): the same
/// parameters get the original answer (its id and final status, `created:
/// false`), others a refusal. Nothing is inserted for it: that would be a
/// second payment for a retry that came late.
async fn insert(conn: &mut PgConnection, items: &[Item<'_>]) -> Result<Vec<Enqueued>> {
    let retired = retired(conn, items).await?;
    check_daily_limits(conn, items, &retired).await?;
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(INSERT_CHUNK) {
        let fresh: Vec<&Item<'_>> = chunk.iter().filter(|i| !retired.contains_key(&i.key)).collect();
        let keys: Vec<String> = fresh.iter().map(|i| i.key.clone()).collect();
        let from: Vec<i64> = fresh.iter().map(|i| i.transfer.from.0).collect();
        let to: Vec<i64> = fresh.iter().map(|i| i.transfer.to.0).collect();
        let amounts: Vec<i64> = fresh.iter().map(|i| i.transfer.amount.get()).collect();
        let traceparents: Vec<Option<String>> =
            fresh.iter().map(|i| i.transfer.traceparent.as_ref().map(|t| t.as_str().to_owned())).collect();
        let rows = if fresh.is_empty() {
            Vec::new()
        } else {
            sqlx::query!(
                r#"INSERT INTO transfers AS t (idempotency_key, from_account, to_account, amount, traceparent)
                   SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
                   ON CONFLICT (idempotency_key) DO UPDATE
                       SET idempotency_key = EXCLUDED.idempotency_key
                       WHERE t.from_account = EXCLUDED.from_account
                         AND t.to_account = EXCLUDED.to_account
                         AND t.amount = EXCLUDED.amount
                   RETURNING t.idempotency_key, t.id, t.status AS "status: TransferStatus", (t.xmax = 0) AS "created!""#,
                &keys,
                &from,
                &to,
                &amounts,
                &traceparents as &[Option<String>]
            )
            .fetch_all(&mut *conn)
            .await?
        };
        let mut by_key: HashMap<String, Enqueued> = rows
            .into_iter()
            .map(|r| {
                (r.idempotency_key, Enqueued { transfer_id: TransferId(r.id), status: r.status, created: r.created })
            })
            .collect();
        for item in chunk {
            if let Some(r) = retired.get(&item.key) {
                if !r.same_as(item.transfer) {
                    return Err(
                        Refusal::KeyRetired { key: item.key.clone(), transfer: r.transfer, line: item.line }.into()
                    );
                }
                out.push(Enqueued { transfer_id: r.transfer, status: r.status, created: false });
                continue;
            }
            match by_key.remove(&item.key) {
                Some(e) => out.push(e),
                None => return Err(Refusal::KeyReused { key: item.key.clone(), line: item.line }.into()),
            }
        }
    }
    Ok(out)
}

/// What is kept of a pruned transfer to recognise its key.
struct RetiredKey {
    transfer: TransferId,
    from: i64,
    to: i64,
    amount: i64,
    status: TransferStatus,
}

impl RetiredKey {
    fn same_as(&self, t: &NewTransfer) -> bool {
        (self.from, self.to, self.amount) == (t.from.0, t.to.0, t.amount.get())
    }
}

/// The items whose keys belonged to transfers since pruned.
async fn retired(conn: &mut PgConnection, items: &[Item<'_>]) -> Result<HashMap<String, RetiredKey>> {
    let keys: Vec<String> = items.iter().map(|i| i.key.clone()).collect();
    Ok(sqlx::query!(
        r#"SELECT idempotency_key, transfer_id, from_account, to_account, amount, status AS "status: TransferStatus"
             FROM retired_keys WHERE idempotency_key = ANY($1)"#,
        &keys
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        let key = RetiredKey {
            transfer: TransferId(r.transfer_id),
            from: r.from_account,
            to: r.to_account,
            amount: r.amount,
            status: r.status,
        };
        (r.idempotency_key, key)
    })
    .collect())
}

/// Refuses (exit 3) any item that would take its source account's transfers
/// accepted on this UTC day above the account's `daily_limit`.
///
/// Accepted means sent today or still PENDING (see [`limits`]). Concurrent enqueues from one limited
/// account are serialized by a transaction-scoped advisory lock on a hashed
/// string key (`transfer-worker:daily-limit:<account>`), taken in account
/// order, so two producers cannot both fit under the limit with the same
/// headroom. The lock, unlike a row lock on the account, never blocks a
/// worker moving that account's money. Accounts without a limit take no lock.
async fn check_daily_limits(
    conn: &mut PgConnection,
    items: &[Item<'_>],
    retired: &HashMap<String, RetiredKey>,
) -> Result<()> {
    let mut from: Vec<i64> = items.iter().map(|i| i.transfer.from.0).collect();
    from.sort_unstable();
    from.dedup();
    let limits = limits::limits_of(conn, &from).await?;
    if limits.is_empty() {
        return Ok(());
    }
    let mut limited: Vec<i64> = limits.keys().copied().collect();
    limited.sort_unstable();
    limits::serialize_enqueues(conn, &limited).await?;
    // Read after the locks: a fresh snapshot sees every accepted transfer.
    let mut used = limits::accepted_today(conn, &limited).await?;
    // A key that already exists is a repeat, not a new acceptance.
    let keys: Vec<String> = items.iter().map(|i| i.key.clone()).collect();
    let existing: HashSet<String> =
        sqlx::query_scalar!("SELECT idempotency_key FROM transfers WHERE idempotency_key = ANY($1)", &keys)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    for item in items {
        let account = item.transfer.from.0;
        let Some(&limit) = limits.get(&account) else {
            continue;
        };
        if existing.contains(&item.key) || retired.contains_key(&item.key) {
            continue;
        }
        let before = used.get(&account).copied().unwrap_or(0);
        let after = before.saturating_add(item.transfer.amount.get());
        if after > limit {
            return Err(Refusal::DailyLimit {
                account: AccountId(account),
                accepted: before,
                amount: item.transfer.amount,
                limit,
                line: item.line,
            }
            .into());
        }
        used.insert(account, after);
    }
    Ok(())
}

fn constraint_error(e: Error, transfer: &NewTransfer) -> Error {
    let Some(db_err) = e.sql() else {
        return e;
    };
    match db::violated_constraint(db_err) {
        Some("transfers_from_account_fkey") => Error::NotFound { what: "account", id: transfer.from.0 },
        Some("transfers_to_account_fkey") => Error::NotFound { what: "account", id: transfer.to.0 },
        // A key retired between our look-up and the insert (a prune running
        // at that moment): still never a second transfer.
        Some("transfers_idempotency_key_retired") => Error::Refused(Refusal::KeyReused {
            key: transfer.key.as_ref().map(|k| k.as_str().to_owned()).unwrap_or_default(),
            line: None,
        }),
        Some("transfers_distinct_accounts") => {
            Error::invalid(format!("from and to must be different accounts, both are {}", transfer.from))
        }
        _ => e,
    }
}

/// One line of a bulk file: `{"from":..,"to":..,"amount":..,"key":..}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkLine {
    from: i64,
    to: i64,
    amount: i64,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    traceparent: Option<String>,
}

/// Parses JSON lines into transfers. Blank lines are skipped; any bad line
/// rejects the whole input, naming the line (1-based) and what is wrong.
pub fn parse_bulk(input: &str) -> Result<Vec<(usize, NewTransfer)>> {
    let mut out = Vec::new();
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::invalid(format!("line {line_no}: {msg}; nothing enqueued"));
        let raw: BulkLine =
            serde_json::from_str(line).map_err(|e| bad(format!("not a valid transfer object ({e})")))?;
        let amount = Amount::new(raw.amount).map_err(bad)?;
        let key = raw.key.map(IdempotencyKey::new).transpose().map_err(bad)?;
        let traceparent = raw.traceparent.as_deref().map(TraceParent::new).transpose().map_err(bad)?;
        let t = NewTransfer::new(AccountId(raw.from), AccountId(raw.to), amount, key)
            .map_err(|e| bad(e.to_string()))?
            .with_traceparent(traceparent);
        if let Some(k) = &t.key {
            // The same key twice in one file: the same transfer, or an error.
            if let Some(&earlier) = keys.get(k.as_str()) {
                let (first_line, first) = &out[earlier];
                if first != &t {
                    return Err(Refusal::KeyRepeatedInFile {
                        key: k.as_str().to_owned(),
                        line: line_no,
                        first_line: *first_line,
                    }
                    .into());
                }
            } else {
                keys.insert(k.as_str().to_owned(), out.len());
            }
        }
        out.push((line_no, t));
    }
    if out.is_empty() {
        return Err(Error::invalid("the input has no transfers (expected JSON lines)"));
    }
    Ok(out)
}

/// Enqueues every line, all or nothing, inside the caller's transaction
/// (`conn` is typically `&mut *tx`): an unknown account or a reused key on any
/// line is an error naming that line, and the caller rolls back. Returns one
/// result per line, in input order.
pub async fn enqueue_bulk(conn: &mut PgConnection, lines: &[(usize, NewTransfer)]) -> Result<Vec<Enqueued>> {
    // Unknown accounts are found up front, in one query, so the error can
    // name the line instead of a foreign-key constraint.
    let ids: Vec<i64> =
        lines.iter().flat_map(|(_, t)| [t.from.0, t.to.0]).collect::<HashSet<_>>().into_iter().collect();
    let existing: HashSet<i64> = sqlx::query_scalar!("SELECT id FROM accounts WHERE id = ANY($1)", &ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    for (line_no, t) in lines {
        for id in [t.from, t.to] {
            if !existing.contains(&id.0) {
                return Err(Error::invalid(format!("line {line_no}: account {id} does not exist; nothing enqueued")));
            }
        }
    }

    // A key repeated in the file (same parameters, checked by parse_bulk) is
    // inserted once, and its repeats report created: false.
    let keys: Vec<String> = lines.iter().map(|(_, t)| t.key_or_generated()).collect();
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    let mut items = Vec::with_capacity(lines.len());
    for (i, (line, transfer)) in lines.iter().enumerate() {
        if *first_index.entry(keys[i].as_str()).or_insert(i) == i {
            items.push(Item { line: Some(*line), transfer, key: keys[i].clone() });
        }
    }
    let inserted = insert(conn, &items).await?;
    let by_key: HashMap<&str, &Enqueued> = items.iter().map(|i| i.key.as_str()).zip(&inserted).collect();
    Ok(keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut e = by_key[k.as_str()].clone();
            e.created &= first_index[k.as_str()] == i;
            e
        })
        .collect())
}
