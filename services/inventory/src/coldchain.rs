//! Cold chain: a temperature logger's readings against a storage class.
//!
//! Loggers record continuously, since a spot check misses most excursions. Between
//! two readings, the interval counts as an excursion when either end is outside the
//! storage class (a partial interval counts whole, erring on the side of the
//! patient), and a gap longer than [`MAX_GAP_MIN`] counts as an excursion too: an
//! unlogged stretch cannot be shown to be cold. The limit compares the reading with
//! the band as printed; a logger's ±0.5 °C accuracy is the manufacturer's margin in
//! setting the band, not a tolerance added here.

use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::catalogue::StorageClass;

/// Longest interval between two readings still taken as logged, minutes.
pub const MAX_GAP_MIN: f64 = 15.0;
/// Most readings one logger upload may hold (a month at one a minute).
pub const MAX_READINGS: usize = 50_000;

/// One logger reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub at_ms: i64,
    pub celsius: f64,
}

/// What a logger's readings show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excursion {
    /// Minutes outside the band or unlogged.
    pub minutes: f64,
    /// Of those, minutes in gaps between readings.
    pub unlogged_minutes: f64,
    pub min_c: f64,
    pub max_c: f64,
    pub readings: usize,
}

impl Excursion {
    /// Over `limit_min`: the cartridges it covered are blocked.
    pub fn over(&self, limit_min: u32) -> bool {
        self.minutes > f64::from(limit_min)
    }
}

/// Checks the readings (finite, plausible, at most [`MAX_READINGS`]) and sums the
/// excursion minutes against `class`. Readings may come in any order.
pub fn excursion(readings: &[Reading], class: StorageClass) -> Result<Excursion, Invalid> {
    if readings.len() > MAX_READINGS {
        return Err(Invalid::new("readings", &readings.len().to_string(), "at most 50000 readings"));
    }
    for (i, r) in readings.iter().enumerate() {
        if !(r.celsius.is_finite() && (-150.0..=80.0).contains(&r.celsius)) {
            return Err(Invalid::new(
                "readings",
                &format!("reading {} = {} °C", i + 1, r.celsius),
                "a temperature from -150 to 80 °C",
            ));
        }
    }
    let mut sorted = readings.to_vec();
    sorted.sort_by_key(|r| r.at_ms);
    let (lo, hi) = class.range_c();
    let outside = |c: f64| c < lo || c > hi;
    let mut minutes = 0.0;
    let mut unlogged = 0.0;
    for w in sorted.windows(2) {
        let span = (w[1].at_ms - w[0].at_ms) as f64 / 60_000.0;
        if span > MAX_GAP_MIN {
            unlogged += span;
            minutes += span;
        } else if outside(w[0].celsius) || outside(w[1].celsius) {
            minutes += span;
        }
    }
    if sorted.len() == 1 && outside(sorted[0].celsius) {
        // One reading outside the band: at least the logging interval.
        minutes += 1.0;
    }
    Ok(Excursion {
        minutes,
        unlogged_minutes: unlogged,
        min_c: sorted.iter().map(|r| r.celsius).fold(f64::INFINITY, f64::min),
        max_c: sorted.iter().map(|r| r.celsius).fold(f64::NEG_INFINITY, f64::max),
        readings: sorted.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(temps: &[f64]) -> Vec<Reading> {
        temps.iter().enumerate().map(|(i, &c)| Reading { at_ms: i as i64 * 60_000, celsius: c }).collect()
    }

    #[test]
    fn minutes_outside_the_band_add_up() {
        let r = series(&[-75.0, -74.0, -58.0, -59.5, -61.0, -75.0]);
        let e = excursion(&r, StorageClass::UltraCold).unwrap();
        // Intervals touching -58 and -59.5: 1-2, 2-3, 3-4.
        assert_eq!(e.minutes, 3.0);
        assert_eq!((e.min_c, e.max_c), (-75.0, -58.0));
        assert!(e.over(2));
        assert!(!e.over(3));
        let cold = excursion(&series(&[5.0; 100]), StorageClass::Refrigerated).unwrap();
        assert_eq!(cold.minutes, 0.0);
    }

    #[test]
    fn a_gap_in_the_log_counts_as_an_excursion() {
        let r = vec![Reading { at_ms: 0, celsius: 4.0 }, Reading { at_ms: 40 * 60_000, celsius: 4.0 }];
        let e = excursion(&r, StorageClass::Refrigerated).unwrap();
        assert_eq!((e.minutes, e.unlogged_minutes), (40.0, 40.0));
    }

    #[test]
    fn readings_in_any_order_give_the_same_answer() {
        let mut r = series(&[4.0, 9.0, 4.0, 4.0]);
        let a = excursion(&r, StorageClass::Refrigerated).unwrap();
        r.reverse();
        assert_eq!(excursion(&r, StorageClass::Refrigerated).unwrap(), a);
        assert_eq!(a.minutes, 2.0);
    }

    #[test]
    fn impossible_readings_are_refused() {
        let e = excursion(&series(&[4.0, f64::NAN]), StorageClass::Refrigerated).unwrap_err();
        assert_eq!(
            e.to_string(),
            "readings = \"reading 2 = NaN °C\": allowed a temperature from -150 to 80 °C"
        );
        assert!(excursion(&series(&[400.0]), StorageClass::Frozen).is_err());
    }
}
