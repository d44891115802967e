//! `lab` and `bench`: their JSON is the contract's, their numbers add up.

use crate::helpers::TestDb;

#[tokio::test]
async fn lab_with_more_workers_reports_every_strategy_and_only_naive_loses_updates() {
    let db = TestDb::new().await;
    let out = db.cli(&["lab", "--workers", "6", "--increments", "40", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    let strategies = v["strategies"].as_array().unwrap();
    let names: Vec<&str> = strategies.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["naive", "atomic", "for_update", "optimistic", "advisory", "serializable"]);
    for s in strategies {
        let (expected, actual, lost) =
            (s["expected"].as_i64().unwrap(), s["actual"].as_i64().unwrap(), s["lost"].as_i64().unwrap());
        assert_eq!(expected, 240);
        assert_eq!(lost, expected - actual, "{s}");
        assert!(s["elapsed_ms"].as_f64().unwrap() > 0.0 && s["ops_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["retries"].as_u64().is_some(), "{s}");
        if s["name"] != "naive" {
            assert_eq!(actual, expected, "{} must not lose updates", s["name"]);
        }
    }
    // Six tasks doing read-then-write on one row over the network: some
    // increments are overwritten (the point of the experiment).
    assert!(strategies[0]["lost"].as_i64().unwrap() > 0, "naive lost nothing: {}", strategies[0]);
    let bad = db.cli(&["lab", "--workers", "0"]).await;
    assert_eq!(bad.code, 2);
}

#[tokio::test]
async fn bench_reports_rates_latency_and_invariants_for_each_mode() {
    let db = TestDb::new().await;
    for mode in ["apply", "relay", "both"] {
        let out = db
            .cli(&["bench", "--transfers", "600", "--accounts", "30", "--workers", "3", "--mode", mode, "--json"])
            .await;
        assert_eq!(out.code, 0, "{mode}: {out:?}");
        let v = out.json();
        assert_eq!(v["invariants_ok"], true, "{mode}: {v}");
        assert_eq!(v["transfers"], 600);
        let rate = |k: &str| v[k].as_f64();
        match mode {
            "apply" => assert!(rate("applied_per_s").unwrap() > 0.0 && rate("published_per_s") == Some(0.0)),
            "relay" => assert!(rate("published_per_s").unwrap() > 0.0 && rate("applied_per_s") == Some(0.0)),
            _ => assert!(rate("applied_per_s").unwrap() > 0.0 && rate("published_per_s").unwrap() > 0.0),
        }
        let l = &v["latency_ms"];
        let (p50, p95, p99) = (l["p50"].as_f64().unwrap(), l["p95"].as_f64().unwrap(), l["p99"].as_f64().unwrap());
        assert!(0.0 <= p50 && p50 <= p95 && p95 <= p99, "{mode}: {l}");
    }
    let out = db.cli(&["bench", "--mode", "consume", "--transfers", "200", "--workers", "2", "--json"]).await;
    assert_eq!(out.code, 0, "consume: {out:?}");
    let c = &out.json()["consume"];
    assert!(
        c["consumed_per_s"].as_f64().unwrap() > 0.0 && c["sqs_receive_delete_per_s"].as_f64().unwrap() > 0.0,
        "{c}"
    );
    assert!(c["consume_ratio"].as_f64().unwrap() > 0.0 && c["rounds"].as_array().unwrap().len() == 5, "{c}");
    let bad = db.cli(&["bench", "--mode", "sideways"]).await;
    assert_eq!(bad.code, 2);
    let bad = db.cli(&["bench", "--rate", "0"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("--rate"), "{}", bad.stderr);
    for args in [&["bench", "--floor-alongside", "5"][..], &["bench", "--rate", "50", "--floor-alongside", "0"][..]] {
        let bad = db.cli(args).await;
        assert_eq!(bad.code, 2, "{args:?}: {bad:?}");
        assert!(bad.stderr.contains("--floor-alongside"), "{}", bad.stderr);
    }
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0, "bench never touches the real database's rows");
}

#[tokio::test]
async fn demo_runs_on_a_scratch_database_and_never_touches_the_one_it_was_pointed_at() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('real', 1, 2, 10)")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = db.cli(&["demo"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("landed once each in consumed_events"), "{}", out.stdout);
    assert!(out.stdout.contains("refund.completed"), "{}", out.stdout);
    assert_eq!(
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await,
        1,
        "the real transfer is left alone"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 0, "no event written to the real database");
    assert_eq!(db.scalar("SELECT count(*) FROM accounts").await, 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'transfer\\_worker\\_demo\\_%'").await,
        0,
        "the scratch database is dropped"
    );
}

#[tokio::test]
async fn bench_reports_each_figure_next_to_its_bar_from_the_same_run() {
    let db = TestDb::new().await;
    let dist_ok = |d: &serde_json::Value| {
        let f = |k: &str| d[k].as_f64().unwrap_or(-1.0);
        0.0 <= f("p50") && f("p50") <= f("p95") && f("p95") <= f("p99") && f("p99") <= f("max")
    };
    let apply = db
        .cli(&[
            "bench",
            "--mode",
            "apply",
            "--transfers",
            "500",
            "--accounts",
            "50",
            "--ceiling-seconds",
            "1",
            "--json",
        ])
        .await;
    assert_eq!(apply.code, 0, "{apply:?}");
    let v = apply.json();
    assert!(v["ceiling_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let ratio = v["applied_per_s"].as_f64().unwrap() / v["ceiling_per_s"].as_f64().unwrap();
    assert!((v["ceiling_ratio"].as_f64().unwrap() - ratio).abs() < 1e-9, "{v}");
    assert!(v["lock_wait_ms_per_1000"].as_f64().unwrap() >= 0.0, "{v}");
    assert!(v["fsync"].is_string(), "the report says what durability the figures had: {v}");

    let relay =
        db.cli(&["bench", "--mode", "relay", "--transfers", "300", "--accounts", "30", "--fifo", "--json"]).await;
    assert_eq!(relay.code, 0, "{relay:?}");
    let v = relay.json();
    assert!(v["sqs_batch_per_s"].as_f64().unwrap() > 0.0 && v["relay_ratio"].as_f64().unwrap() > 0.0, "{v}");

    let steady = db
        .cli(&[
            "bench",
            "--rate",
            "100",
            "--seconds",
            "2",
            "--fifo",
            "--hot",
            "--preload",
            "5000",
            "--floor-alongside",
            "10",
            "--json",
        ])
        .await;
    assert_eq!(steady.code, 0, "{steady:?}");
    let v = steady.json();
    assert_eq!(v["invariants_ok"], true, "{v}");
    assert!(v["offered_per_s"].as_f64().unwrap() > 50.0, "{v}");
    assert!(dist_ok(&v["received_latency_ms"]) && dist_ok(&v["floor_latency_ms"]), "{v}");
    // SQS's answers as the relay recorded them, every transfer's, after its enqueue.
    assert!(dist_ok(&v["accepted_latency_ms"]) && v["accepted_latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["accepted_per_s"].as_f64().unwrap() > 50.0, "{v}");
    // The rate SQS took the floor's messages at: never above the offered rate
    // (senders wait for each message's due time), so a figure below it means
    // SQS alone could not keep up.
    let took = v["floor_sent_per_s"].as_f64().unwrap();
    assert!(took > 0.0 && took <= 100.0 * 1.05, "{v}");
    assert!(v["backlog_max"].as_i64().unwrap() >= 0, "{v}");
    // SQS's own latency measured while the pipeline ran: 10/s for 2 s.
    assert!(dist_ok(&v["floor_alongside_latency_ms"]), "{v}");
    // CPU, the worker's and SQS alone's senders', each counted on its own
    // threads (a sender that sent anything spent some).
    assert!(v["worker_cpu_ms_per_1000"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["floor_cpu_ms_per_1000"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["batched_floor_cpu_ms_per_1000"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["transfers"], 200);
    assert_eq!(v["preload"], 5000);

    let enqueue = db.cli(&["bench", "--mode", "enqueue", "--json"]).await;
    assert_eq!(enqueue.code, 0, "{enqueue:?}");
    let v = enqueue.json();
    assert!(dist_ok(&v["enqueue_ms"]["fresh_account"]) && dist_ok(&v["enqueue_ms"]["busy_account"]), "{v}");
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0, "bench never touches the real database's rows");
}
