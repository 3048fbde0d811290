//! Fuzzes the GS1 parser: random byte strings, and valid cartridge codes with random
//! mutations (characters replaced, inserted, removed, separators moved, AIs doubled).
//! Each input must parse or be refused without a panic; a valid code must read back
//! as itself in both forms; a refusal must say something.
//!
//! `cargo bench -p nanofleet-inventory --bench gs1_fuzz [-- SECONDS]` (default 10).
//! Prints the inputs tried, how many parsed, the refusals by kind, then one
//! `RESULT {json}` line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::civil::Date;
use nanofleet_inventory::gs1::{self, CartridgeCode, GS, ScanError};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;

/// Two-digit years read within 1977-2076.
const YEAR: i16 = 2026;

fn code() -> impl Strategy<Value = CartridgeCode> {
    let text = "[A-Za-z0-9!%&'*+,./:;<=>?_-]{1,20}";
    (
        "[0-9]{13}",
        text,
        text,
        (2000i16..=2076, 1i8..=12, 1i8..=28),
        proptest::option::of((1990i16..2000, 1i8..=12, 1i8..=28)),
        proptest::option::of((0i8..24, 0i8..60)),
    )
        .prop_map(|(g13, lot, serial, (y, m, d), prod, time)| {
            let gtin = format!("{g13}{}", gs1::check_digit(&g13).unwrap());
            let expiry = Date::new(y, m, d).unwrap();
            CartridgeCode {
                gtin,
                lot,
                serial,
                expiry,
                production: prod.map(|(y, m, d)| Date::new(y, m, d).unwrap()),
                expiry_time: time.map(|(h, mi)| expiry.at(h, mi, 0, 0)),
            }
        })
}

fn mutate(s: &str, ops: &[(u8, usize, char)]) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    for &(op, at, c) in ops {
        let i = if chars.is_empty() { 0 } else { at % (chars.len() + 1) };
        match op % 5 {
            0 if i < chars.len() => chars[i] = c,
            1 => chars.insert(i, c),
            2 if i < chars.len() => {
                chars.remove(i);
            }
            3 => chars.insert(i, GS),
            _ => {
                let tail: Vec<char> = chars[i..].to_vec();
                chars.extend(tail.into_iter().take(6));
            }
        }
    }
    chars.into_iter().collect()
}

fn kind(e: &ScanError) -> &'static str {
    match e {
        ScanError::Empty => "empty",
        ScanError::TooLongScan { .. } => "too_long_scan",
        ScanError::NotGs1 { .. } => "not_gs1",
        ScanError::UnknownAi { .. } => "unknown_ai",
        ScanError::EmptyValue { .. } => "empty_value",
        ScanError::WrongLength { .. } => "wrong_length",
        ScanError::TooLong { .. } => "too_long",
        ScanError::BadCharacter { .. } => "bad_character",
        ScanError::CheckDigit { .. } => "check_digit",
        ScanError::BadDate { .. } => "bad_date",
        ScanError::Duplicate { .. } => "duplicate",
        ScanError::Missing { .. } => "missing",
        ScanError::ProducedAfterExpiry { .. } => "produced_after_expiry",
        ScanError::ExpiryDisagrees { .. } => "expiry_disagrees",
    }
}

fn main() {
    let secs: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runner = TestRunner::deterministic();
    let valid = code();
    let noise = proptest::collection::vec(any::<u8>(), 0..120);
    let ops = proptest::collection::vec((any::<u8>(), any::<usize>(), any::<char>()), 1..6);
    let mut tried = 0u64;
    let mut parsed = 0u64;
    let mut refusals: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut judge = |input: &str, tried: &mut u64| {
        *tried += 1;
        match gs1::parse_cartridge(input, YEAR) {
            Ok(c) => {
                // Whatever parsed must read back the same from its own forms.
                assert_eq!(gs1::parse_cartridge(&c.element_string(), YEAR).as_ref(), Ok(&c), "{input:?}");
                assert_eq!(gs1::parse_cartridge(&c.human(), YEAR).as_ref(), Ok(&c), "{input:?}");
                parsed += 1;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                *refusals.entry(kind(&e)).or_default() += 1;
            }
        }
    };
    while Instant::now() < deadline {
        for _ in 0..1000 {
            let c = valid.new_tree(&mut runner).unwrap().current();
            assert_eq!(gs1::parse_cartridge(&c.element_string(), YEAR).as_ref(), Ok(&c));
            assert_eq!(gs1::parse_cartridge(&c.human(), YEAR).as_ref(), Ok(&c));
            let o = ops.new_tree(&mut runner).unwrap().current();
            judge(&mutate(&c.element_string(), &o), &mut tried);
            judge(&mutate(&c.human(), &o), &mut tried);
            let bytes = noise.new_tree(&mut runner).unwrap().current();
            judge(&String::from_utf8_lossy(&bytes), &mut tried);
            let mut prefixed = b"]d2".to_vec();
            prefixed.extend(bytes.iter().map(|b| if b % 7 == 0 { 0x1d } else { b'0' + b % 10 }));
            judge(&String::from_utf8_lossy(&prefixed), &mut tried);
        }
    }
    println!("gs1 fuzz: {secs} s, {tried} inputs, {parsed} parsed, no panic");
    for (k, n) in &refusals {
        println!("  refused {k}: {n}");
    }
    let refusals_json: Vec<String> = refusals.iter().map(|(k, n)| format!("\"{k}\":{n}")).collect();
    println!(
        "RESULT {{\"bench\":\"gs1_fuzz\",\"seconds\":{secs},\"inputs\":{tried},\"parsed\":{parsed},\"refusals\":{{{}}}}}",
        refusals_json.join(",")
    );
}
