//! A control chart over a million batch records, through the API, against the naive
//! way of drawing it (read the series from the database for each chart).
//!
//! ```text
//! cargo bench -p nanofleet-tests --bench quality_chart
//! NF_BENCH_BATCHES=100000 cargo bench -p nanofleet-tests --bench quality_chart
//! ```
//!
//! Setup, before any clock runs: a SQLite data directory whose `batch_metrics` table
//! holds `NF_BENCH_BATCHES` (1,000,000) batches from 30 sites × 10 devices, two
//! firmware versions, two recipes and 40 cartridge lots, written straight into the
//! table (the server derives these rows from signed records; here only reading them is
//! measured). Then a server starts in this process on that directory.
//!
//! Measured, with the gRPC API over TLS (`GetControlChart`, 500 points returned):
//! 1. the first chart, which loads the index from the database;
//! 2. 20 charts of one attribute over every batch (I-MR, all 9 pattern rules, EWMA,
//!    CUSUM, capability): p50 and p99;
//! 3. 20 charts split by site (30 charts of ~33,000 points);
//! 4. 10 comparisons of size by lot, adjusted for site, firmware and recipe;
//! 5. the naive peer, 5 times: `SELECT pdi FROM batch_metrics ORDER BY ended_ms` and
//!    the same I-MR, rules, EWMA and CUSUM in this process.
//!
//! Prints one line per figure, then `RESULT {json}`. Measures only.

use std::time::Instant;

use nanofleet_monitoring::spc;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::monitoring_service_client::MonitoringServiceClient;
use sqlx::Connection as _;

const SITES: usize = 30;
const DEVICES_PER_SITE: usize = 10;
const LOTS: usize = 40;

/// Resident memory of this process, MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn percentile(ms: &mut [f64], q: f64) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms.get(((ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
}

async fn seed(path: &std::path::Path, batches: usize) -> anyhow::Result<()> {
    // Migrations first, through the store.
    let store = nanofleet_store::Store::open(&nanofleet_store::Options::sqlite(path)).await?;
    store.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await?;
    sqlx::query("PRAGMA foreign_keys = OFF").execute(&mut conn).await?;
    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut conn).await?;
    sqlx::query("PRAGMA synchronous = OFF").execute(&mut conn).await?;
    let mut tx = conn.begin().await?;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let t0 = 1_790_000_000_000i64;
    const ROWS: usize = 100;
    let mut sql = String::from(
        "INSERT INTO batch_metrics (batch_id, device_id, site_id, model, firmware_version, recipe_id, \
         recipe_version, cartridge_lot, ended_ms, outcome, qc_passed, size_nm, pdi, encapsulation_pct, ph, \
         yield_pct, flow_cv, max_pressure_mbar, frr_error_pct, alarms) VALUES ",
    );
    for r in 0..ROWS {
        let b = r * 20;
        let marks: Vec<String> = (1..=20).map(|i| format!("${}", b + i)).collect();
        sql.push_str(&format!("{}({})", if r > 0 { ", " } else { "" }, marks.join(", ")));
    }
    for chunk in 0..batches.div_ceil(ROWS) {
        let mut q = sqlx::query(&sql);
        for r in 0..ROWS {
            // The last chunk's spare rows get numbers past the end, deleted below.
            let i = chunk * ROWS + r;
            let device = i % (SITES * DEVICES_PER_SITE);
            let site = device / DEVICES_PER_SITE;
            let normal = {
                let (u1, u2) = (uniform().max(f64::EPSILON), uniform());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            };
            q = q
                .bind(format!("B{i:08}"))
                .bind(format!("NF-{device:04}"))
                .bind(format!("site-{site:02}"))
                .bind("NF-200")
                .bind(if device.is_multiple_of(3) { "1.3.0" } else { "1.2.0" })
                .bind(if i.is_multiple_of(2) { "flu-h5-mrna" } else { "rsv-prefusion" })
                .bind(1i64)
                .bind(format!("L{:03}", (i / 997) % LOTS))
                .bind(t0 + i as i64 * 1_000)
                .bind("complete")
                .bind(1i64)
                .bind(80.0 + 3.0 * normal)
                .bind(0.12 + 0.015 * normal)
                .bind(92.0 - 1.5 * normal)
                .bind(7.4 + 0.05 * normal)
                .bind(90.0 + 2.0 * normal)
                .bind(0.07 + 0.005 * normal)
                .bind(1200.0 + 20.0 * normal)
                .bind((1.0 + normal).abs())
                .bind(0i64);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    // Rows past the end of the last chunk were numbered beyond `batches`: drop them.
    sqlx::query("DELETE FROM batch_metrics WHERE batch_id >= $1")
        .bind(format!("B{batches:08}"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let batches: usize =
        std::env::var("NF_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
        nanofleet_pki::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("nanofleet.db");
        let started = Instant::now();
        seed(&db, batches).await?;
        eprintln!("seeded {batches} batches in {:.1} s", started.elapsed().as_secs_f64());

        let rss_before = rss_mib();
        let server = nanofleet::server::Server::start(&nanofleet::server::Options::ephemeral(dir.path().into())).await?;
        let token = server.bootstrap.as_ref().map(|b| b.api_token.clone()).unwrap_or_default();
        let config = nanofleet_pki::tls::client_config(&[server.ca.root_cert().clone()], None)?;
        let channel = nanofleet_pki::tls::connect_channel(&format!("https://{}", server.grpc_addr), config)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut client =
            MonitoringServiceClient::with_interceptor(channel, nanofleet::cli::Bearer::new(&token)?)
                .max_decoding_message_size(64 << 20);
        let chart = |by: pb::Factor| pb::GetControlChartRequest {
            metric: "pdi".into(),
            by: by as i32,
            ..Default::default()
        };

        let t = Instant::now();
        let first = client.get_control_chart(chart(pb::Factor::Unspecified)).await?.into_inner();
        let cold_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(first.charts[0].n as usize == batches, "charted {} of {batches}", first.charts[0].n);
        let index_mib = rss_mib() - rss_before;
        println!("first chart (loads the index): {cold_ms:.0} ms; server with its index: +{index_mib:.0} MiB resident");

        let mut one = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let r = client.get_control_chart(chart(pb::Factor::Unspecified)).await?.into_inner();
            one.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(r.charts[0].points.len() == 500);
        }
        let (one_p50, one_p99) = (percentile(&mut one, 0.5), percentile(&mut one, 0.99));
        println!("chart of {batches} batches: p50 {one_p50:.1} ms, p99 {one_p99:.1} ms");

        let mut split = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let r = client.get_control_chart(chart(pb::Factor::Site)).await?.into_inner();
            split.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(r.charts.len() == SITES);
        }
        let (split_p50, split_p99) = (percentile(&mut split, 0.5), percentile(&mut split, 0.99));
        println!("split by site ({SITES} charts): p50 {split_p50:.1} ms, p99 {split_p99:.1} ms");

        let mut compare = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            client
                .compare_strata(pb::CompareStrataRequest {
                    metric: "size_nm".into(),
                    by: pb::Factor::Lot as i32,
                    ..Default::default()
                })
                .await?;
            compare.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let compare_p50 = percentile(&mut compare, 0.5);
        println!("size by lot, adjusted: p50 {compare_p50:.0} ms");

        // The naive peer: the series from the database for every chart.
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
        let mut naive = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let values: Vec<f64> = sqlx::query_scalar("SELECT pdi FROM batch_metrics ORDER BY ended_ms")
                .fetch_all(&pool)
                .await?;
            let baseline = spc::Baseline::from_individuals(&values[..20])?;
            let imr = spc::imr(&values, &baseline, &spc::Rule::ALL_PATTERN)?;
            let ewma = spc::ewma(&values, &baseline, spc::EwmaParams::default())?;
            let cusum = spc::cusum(&values, &baseline, spc::CusumParams::default())?;
            std::hint::black_box((imr.violations.len(), ewma.len(), cusum.len()));
            naive.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let naive_p50 = percentile(&mut naive, 0.5);
        println!("naive (SQL per chart + the same statistics): p50 {naive_p50:.0} ms");
        println!("ratio naive / index: {:.1}×", naive_p50 / one_p50);
        pool.close().await;
        server.shutdown().await;
        println!(
            "RESULT {}",
            serde_json::json!({
                "batches": batches,
                "first_chart_ms": cold_ms,
                "index_rss_mib": index_mib,
                "chart_p50_ms": one_p50,
                "chart_p99_ms": one_p99,
                "split_by_site_p50_ms": split_p50,
                "split_by_site_p99_ms": split_p99,
                "compare_by_lot_p50_ms": compare_p50,
                "naive_p50_ms": naive_p50,
            })
        );
        Ok(())
    })
}
