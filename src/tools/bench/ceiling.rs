//! The PostgreSQL ceiling for the apply shape, measured in the same run as
//! the benchmark it is compared with: the leanest transaction that does what
//! one apply batch does (claim 100 PENDING rows with SKIP LOCKED, lock their
//! accounts in id order, move the money set-based, mark the rows SUCCEEDED,
//! insert one outbox row each), on minimal tables of its own, from the same
//! number of connections. The same statements as the shape pgbench runs in
//! the team's reference script; here they run from Rust so that the project
//! needs nothing outside itself.
//!
//! Runtime queries: its tables exist only while it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::task::JoinSet;

use transfer_worker::error::{Error, Result};

const SETUP: &str = "
DROP TABLE IF EXISTS c_accounts, c_transfers, c_outbox;
CREATE TABLE c_accounts (id bigint primary key, balance bigint not null);
CREATE TABLE c_transfers (id bigserial primary key, from_id bigint, to_id bigint, amount bigint, status text not null default 'PENDING');
CREATE INDEX ON c_transfers (id) WHERE status = 'PENDING';
CREATE TABLE c_outbox (id bigserial primary key, payload jsonb, published_at timestamptz);
INSERT INTO c_accounts SELECT g, 1000000000 FROM generate_series(1, 1000) g;
INSERT INTO c_transfers (from_id, to_id, amount) SELECT 1 + (g % 1000), 1 + ((g * 7 + 3) % 1000), 1 FROM generate_series(1, 400000) g;
";

const CLAIM: &str = "SELECT COALESCE(array_agg(id ORDER BY id), '{}'), COALESCE(array_agg(from_id ORDER BY id), '{}'),
        COALESCE(array_agg(to_id ORDER BY id), '{}'), COALESCE(array_agg(amount ORDER BY id), '{}')
   FROM (SELECT id, from_id, to_id, amount FROM c_transfers WHERE status = 'PENDING'
          ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) c";
const LOCK: &str =
    "SELECT count(*) FROM (SELECT id FROM c_accounts WHERE id = ANY($1::bigint[] || $2::bigint[]) ORDER BY id FOR UPDATE) l";
const MOVE: &str = "UPDATE c_accounts a SET balance = a.balance + d.delta
   FROM (SELECT acct, sum(delta) AS delta FROM (SELECT f AS acct, -amt AS delta FROM unnest($1::bigint[], $3::bigint[]) AS x(f, amt)
         UNION ALL SELECT t, amt FROM unnest($2::bigint[], $3::bigint[]) AS y(t, amt)) z GROUP BY acct) d
  WHERE a.id = d.acct";
const MARK: &str = "UPDATE c_transfers SET status = 'SUCCEEDED' WHERE id = ANY($1::bigint[]) AND status = 'PENDING'";
const EVENTS: &str = "INSERT INTO c_outbox (payload)
   SELECT jsonb_build_object('type', 'transfer.succeeded', 'transfer_id', i, 'from', f, 'to', t, 'amount', a)
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS x(i, f, t, a)";

/// Runs the shape from `clients` connections for `seconds`; transfers/s.
pub async fn measure(pool: &PgPool, clients: usize, seconds: f64) -> Result<f64> {
    sqlx::raw_sql(SETUP).execute(pool).await?;
    sqlx::query("VACUUM ANALYZE c_accounts, c_transfers, c_outbox").execute(pool).await?;
    let moved = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (pool, moved) = (pool.clone(), moved.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                let mut tx = pool.begin().await?;
                let (ids, fs, ts, amts): (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>) =
                    sqlx::query_as(CLAIM).fetch_one(&mut *tx).await?;
                sqlx::query(LOCK).bind(&fs).bind(&ts).execute(&mut *tx).await?;
                sqlx::query(MOVE).bind(&fs).bind(&ts).bind(&amts).execute(&mut *tx).await?;
                sqlx::query(MARK).bind(&ids).execute(&mut *tx).await?;
                sqlx::query(EVENTS).bind(&ids).bind(&fs).bind(&ts).bind(&amts).execute(&mut *tx).await?;
                tx.commit().await?;
                moved.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            Ok::<(), Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| Error::Failed(format!("ceiling task failed: {e}")))??;
    }
    let rate = moved.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE c_accounts, c_transfers, c_outbox").execute(pool).await?;
    Ok(rate)
}
