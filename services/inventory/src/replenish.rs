//! Replenishment: from a site's real consumption of a cartridge type and the stock it
//! holds, how long the stock lasts, when to order and how much.
//!
//! The rate is the cartridges consumed over the last [`Policy::window_days`] days.
//! Stock is used first-expiry-first-out at that rate; a cartridge whose expiry comes
//! before its turn is counted as expiring before use, not as cover. Days of cover are
//! the usable cartridges over the rate. The reorder point is the rate over the lead
//! time plus a safety margin; an order brings the usable stock up to cover the lead
//! time, the review period and the margin.

use serde::{Deserialize, Serialize};

const DAY_MS: f64 = 86_400_000.0;

/// How a site plans its orders.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Days of consumption the rate is taken over.
    pub window_days: u32,
    /// Days from order to receipt.
    pub lead_time_days: u32,
    /// Days of extra stock held against a busier week or a late delivery.
    pub safety_days: u32,
    /// Days between two orders.
    pub review_days: u32,
}

impl Policy {
    pub fn with_lead_time(lead_time_days: u32) -> Policy {
        Policy { window_days: 14, lead_time_days, safety_days: 2, review_days: 7 }
    }
}

/// Something the site should act on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Alert {
    /// The usable stock runs out before an order placed now would arrive.
    RunsOut { days_of_cover: f64, lead_time_days: u32 },
    /// The usable stock is at or below the reorder point: order now.
    Reorder { usable: u32, reorder_point: u32 },
    /// Cartridges that will expire before their turn comes.
    ExpiresBeforeUse { count: u32, first_expiry_ms: i64 },
}

impl Alert {
    pub fn kind(&self) -> &'static str {
        match self {
            Alert::RunsOut { .. } => "runs-out",
            Alert::Reorder { .. } => "reorder",
            Alert::ExpiresBeforeUse { .. } => "expires-before-use",
        }
    }

    /// One line for a person.
    pub fn message(&self) -> String {
        match self {
            Alert::RunsOut { days_of_cover, lead_time_days } => format!(
                "stock lasts {days_of_cover:.1} days, less than the {lead_time_days}-day lead time: it will run out"
            ),
            Alert::Reorder { usable, reorder_point } => {
                format!(
                    "{usable} usable cartridges, at or below the reorder point of {reorder_point}: order now"
                )
            }
            Alert::ExpiresBeforeUse { count, .. } => {
                format!("{count} cartridges will expire before their turn at the current rate")
            }
        }
    }
}

/// A site's position for one cartridge type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Cartridges consumed per day over the window.
    pub rate_per_day: f64,
    /// Cartridges held (in stock or loaded).
    pub on_hand: u32,
    /// Of those, the ones used before they expire.
    pub usable: u32,
    /// `None` when nothing is consumed.
    pub days_of_cover: Option<f64>,
    pub reorder_point: u32,
    /// Cartridges to order now; 0 when none is needed.
    pub suggested_order: u32,
    pub alerts: Vec<Alert>,
}

/// The position of a site holding cartridges expiring at `expiries_ms` (ms), having
/// consumed `consumed_in_window` cartridges over the policy's window, at `now_ms`.
pub fn position(expiries_ms: &[i64], consumed_in_window: u32, policy: Policy, now_ms: i64) -> Position {
    let rate = f64::from(consumed_in_window) / f64::from(policy.window_days.max(1));
    let on_hand = u32::try_from(expiries_ms.len()).unwrap_or(u32::MAX);
    let mut sorted = expiries_ms.to_vec();
    sorted.sort_unstable();
    let mut usable = 0u32;
    let mut expiring = 0u32;
    let mut first_expiring = None;
    if rate > 0.0 {
        // First expiry, first out: the next use is one cartridge's worth of days later.
        let step_ms = DAY_MS / rate;
        let mut next_use = now_ms as f64 + step_ms;
        for &exp in &sorted {
            if (exp as f64) < next_use {
                expiring += 1;
                first_expiring.get_or_insert(exp);
            } else {
                usable += 1;
                next_use += step_ms;
            }
        }
    } else {
        usable = u32::try_from(sorted.iter().filter(|&&e| e > now_ms).count()).unwrap_or(u32::MAX);
    }
    let days_of_cover = (rate > 0.0).then(|| f64::from(usable) / rate);
    let reorder_point = (rate * f64::from(policy.lead_time_days + policy.safety_days)).ceil() as u32;
    let target =
        (rate * f64::from(policy.lead_time_days + policy.review_days + policy.safety_days)).ceil() as u32;
    let suggested_order =
        if rate > 0.0 && usable <= reorder_point { target.saturating_sub(usable) } else { 0 };
    let mut alerts = Vec::new();
    if let Some(days) = days_of_cover {
        if days < f64::from(policy.lead_time_days) {
            alerts.push(Alert::RunsOut { days_of_cover: days, lead_time_days: policy.lead_time_days });
        } else if usable <= reorder_point {
            alerts.push(Alert::Reorder { usable, reorder_point });
        }
    }
    if let Some(first_expiry_ms) = first_expiring {
        alerts.push(Alert::ExpiresBeforeUse { count: expiring, first_expiry_ms });
    }
    Position { rate_per_day: rate, on_hand, usable, days_of_cover, reorder_point, suggested_order, alerts }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const DAY: i64 = 86_400_000;

    #[test]
    fn cover_reorder_point_and_order_follow_the_rate() {
        // 28 runs in 14 days: 2 a day. 10 cartridges far from expiry: 5 days of cover.
        let stock = vec![NOW + 365 * DAY; 10];
        let p = position(&stock, 28, Policy::with_lead_time(5), NOW);
        assert_eq!(p.rate_per_day, 2.0);
        assert_eq!(p.days_of_cover, Some(5.0));
        // (5 + 2) days × 2.
        assert_eq!(p.reorder_point, 14);
        // (5 + 7 + 2) × 2 = 28, minus the 10 held.
        assert_eq!(p.suggested_order, 18);
        assert_eq!(p.alerts, vec![Alert::Reorder { usable: 10, reorder_point: 14 }]);
    }

    #[test]
    fn a_site_that_will_run_out_within_the_lead_time_is_told() {
        let p = position(&[NOW + 365 * DAY; 4], 28, Policy::with_lead_time(5), NOW);
        assert_eq!(p.days_of_cover, Some(2.0));
        assert_eq!(p.alerts[0].kind(), "runs-out");
        assert!(p.alerts[0].message().contains("2.0 days"), "{}", p.alerts[0].message());
    }

    #[test]
    fn stock_that_expires_before_its_turn_is_not_cover() {
        // One a day; 10 cartridges, 6 of them expire in 3 days: 3 are used in time.
        let mut stock = vec![NOW + 3 * DAY + 1; 6];
        stock.extend([NOW + 100 * DAY; 4]);
        let p = position(&stock, 14, Policy::with_lead_time(2), NOW);
        assert_eq!((p.on_hand, p.usable), (10, 7));
        assert_eq!(
            p.alerts.last(),
            Some(&Alert::ExpiresBeforeUse { count: 3, first_expiry_ms: NOW + 3 * DAY + 1 })
        );
    }

    #[test]
    fn no_consumption_means_no_order_and_no_alarm() {
        let p = position(&[NOW + DAY, NOW - DAY], 0, Policy::with_lead_time(5), NOW);
        assert_eq!((p.usable, p.suggested_order, p.days_of_cover), (1, 0, None));
        assert!(p.alerts.is_empty());
    }

    #[test]
    fn an_empty_site_with_demand_orders_a_full_cycle() {
        // 7 in 14 days: half a cartridge a day; (3 + 7 + 2) days of it.
        let p = position(&[], 7, Policy::with_lead_time(3), NOW);
        assert_eq!(p.days_of_cover, Some(0.0));
        assert_eq!(p.suggested_order, 6);
        assert_eq!(p.alerts[0].kind(), "runs-out");
    }
}
