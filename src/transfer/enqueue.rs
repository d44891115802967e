//! Enqueueing transfers: one at a time inside any executor (so a producer can
//! enqueue inside its own transaction), or in bulk from JSON lines.
//!
//! A SQL producer needs none of this: `INSERT INTO transfers (idempotency_key,
//! from_account, to_account, amount) VALUES (...)` is enough, and the schema
//! rejects bad rows. This module adds idempotency with a clear answer: the same
//! key with the same parameters returns the existing transfer (`created:
//! false`), with other parameters it is refused (exit 3) and nothing is written.

use std::collections::{HashMap, HashSet};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor};

use crate::account::AccountId;
use crate::db;
use crate::error::{Error, Result};
use crate::transfer::{Amount, IdempotencyKey, TransferId};

/// A transfer to enqueue, with typed, already-validated values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransfer {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    /// `None` generates a fresh key (`auto-<random hex>`): no idempotency.
    pub key: Option<IdempotencyKey>,
}

impl NewTransfer {
    /// Validates what the types alone cannot: the two accounts differ.
    pub fn new(
        from: AccountId,
        to: AccountId,
        amount: Amount,
        key: Option<IdempotencyKey>,
    ) -> Result<Self> {
        if from == to {
            return Err(Error::invalid(format!(
                "from and to must be different accounts, both are {from}"
            )));
        }
        Ok(NewTransfer {
            from,
            to,
            amount,
            key,
        })
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
    pub status: String,
    pub created: bool,
}

// `ON CONFLICT DO UPDATE ... WHERE <same parameters>` instead of `DO NOTHING`:
// it returns the existing row even when another transaction committed it after
// this statement's snapshot was taken (DO NOTHING + SELECT would miss it), and
// its WHERE makes a key reused with other parameters return no row, so that
// case is detected without writing anything. `xmax = 0` is true only for a
// freshly inserted row.
const ENQUEUE_SQL: &str = "
    INSERT INTO transfers AS t (idempotency_key, from_account, to_account, amount)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
    ON CONFLICT (idempotency_key) DO UPDATE
        SET idempotency_key = EXCLUDED.idempotency_key
        WHERE t.from_account = EXCLUDED.from_account
          AND t.to_account = EXCLUDED.to_account
          AND t.amount = EXCLUDED.amount
    RETURNING t.idempotency_key, t.id, t.status, (t.xmax = 0) AS created";

#[derive(sqlx::FromRow)]
struct EnqueuedRow {
    idempotency_key: String,
    id: i64,
    status: String,
    created: bool,
}

/// Enqueues one transfer with any executor: a pool, a connection, or the
/// producer's own open transaction (then workers see it only after commit).
pub async fn enqueue<'e>(db: impl PgExecutor<'e>, transfer: &NewTransfer) -> Result<Enqueued> {
    let key = transfer.key_or_generated();
    let rows = sqlx::query_as::<_, EnqueuedRow>(ENQUEUE_SQL)
        .bind(vec![key.clone()])
        .bind(vec![transfer.from.0])
        .bind(vec![transfer.to.0])
        .bind(vec![transfer.amount.get()])
        .fetch_all(db)
        .await
        .map_err(|e| constraint_error(e, transfer))?;
    match rows.into_iter().next() {
        Some(row) => Ok(Enqueued {
            transfer_id: TransferId(row.id),
            status: row.status,
            created: row.created,
        }),
        None => Err(key_reused(&key)),
    }
}

fn key_reused(key: &str) -> Error {
    Error::not_applied(format!(
        "idempotency key {key:?} was already used for a transfer with other parameters; nothing enqueued"
    ))
}

fn constraint_error(e: sqlx::Error, transfer: &NewTransfer) -> Error {
    match db::violated_constraint(&e) {
        Some("transfers_from_account_fkey") => Error::NotFound {
            what: "account",
            id: transfer.from.0,
        },
        Some("transfers_to_account_fkey") => Error::NotFound {
            what: "account",
            id: transfer.to.0,
        },
        Some("transfers_distinct_accounts") => Error::invalid(format!(
            "from and to must be different accounts, both are {}",
            transfer.from
        )),
        _ => e.into(),
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
        let raw: BulkLine = serde_json::from_str(line)
            .map_err(|e| bad(format!("not a valid transfer object ({e})")))?;
        let amount = Amount::new(raw.amount).map_err(bad)?;
        let key = raw.key.map(IdempotencyKey::new).transpose().map_err(bad)?;
        let t = NewTransfer::new(AccountId(raw.from), AccountId(raw.to), amount, key)
            .map_err(|e| bad(e.to_string()))?;
        if let Some(k) = &t.key {
            // The same key twice in one file: the same transfer, or an error.
            if let Some(&earlier) = keys.get(k.as_str()) {
                let (first_line, first) = &out[earlier];
                if first != &t {
                    return Err(Error::not_applied(format!(
                        "line {line_no}: idempotency key {:?} is used on line {first_line} with other parameters; nothing enqueued",
                        k.as_str()
                    )));
                }
            } else {
                keys.insert(k.as_str().to_owned(), out.len());
            }
        }
        out.push((line_no, t));
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "the input has no transfers (expected JSON lines)",
        ));
    }
    Ok(out)
}

/// How many rows one bulk INSERT carries.
const BULK_CHUNK: usize = 1000;

/// Enqueues every line, all or nothing, inside the caller's transaction
/// (`conn` is typically `&mut *tx`): an unknown account or a reused key on any
/// line is an error naming that line, and the caller rolls back. Returns one
/// result per line, in input order.
pub async fn enqueue_bulk(
    conn: &mut PgConnection,
    lines: &[(usize, NewTransfer)],
) -> Result<Vec<Enqueued>> {
    // Unknown accounts are found up front, in one query, so the error can
    // name the line instead of a foreign-key constraint.
    let ids: Vec<i64> = lines
        .iter()
        .flat_map(|(_, t)| [t.from.0, t.to.0])
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let existing: HashSet<i64> =
        sqlx::query_scalar::<_, i64>("SELECT id FROM accounts WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    for (line_no, t) in lines {
        for id in [t.from, t.to] {
            if !existing.contains(&id.0) {
                return Err(Error::invalid(format!(
                    "line {line_no}: account {id} does not exist; nothing enqueued"
                )));
            }
        }
    }

    let keys: Vec<String> = lines.iter().map(|(_, t)| t.key_or_generated()).collect();
    // A key repeated in the file (same parameters, checked by parse_bulk) is
    // inserted once: one INSERT may not touch the same row twice.
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    let unique: Vec<usize> = (0..lines.len())
        .filter(|&i| *first_index.entry(keys[i].as_str()).or_insert(i) == i)
        .collect();
    let mut results: HashMap<String, Enqueued> = HashMap::with_capacity(unique.len());
    for chunk in unique.chunks(BULK_CHUNK) {
        let rows = sqlx::query_as::<_, EnqueuedRow>(ENQUEUE_SQL)
            .bind(chunk.iter().map(|&i| keys[i].clone()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|&i| lines[i].1.from.0).collect::<Vec<_>>())
            .bind(chunk.iter().map(|&i| lines[i].1.to.0).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|&i| lines[i].1.amount.get())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *conn)
            .await?;
        for row in rows {
            let e = Enqueued {
                transfer_id: TransferId(row.id),
                status: row.status,
                created: row.created,
            };
            results.insert(row.idempotency_key, e);
        }
        if let Some(&missing) = chunk.iter().find(|&&i| !results.contains_key(&keys[i])) {
            let (line_no, _) = &lines[missing];
            return Err(Error::not_applied(format!(
                "line {line_no}: {}",
                key_reused(&keys[missing])
            )));
        }
    }
    Ok(keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut e = results[k].clone();
            // A repeat of a key earlier in the same file did not create anything.
            if first_index[k.as_str()] != i {
                e.created = false;
            }
            e
        })
        .collect())
}
