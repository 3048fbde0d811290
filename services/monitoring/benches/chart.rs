//! The statistics behind one control chart, without the server: an index of
//! `NF_BENCH_BATCHES` (1,000,000) batches in memory, then the chart of one attribute
//! over all of them, split by site, and the adjusted comparison by lot.
//!
//! `cargo bench -p nanofleet-monitoring --bench chart`. Prints p50 and p99 in ms, then
//! one `RESULT {json}` line. Measures only.

use std::time::Instant;

use nanofleet_monitoring::chart::{ChartQuery, SpecLimits, control_charts};
use nanofleet_monitoring::compare::{Factor, compare_by};
use nanofleet_monitoring::index::{METRICS, Metric, QualityIndex, Row, Selection};

fn percentile(ms: &mut [f64], q: f64) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms.get(((ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
}

fn time(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (percentile(&mut ms, 0.5), percentile(&mut ms, 0.99))
}

fn main() {
    let batches: usize =
        std::env::var("NF_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let t = Instant::now();
    let mut ix = QualityIndex::new();
    for i in 0..batches {
        let device = i % 300;
        let (u1, u2) = (uniform().max(f64::EPSILON), uniform());
        let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let mut values = [None; METRICS];
        values[Metric::SizeNm as usize] = Some(80.0 + 3.0 * normal);
        values[Metric::Pdi as usize] = Some(0.12 + 0.015 * normal);
        ix.push(&Row {
            batch_id: format!("B{i:08}"),
            ended_ms: 1_790_000_000_000 + i as i64 * 1_000,
            strata: [
                format!("NF-{device:04}"),
                format!("site-{:02}", device / 10),
                if device.is_multiple_of(3) { "1.3.0" } else { "1.2.0" }.into(),
                "flu-h5-mrna".into(),
                format!("L{:03}", (i / 997) % 40),
            ],
            values,
            complete: true,
            qc_passed: true,
        });
    }
    let build_s = t.elapsed().as_secs_f64();
    println!("index of {batches} batches built in {build_s:.2} s");
    let q = |by| ChartQuery {
        metric: Metric::Pdi,
        selection: Selection::default(),
        by,
        baseline_points: 20,
        max_points: 500,
    };
    let limits = SpecLimits::new();
    let (one_p50, one_p99) = time(20, || {
        std::hint::black_box(control_charts(&ix, &q(None), &limits));
    });
    println!("one chart: p50 {one_p50:.1} ms, p99 {one_p99:.1} ms");
    let (site_p50, site_p99) = time(20, || {
        std::hint::black_box(control_charts(&ix, &q(Some(Factor::Site)), &limits));
    });
    println!("split by site: p50 {site_p50:.1} ms, p99 {site_p99:.1} ms");
    let rows = ix.select(&Selection::default());
    let (lot_p50, _) = time(5, || {
        let samples = ix.samples(Metric::SizeNm, &rows);
        std::hint::black_box(compare_by(&samples, Factor::Lot, 0.01).ok());
    });
    println!("size by lot, adjusted: p50 {lot_p50:.0} ms");
    println!(
        "RESULT {{\"batches\":{batches},\"build_s\":{build_s:.3},\"chart_p50_ms\":{one_p50:.2},\"chart_p99_ms\":{one_p99:.2},\"split_by_site_p50_ms\":{site_p50:.2},\"split_by_site_p99_ms\":{site_p99:.2},\"compare_by_lot_p50_ms\":{lot_p50:.1}}}"
    );
}
