//! How long a device takes to judge a two-signature recipe delivery, against the
//! floor of the two ed25519 strict verifications it cannot avoid.
//!
//! `cargo bench -p nanofleet-recipe --bench verify [-- ITERATIONS]`. Prints mean, p50
//! and p99 in µs for both, then one `RESULT {json}` line. Measures only.

use std::hint::black_box;
use std::time::Instant;

use ed25519_dalek::{Signature, SigningKey};
use nanofleet_pki::trust_root::TrustRoot;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{RecipeDelivery, SignatureMeaning, Targets};
use nanofleet_recipe::dsse::pae;
use nanofleet_recipe::example::example;
use nanofleet_recipe::sign::{APPROVER_ROLE, AUTHOR_ROLE, sign_statement, statement};
use nanofleet_recipe::{DeviceContext, verify_delivery};

const NOW: i64 = 1_750_000_000_000;
const WARMUP: usize = 500;

struct Stats {
    mean: f64,
    p50: f64,
    p99: f64,
}

/// Times `f` once per iteration, in µs.
fn time(iterations: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..WARMUP {
        f();
    }
    let mut us: Vec<f64> = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f();
        us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us.get(((us.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    Stats { mean: us.iter().sum::<f64>() / us.len().max(1) as f64, p50: at(0.50), p99: at(0.99) }
}

fn main() {
    let iterations: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20_000);

    let (root_key, author, approver) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
        SigningKey::from_bytes(&[3; 32]),
    );
    let mut body = TrustRoot::initial(&root_key, "2046-01-01T00:00:00Z").signed;
    body.add_role_key(AUTHOR_ROLE, &author.verifying_key(), Some("alice"));
    body.add_role_key(APPROVER_ROLE, &approver.verifying_key(), Some("quinn"));
    let root = TrustRoot::signed_by(body, &[&root_key]);

    let recipe =
        example("flu-h5", 1, Targets { site_ids: vec!["site-a".into()], device_ids: Vec::new() }, NOW);
    let recipe_bytes = recipe.encode_to_vec();
    let statements = vec![
        sign_statement(
            &statement(&recipe_bytes, "alice", "Alice Martin", SignatureMeaning::Authored, NOW),
            &author,
        ),
        sign_statement(
            &statement(&recipe_bytes, "quinn", "Quinn Roy", SignatureMeaning::Approved, NOW),
            &approver,
        ),
    ];
    let delivery = RecipeDelivery { statements: statements.clone() }.encode_to_vec();
    let ctx = DeviceContext {
        device_id: "NF-0001",
        site_id: "site-a",
        model: "NF-200",
        firmware_version: "2.1.0",
        now_unix_ms: NOW,
        root: &root,
    };
    // Make sure the timed path is the accepting one.
    if let Err(r) = verify_delivery(&delivery, &ctx, |_| None) {
        eprintln!("the bench delivery is refused: {r}");
        std::process::exit(1);
    }

    // The floor: the two signature checks alone, messages already encoded.
    let checks: Vec<_> = statements
        .iter()
        .zip([author.verifying_key(), approver.verifying_key()])
        .filter_map(|(env, key)| {
            let sig = env.signatures.first()?;
            let sig = Signature::from_bytes(&<[u8; 64]>::try_from(sig.sig.as_slice()).ok()?);
            Some((key, pae(&env.payload_type, &env.payload), sig))
        })
        .collect();

    let full = time(iterations, || {
        black_box(verify_delivery(black_box(&delivery), &ctx, |_| None).is_ok());
    });
    let floor = time(iterations, || {
        for (key, message, sig) in &checks {
            black_box(key.verify_strict(black_box(message), sig).is_ok());
        }
    });

    println!(
        "delivery: {} bytes, recipe {} bytes, {iterations} iterations",
        delivery.len(),
        recipe_bytes.len()
    );
    for (name, s) in [("verify_delivery", &full), ("2 x verify_strict", &floor)] {
        println!("{name:>18}: mean {:8.2} µs  p50 {:8.2} µs  p99 {:8.2} µs", s.mean, s.p50, s.p99);
    }
    let ratio = full.mean / floor.mean;
    println!("{:>18}: {ratio:.3} (mean over mean)", "ratio");
    let stats = |s: &Stats| serde_json::json!({ "mean_us": s.mean, "p50_us": s.p50, "p99_us": s.p99 });
    let result = serde_json::json!({
        "bench": "recipe_verify_delivery",
        "iterations": iterations,
        "delivery_bytes": delivery.len(),
        "verify_delivery": stats(&full),
        "baseline_two_verify_strict": stats(&floor),
        "ratio_mean": ratio,
    });
    println!("RESULT {result}");
}
