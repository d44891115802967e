//! The admin server of `run`, as a prober and a scraper see it: prompt
//! answers whatever PostgreSQL does, cheap metrics, and no way to hurt the
//! worker by connecting to it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use transfer_worker::service::Service;
use transfer_worker::transfer::TransferStatus;

use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

/// A free local port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request on a fresh connection; (status, body), or None if
/// the server could not be reached.
pub async fn http(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_answers_probes_and_metrics() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &addr]));
    wait_for("the admin server", Duration::from_secs(20), || async { http(&addr, "GET", "/livez").await.is_some() })
        .await;
    for path in ["/livez", "/readyz", "/healthz"] {
        let (code, body) = http(&addr, "GET", path).await.unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (_, ready) = http(&addr, "GET", "/readyz").await.unwrap();
    assert!(ready.contains("database: ok"), "{ready}");
    assert!(ready.contains("GetQueueAttributes"), "says whether the queue answered: {ready}");
    let (code, metrics) = http(&addr, "GET", "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("transfer_worker_transfers{status=\"PENDING\"} 0"), "{metrics}");
    assert!(metrics.contains("transfer_worker_outbox_events{state=\"dead\"} 0"), "{metrics}");
    assert!(metrics.contains("# HELP transfer_worker_oldest_unpublished_age_seconds"), "{metrics}");
    assert_eq!(http(&addr, "GET", "/nope").await.unwrap().0, 404);
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

/// A TCP proxy in front of PostgreSQL that a test can switch off: to make
/// the database unreachable for one worker without touching the others.
struct PgProxy {
    port: u16,
    mode: Arc<AtomicU8>,
    /// Cancelled to cut every forwarded connection.
    cut: std::sync::Mutex<CancellationToken>,
}

const FORWARD: u8 = 0;
const REFUSE: u8 = 1;
const BLACK_HOLE: u8 = 2;

impl PgProxy {
    async fn start(target: String) -> Arc<PgProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(PgProxy {
            port: listener.local_addr().unwrap().port(),
            mode: Arc::new(AtomicU8::new(FORWARD)),
            cut: std::sync::Mutex::new(CancellationToken::new()),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                match p.mode.load(Ordering::SeqCst) {
                    REFUSE => drop(client),
                    BLACK_HOLE => held.push(client),
                    _ => {
                        let cut = p.cut.lock().unwrap().clone();
                        let target = target.clone();
                        tokio::spawn(async move {
                            let Ok(mut server) = TcpStream::connect(&target).await else { return };
                            tokio::select! {
                                _ = cut.cancelled() => {}
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            }
                        });
                    }
                }
            }
        });
        proxy
    }

    /// Switches mode and cuts the connections forwarded so far.
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_within_a_second_while_postgres_is_down_and_200_once_it_is_back() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let (host_port, rest) = {
        let after_scheme = db.url.split_once("@").unwrap().1;
        let (hp, rest) = after_scheme.split_once('/').unwrap();
        (hp.to_string(), rest.to_string())
    };
    let proxy = PgProxy::start(host_port).await;
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/{rest}", proxy.port);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = db.worker_command(&queue.url, &["--admin-addr", &addr]);
    cmd.env("DATABASE_URL", &via_proxy);
    let mut w = KillOnDrop(cmd.spawn().unwrap());
    wait_for("ready", Duration::from_secs(20), || async {
        http(&addr, "GET", "/readyz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;

    for (mode, what) in [(BLACK_HOLE, "a database that never answers"), (REFUSE, "a database that refuses")] {
        proxy.set(mode);
        // Probes within READINESS_TTL share the check made before.
        tokio::time::sleep(transfer_worker::admin::READINESS_TTL).await;
        for _ in 0..3 {
            let asked = Instant::now();
            let (code, body) = http(&addr, "GET", "/readyz").await.unwrap();
            let took = asked.elapsed();
            assert_eq!(code, 503, "{what}: {body}");
            assert!(body.contains("database:"), "{body}");
            assert!(took < Duration::from_millis(1_200), "{what}: answered in {took:?}");
        }
        // Liveness is not readiness: the process is fine.
        assert_eq!(http(&addr, "GET", "/livez").await.unwrap().0, 200);
    }
    proxy.set(FORWARD);
    wait_for("ready again", Duration::from_secs(20), || async {
        http(&addr, "GET", "/readyz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_make_the_admin_server_spin() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &addr]));
    let pid = w.0.id();
    wait_for("ready", Duration::from_secs(20), || async {
        http(&addr, "GET", "/readyz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    // Leave the worker a few spare descriptors, then use them up from outside.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = (open + 2).to_string();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .unwrap();
    assert!(status.success());
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(used < 60, "the worker used {used} ticks of CPU in 2 s while it could not accept (spinning?)");

    drop(clients);
    let limit = "65536";
    std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .unwrap();
    wait_for("the admin server to answer again", Duration::from_secs(20), || async {
        http(&addr, "GET", "/livez").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    assert!(w.0.try_wait().unwrap().is_none(), "the worker is still up");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn status_reads_no_table_in_full_and_its_counts_are_exact() {
    let db = TestDb::new().await;
    crate::fixtures::seed_random(&db.pool, 50, 1_000_000, 20_000, 1_000, 5).await.unwrap();
    let applier = transfer_worker::transfer::apply::Applier::new(
        db.pool.clone(),
        transfer_worker::transfer::apply::ApplyConfig { batch_size: 1_000, ..Default::default() },
    );
    applier.drain().await.unwrap();
    sqlx::query("UPDATE outbox SET state = 'published', published_at = now() WHERE id % 3 = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox SET state = 'dead' WHERE id IN (1, 2)").execute(&db.pool).await.unwrap();
    sqlx::query("ANALYZE").execute(&db.pool).await.unwrap();

    // One connection, so its statistics can be flushed and read back.
    let one = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url).await.unwrap();
    let scans = |pool: sqlx::PgPool| async move {
        sqlx::query("SELECT pg_stat_force_next_flush()").execute(&pool).await.unwrap();
        sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&pool).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT relname::text, COALESCE(seq_scan, 0) FROM pg_stat_user_tables WHERE relname IN ('transfers', 'outbox') ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows
    };
    transfer_worker::status::compact_counts(&one).await.unwrap();
    let before = scans(one.clone()).await;
    let status = transfer_worker::status::read(&one).await.unwrap();
    let after = scans(one.clone()).await;
    assert_eq!(before, after, "no sequential scan of transfers or outbox");

    let count = |sql: &'static str| db.scalar(sql);
    assert_eq!(
        status.transfers[&TransferStatus::Succeeded],
        count("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await
    );
    assert_eq!(
        status.transfers[&TransferStatus::Failed],
        count("SELECT count(*) FROM transfers WHERE status = 'FAILED'").await
    );
    assert_eq!(status.transfers[&TransferStatus::Pending], 0);
    assert_eq!(status.outbox.published, count("SELECT count(*) FROM outbox WHERE state = 'published'").await);
    assert_eq!(status.outbox.dead, 2);
    assert_eq!(
        status.outbox.pending + status.outbox.held,
        count("SELECT count(*) FROM outbox WHERE state = 'pending'").await
    );
}

/// A client that sends its request at one byte every `every`, reconnecting
/// whenever the server closes it, until `stop`.
async fn dribble(addr: String, request: &'static [u8], every: Duration, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(mut s) = TcpStream::connect(&addr).await else {
            tokio::time::sleep(every).await;
            continue;
        };
        for b in request.iter().cycle() {
            if stop.is_cancelled() || s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// The slowloris of the issue and its cousins, all at once against one
/// worker: 150 connections that dribble a request head a byte at a time,
/// 40 that dribble a POST body, and 16 clients reading the console as fast as
/// they can. `/livez` and `/readyz` answer 200 within a second every time,
/// and a dribbled head is cut after HEAD_TIMEOUT however steadily it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_within_a_second_whatever_other_clients_of_the_port_do() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &addr]));
    wait_for("ready", Duration::from_secs(20), || async {
        http(&addr, "GET", "/readyz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;

    let stop = CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..150 {
        let head: &'static [u8] =
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        load.spawn(dribble(addr.clone(), head, Duration::from_millis(500), stop.clone()));
    }
    for _ in 0..40 {
        let body: &'static [u8] =
            b"POST /requeue-all HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nevent=1&event=1&event=1&";
        load.spawn(dribble(addr.clone(), body, Duration::from_millis(50), stop.clone()));
    }
    for _ in 0..16 {
        let (addr, stop) = (addr.clone(), stop.clone());
        load.spawn(async move {
            while !stop.is_cancelled() {
                let _ = http(&addr, "GET", "/").await;
            }
        });
    }
    // Long enough for every dribbler to hold a connection past HEAD_TIMEOUT.
    tokio::time::sleep(transfer_worker::admin::HEAD_TIMEOUT + Duration::from_secs(1)).await;
    let mut slowest = Duration::ZERO;
    for round in 0..15 {
        for path in ["/livez", "/readyz"] {
            let started = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(5), http(&addr, "GET", path)).await;
            let took = started.elapsed();
            slowest = slowest.max(took);
            let (code, body) = answer.unwrap_or_else(|_| panic!("round {round}: {path} unanswered after 5 s")).unwrap();
            assert_eq!(code, 200, "round {round}: {path}: {body}");
            assert!(took < Duration::from_secs(1), "round {round}: {path} took {took:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A head that keeps coming, a byte at a time, is cut at its deadline.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let cut = loop {
        if slow.write_all(b"a").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(10), "a dribbled head was never cut");
    };
    assert!(cut < transfer_worker::admin::HEAD_TIMEOUT + Duration::from_secs(2), "cut after {cut:?}");
    stop.cancel();
    load.abort_all();
    eprintln!("slowest probe under load: {slowest:?}");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}
