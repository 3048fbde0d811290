//! The trace of a recalled lot across a million runs, through the API, against the
//! naive way (the same query scanning the table without the lot index).
//!
//! ```text
//! cargo bench -p nanofleet-tests --bench lot_trace
//! NF_BENCH_RUNS=100000 cargo bench -p nanofleet-tests --bench lot_trace
//! ```
//!
//! Setup, before any clock runs: a SQLite data directory (the embedded default) whose
//! `batch_cartridges` table holds `NF_BENCH_RUNS` (1,000,000) runs from 50 sites × 10
//! devices over 1,000 lots, written straight into the table (the server writes these
//! rows with each signed batch record; here only reading them is measured). A lot of
//! the catalogue is registered for each lot traced. Then a server starts in this
//! process on that directory.
//!
//! Measured, with the gRPC API over TLS (`GetLot`: the lot, where its cartridges are
//! and every run that used it, with device, site, prescription and patient):
//! 1. 50 lots drawn at random, about 1,000 runs each: p50, p99, max;
//! 2. the largest lot the catalogue allows (20,000 cartridges), each used by a run,
//!    5 times;
//! 3. the naive peer in the same run, 5 times each for a 1,000-run lot: the same
//!    SELECT with `NOT INDEXED`, straight from the database.
//!
//! Prints one line per figure, then `RESULT {json}`. Measures only.

use std::time::Instant;

use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::inventory_service_client::InventoryServiceClient;
use sqlx::Connection as _;

const SITES: usize = 50;
const DEVICES_PER_SITE: usize = 10;
const LOTS: usize = 1_000;
const GTIN: &str = nanofleet_recipe::example::EXAMPLE_GTIN;
/// A lot of the largest size the catalogue allows, every cartridge of it used: one run
/// in 50 of a million.
const BIG_LOT: &str = "LBIG";

fn percentile(ms: &mut [f64], q: f64) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms.get(((ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
}

fn lot_of(i: usize) -> String {
    if i.is_multiple_of(50) { BIG_LOT.into() } else { format!("L{:04}", (i / 7) % LOTS) }
}

async fn seed(path: &std::path::Path, runs: usize) -> anyhow::Result<()> {
    let store = nanofleet_store::Store::open(&nanofleet_store::Options::sqlite(path)).await?;
    store.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await?;
    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut conn).await?;
    sqlx::query("PRAGMA synchronous = OFF").execute(&mut conn).await?;
    let mut tx = conn.begin().await?;
    let t0 = 1_790_000_000_000i64;
    const ROWS: usize = 100;
    let mut sql = String::from(
        "INSERT INTO batch_cartridges (batch_id, gtin, lot, serial, device_id, site_id, prescription_id, \
         patient_pseudonym, started_ms) VALUES ",
    );
    for r in 0..ROWS {
        let marks: Vec<String> = (1..=9).map(|i| format!("${}", r * 9 + i)).collect();
        sql.push_str(&format!("{}({})", if r > 0 { ", " } else { "" }, marks.join(", ")));
    }
    for chunk in 0..runs.div_ceil(ROWS) {
        let mut q = sqlx::query(&sql);
        for r in 0..ROWS {
            let i = chunk * ROWS + r;
            let device = i % (SITES * DEVICES_PER_SITE);
            q = q
                .bind(format!("B{i:08}"))
                .bind(GTIN)
                .bind(lot_of(i))
                .bind(format!("S{i:08}"))
                .bind(format!("NF-{device:04}"))
                .bind(format!("site-{:02}", device / DEVICES_PER_SITE))
                .bind(format!("RX-{i:08}"))
                .bind(format!("PT-{:08X}", (i as u64).wrapping_mul(0x9E37_79B9) as u32))
                .bind(t0 + i as i64 * 1_000);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    sqlx::query("DELETE FROM batch_cartridges WHERE batch_id >= $1")
        .bind(format!("B{runs:08}"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("NF_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        nanofleet_pki::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("nanofleet.db");
        let started = Instant::now();
        seed(&db, runs).await?;
        eprintln!("seeded {runs} runs in {:.1} s", started.elapsed().as_secs_f64());

        let server =
            nanofleet::server::Server::start(&nanofleet::server::Options::ephemeral(dir.path().into())).await?;
        let token = server.bootstrap.as_ref().map(|b| b.api_token.clone()).unwrap_or_default();
        let config = nanofleet_pki::tls::client_config(&[server.ca.root_cert().clone()], None)?;
        let channel = nanofleet_pki::tls::connect_channel(&format!("https://{}", server.grpc_addr), config)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut client = InventoryServiceClient::with_interceptor(channel, nanofleet::cli::Bearer::new(&token)?)
            .max_decoding_message_size(256 << 20);
        let kind = nanofleet_tests::bench::bench_cartridge_type();
        client.create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(kind) }).await?;
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut picks = Vec::new();
        for _ in 0..50 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            picks.push(format!("L{:04}", state % LOTS as u64));
        }
        let today = jiff::Zoned::now().date();
        for lot in picks.iter().chain(std::iter::once(&BIG_LOT.to_owned())) {
            let req = pb::CreateLotRequest {
                gtin: GTIN.into(),
                lot: lot.clone(),
                produced: today.saturating_sub(jiff::Span::new().days(30)).to_string(),
                expires: today.saturating_add(jiff::Span::new().days(300)).to_string(),
                quantity: 1,
            };
            match client.create_lot(req).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                Err(s) => return Err(s.into()),
            }
        }
        let get = |lot: &str| pb::GetLotRequest { gtin: GTIN.into(), lot: lot.into() };

        let mut typical = Vec::new();
        let mut traced = 0usize;
        for lot in &picks {
            let t = Instant::now();
            let r = client.get_lot(get(lot)).await?.into_inner();
            typical.push(t.elapsed().as_secs_f64() * 1e3);
            traced += r.runs.len();
        }
        let per_lot = traced / picks.len();
        let (p50, p99, max) =
            (percentile(&mut typical, 0.5), percentile(&mut typical, 0.99), percentile(&mut typical, 1.0));
        println!("trace of a lot ({per_lot} runs of {runs}): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");

        let mut big = Vec::new();
        let mut big_runs = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let r = client.get_lot(get(BIG_LOT)).await?.into_inner();
            big.push(t.elapsed().as_secs_f64() * 1e3);
            big_runs = r.runs.len();
        }
        let big_p50 = percentile(&mut big, 0.5);
        println!("trace of a lot used by {big_runs} runs: p50 {big_p50:.0} ms");

        // The naive peer: the same rows with the table scanned.
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
        let mut naive = Vec::new();
        for lot in picks.iter().take(5) {
            let t = Instant::now();
            let rows = sqlx::query(
                "SELECT batch_id, gtin, lot, serial, device_id, site_id, prescription_id, patient_pseudonym, \
                 started_ms FROM batch_cartridges NOT INDEXED WHERE lot = $1 AND gtin = $2 ORDER BY started_ms",
            )
            .bind(lot)
            .bind(GTIN)
            .fetch_all(&pool)
            .await?;
            naive.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(!rows.is_empty());
        }
        let naive_p50 = percentile(&mut naive, 0.5);
        println!("naive (table scan, no API): p50 {naive_p50:.0} ms; ratio {:.0}x", naive_p50 / p50);
        println!(
            "RESULT {}",
            serde_json::json!({
                "bench": "lot_trace", "runs": runs, "runs_per_lot": per_lot,
                "trace_p50_ms": p50, "trace_p99_ms": p99, "trace_max_ms": max,
                "big_lot_runs": big_runs, "big_lot_p50_ms": big_p50, "naive_p50_ms": naive_p50,
            })
        );
        pool.close().await;
        server.shutdown().await;
        Ok(())
    })
}
