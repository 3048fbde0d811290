//! The monitoring statistics against the simulator's physics: a device whose pump wears
//! out, run after run, is flagged by the EWMA chart of its own batches before any batch
//! fails its release criteria. No server: the simulated device and the SPC code alone,
//! so the check is about the detection, not the plumbing (which tests/monitoring.rs
//! covers end to end).

use nanofleet_agent::hal::{DeviceInfo, RunPlan};
use nanofleet_agent::sim::{Fault, SimDevice, simulate_run};
use nanofleet_monitoring::spc::{self, Baseline, EwmaParams};
use nanofleet_proto::device::v1::QualityAttribute;

const ATTRIBUTES: [QualityAttribute; 5] = [
    QualityAttribute::SizeNm,
    QualityAttribute::Pdi,
    QualityAttribute::EncapsulationPct,
    QualityAttribute::Ph,
    QualityAttribute::YieldPct,
];

#[test]
fn pump_wear_is_flagged_by_ewma_before_any_batch_fails() {
    let start = 1_790_000_000_000;
    let recipe = nanofleet_recipe::example::example("flu-h5-mrna", 1, Default::default(), start);
    let criteria = recipe.release_criteria.expect("the example recipe has release criteria");
    let info = DeviceInfo {
        device_id: "NF-T-01".into(),
        site_id: "site-a".into(),
        model: "NF-200".into(),
        firmware_version: "1.2.0".into(),
    };
    for seed in [1, 2, 3] {
        let mut device = SimDevice::new(info.clone(), seed);
        // About 150 runs until the pump is fully worn (21 simulated days).
        device.set_time_scale(100.0);
        device.inject(Fault::PumpWear);
        let (mut pdi, mut cv, mut first_failure) = (Vec::new(), Vec::new(), None);
        let mut now = start;
        for n in 0..220 {
            let run = simulate_run(&mut device, RunPlan::from_recipe(&format!("R{n}"), &recipe), now, 200)
                .expect("an idle device starts");
            now = run.ended_ms + 60_000;
            let measured: Vec<(QualityAttribute, f64)> =
                ATTRIBUTES.iter().filter_map(|&a| run.qc(a).map(|v| (a, v))).collect();
            let passed = run.completed()
                && measured.len() == ATTRIBUTES.len()
                && nanofleet_recipe::batch::evaluate(&criteria, &measured).iter().all(|q| q.passed);
            if !passed && first_failure.is_none() {
                first_failure = Some(n);
            }
            pdi.push(run.qc(QualityAttribute::Pdi).unwrap_or(f64::NAN));
            cv.push(run.collect_flow_cv().unwrap_or(f64::NAN));
            if first_failure.is_some() {
                break;
            }
        }
        let failure = first_failure.expect("a fully worn pump makes a batch fail (PDI above 0.2)");
        assert!(failure > 40, "seed {seed}: the first batches pass while the pump is new ({failure})");
        // The chart an operator watches: the device's own batches, limits from its
        // first 20, EWMA λ = 0.2, L = 3 — on PDI and on the flow CV. What counts is the
        // first signal after the baseline and upwards, the direction of wear.
        let signal = |series: &[f64]| {
            let baseline = Baseline::from_individuals(&series[..20]).expect("a baseline");
            let points = spc::ewma(&series[..failure], &baseline, EwmaParams::default()).expect("ewma");
            points.iter().enumerate().skip(20).find(|(_, p)| p.out && p.z > p.ucl).map(|(i, _)| i)
        };
        let by_pdi = signal(&pdi).expect("EWMA of PDI signals before the failure");
        let by_cv = signal(&cv).expect("EWMA of flow CV signals before the failure");
        assert!(
            by_pdi < failure && by_cv < failure,
            "seed {seed}: EWMA signals at batch {by_pdi} (PDI) and {by_cv} (flow CV), the first failure is batch {failure}"
        );
        eprintln!(
            "seed {seed}: EWMA signals at batch {by_pdi} (PDI), {by_cv} (flow CV); first failure at batch {failure}"
        );
        // Early, not at the last moment: at least ten batches of warning.
        assert!(by_pdi.min(by_cv) + 10 <= failure, "seed {seed}: {by_pdi}/{by_cv} vs {failure}");
    }
}
