//! A serialised cartridge's life as events, and where each event may take it.
//!
//! A cartridge is made (registered with its lot), shipped to a site, received there
//! with a scan, stored, loaded into a device, and consumed by a run; or it is wasted,
//! expires or is blocked on the way. [`apply`] is the only way a cartridge's state
//! changes: it takes the state the earlier events left and one more event, and gives
//! the new state or a refusal saying why. Stock is the count of cartridges whose
//! state says they are usable at a site, so it cannot go below zero, and replaying
//! the events gives the same stock again.

use serde::{Deserialize, Serialize};

/// What happened to a cartridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Movement {
    /// Registered with its lot at manufacture.
    Made,
    /// Sent from the manufacturer to a site.
    Shipped {
        shipment_id: String,
        to_site: String,
    },
    /// Scanned in at the site.
    Received {
        site: String,
    },
    /// Put away at its site.
    Stored {
        location: String,
    },
    /// Loaded into a device, as the device's scanner read it.
    Loaded {
        device: String,
        site: String,
    },
    /// Used by a run; the device's batch record says so.
    Consumed {
        batch_id: String,
        device: String,
        site: String,
    },
    Wasted {
        reason: String,
    },
    /// Past its expiry date while unused.
    Expired,
    /// Out of use: too long outside its storage class, or a fault found.
    Blocked {
        reason: String,
    },
}

impl Movement {
    pub fn kind(&self) -> &'static str {
        match self {
            Movement::Made => "made",
            Movement::Shipped { .. } => "shipped",
            Movement::Received { .. } => "received",
            Movement::Stored { .. } => "stored",
            Movement::Loaded { .. } => "loaded",
            Movement::Consumed { .. } => "consumed",
            Movement::Wasted { .. } => "wasted",
            Movement::Expired => "expired",
            Movement::Blocked { .. } => "blocked",
        }
    }
}

/// Where a cartridge's events left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// At the manufacturer, not shipped.
    Made,
    InTransit,
    /// At a site, usable.
    InStock,
    /// In a device, usable.
    Loaded,
    Consumed,
    Wasted,
    Expired,
    Blocked,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Made,
        Status::InTransit,
        Status::InStock,
        Status::Loaded,
        Status::Consumed,
        Status::Wasted,
        Status::Expired,
        Status::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Made => "made",
            Status::InTransit => "in-transit",
            Status::InStock => "in-stock",
            Status::Loaded => "loaded",
            Status::Consumed => "consumed",
            Status::Wasted => "wasted",
            Status::Expired => "expired",
            Status::Blocked => "blocked",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Counts as stock at its site.
    pub fn is_stock(self) -> bool {
        matches!(self, Status::InStock | Status::Loaded)
    }

    /// Nothing more can happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Consumed | Status::Wasted)
    }
}

/// A cartridge's state: the fold of its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub status: Status,
    /// The site it is at or travelling to.
    pub site: Option<String>,
    /// The device it is loaded into or was consumed by.
    pub device: Option<String>,
    pub shipment_id: Option<String>,
    pub location: Option<String>,
    /// The batch that consumed it.
    pub batch_id: Option<String>,
}

/// Why an event cannot apply to a cartridge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the cartridge is not registered with any lot")]
    Unknown,
    #[error("the cartridge is already registered")]
    AlreadyMade,
    #[error("the cartridge was shipped to site {expected}, not {got}")]
    WrongSite { expected: String, got: String },
    #[error("the cartridge was already consumed by batch {batch_id} on {device}; a cartridge runs once")]
    AlreadyConsumed { batch_id: String, device: String },
    #[error("the cartridge is loaded in {device}, not {got}")]
    OtherDevice { device: String, got: String },
    #[error("a cartridge that is {status} cannot be {movement}")]
    NotNow { status: &'static str, movement: &'static str },
}

/// The state `event` leaves a cartridge in, given the state before (`None`: never
/// seen).
pub fn apply(before: Option<&State>, event: &Movement) -> Result<State, Refused> {
    let Some(s) = before else {
        return match event {
            Movement::Made => Ok(State {
                status: Status::Made,
                site: None,
                device: None,
                shipment_id: None,
                location: None,
                batch_id: None,
            }),
            _ => Err(Refused::Unknown),
        };
    };
    let not_now = || Refused::NotNow { status: s.status.as_str(), movement: event.kind() };
    let at_site = |site: &str| -> Result<(), Refused> {
        match &s.site {
            Some(here) if here == site => Ok(()),
            Some(here) => Err(Refused::WrongSite { expected: here.clone(), got: site.to_owned() }),
            None => Err(not_now()),
        }
    };
    let mut next = s.clone();
    match (s.status, event) {
        (_, Movement::Made) => return Err(Refused::AlreadyMade),
        (Status::Consumed, _) => {
            return Err(Refused::AlreadyConsumed {
                batch_id: s.batch_id.clone().unwrap_or_default(),
                device: s.device.clone().unwrap_or_default(),
            });
        }
        (Status::Made, Movement::Shipped { shipment_id, to_site }) => {
            next.status = Status::InTransit;
            next.site = Some(to_site.clone());
            next.shipment_id = Some(shipment_id.clone());
        }
        (Status::InTransit, Movement::Received { site }) => {
            at_site(site)?;
            next.status = Status::InStock;
        }
        (Status::InStock, Movement::Stored { location }) => next.location = Some(location.clone()),
        // A load is a fact the device's scanner reports: a cartridge loaded before it
        // was scanned in at its site has arrived there.
        (Status::InStock | Status::InTransit, Movement::Loaded { device, site }) => {
            at_site(site)?;
            next.status = Status::Loaded;
            next.device = Some(device.clone());
        }
        (Status::Loaded, Movement::Loaded { device, site }) => {
            at_site(site)?;
            if s.device.as_ref() != Some(device) {
                return Err(Refused::OtherDevice {
                    device: s.device.clone().unwrap_or_default(),
                    got: device.clone(),
                });
            }
        }
        // A run is a fact the device reports after it happened: it is recorded even
        // when the cartridge had been blocked or had expired meanwhile (the device's
        // deny list was older), or was never scanned in at its site. Only a second use
        // and a use at another site are refused.
        (
            Status::InStock | Status::Loaded | Status::InTransit | Status::Blocked | Status::Expired,
            Movement::Consumed { batch_id, device, site },
        ) => {
            at_site(site)?;
            if s.status == Status::Loaded && s.device.as_ref() != Some(device) {
                return Err(Refused::OtherDevice {
                    device: s.device.clone().unwrap_or_default(),
                    got: device.clone(),
                });
            }
            next.status = Status::Consumed;
            next.device = Some(device.clone());
            next.batch_id = Some(batch_id.clone());
        }
        (
            Status::InTransit | Status::InStock | Status::Loaded | Status::Blocked | Status::Expired,
            Movement::Wasted { .. },
        ) => {
            next.status = Status::Wasted;
        }
        (Status::Made | Status::InTransit | Status::InStock | Status::Loaded, Movement::Expired) => {
            next.status = Status::Expired;
        }
        (Status::Made | Status::InTransit | Status::InStock | Status::Loaded, Movement::Blocked { .. }) => {
            next.status = Status::Blocked;
        }
        _ => return Err(not_now()),
    }
    Ok(next)
}

/// The state a series of events leaves a cartridge in; the first refusal stops it.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a Movement>) -> Result<Option<State>, Refused> {
    let mut state = None;
    for e in events {
        state = Some(apply(state.as_ref(), e)?);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(to: &str) -> Movement {
        Movement::Shipped { shipment_id: "SH-1".into(), to_site: to.into() }
    }

    fn consumed(batch: &str, device: &str, site: &str) -> Movement {
        Movement::Consumed { batch_id: batch.into(), device: device.into(), site: site.into() }
    }

    #[test]
    fn a_cartridge_goes_from_manufacture_to_a_run() {
        let events = [
            Movement::Made,
            shipped("site-a"),
            Movement::Received { site: "site-a".into() },
            Movement::Stored { location: "freezer 2".into() },
            Movement::Loaded { device: "dev-1".into(), site: "site-a".into() },
            consumed("B-1", "dev-1", "site-a"),
        ];
        let mut state = None;
        let mut stock = Vec::new();
        for e in &events {
            state = Some(apply(state.as_ref(), e).unwrap());
            stock.push(state.as_ref().unwrap().status.is_stock());
        }
        assert_eq!(stock, [false, false, true, true, true, false]);
        let s = state.unwrap();
        assert_eq!(s.status, Status::Consumed);
        assert_eq!(s.batch_id.as_deref(), Some("B-1"));
        assert_eq!(s.location.as_deref(), Some("freezer 2"));
        assert_eq!(replay(&events).unwrap(), Some(s));
    }

    #[test]
    fn receipt_at_another_site_is_refused() {
        let s = replay(&[Movement::Made, shipped("site-a")]).unwrap().unwrap();
        let e = apply(Some(&s), &Movement::Received { site: "site-b".into() }).unwrap_err();
        assert_eq!(e.to_string(), "the cartridge was shipped to site site-a, not site-b");
    }

    #[test]
    fn a_second_run_on_a_cartridge_is_refused() {
        let s = replay(&[
            Movement::Made,
            shipped("site-a"),
            Movement::Received { site: "site-a".into() },
            consumed("B-1", "dev-1", "site-a"),
        ])
        .unwrap()
        .unwrap();
        let e = apply(Some(&s), &consumed("B-2", "dev-2", "site-a")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the cartridge was already consumed by batch B-1 on dev-1; a cartridge runs once"
        );
        assert!(matches!(
            apply(Some(&s), &Movement::Wasted { reason: "x".into() }),
            Err(Refused::AlreadyConsumed { .. })
        ));
    }

    #[test]
    fn a_run_on_a_blocked_cartridge_is_still_recorded() {
        let s = replay(&[
            Movement::Made,
            shipped("site-a"),
            Movement::Received { site: "site-a".into() },
            Movement::Blocked { reason: "42 min outside -90 to -60 °C".into() },
        ])
        .unwrap()
        .unwrap();
        assert!(!s.status.is_stock());
        assert_eq!(apply(Some(&s), &consumed("B-9", "dev-1", "site-a")).unwrap().status, Status::Consumed);
        assert!(matches!(
            apply(Some(&s), &Movement::Loaded { device: "d".into(), site: "site-a".into() }),
            Err(Refused::NotNow { .. })
        ));
    }

    #[test]
    fn a_load_before_the_scan_in_means_the_cartridge_arrived() {
        let s = replay(&[Movement::Made, shipped("site-a")]).unwrap().unwrap();
        let loaded =
            apply(Some(&s), &Movement::Loaded { device: "dev-1".into(), site: "site-a".into() }).unwrap();
        assert_eq!((loaded.status, loaded.device.as_deref()), (Status::Loaded, Some("dev-1")));
        assert_eq!(
            apply(Some(&s), &Movement::Loaded { device: "dev-9".into(), site: "site-b".into() }),
            Err(Refused::WrongSite { expected: "site-a".into(), got: "site-b".into() })
        );
    }

    #[test]
    fn events_out_of_order_are_refused() {
        assert_eq!(apply(None, &shipped("a")), Err(Refused::Unknown));
        let made = apply(None, &Movement::Made).unwrap();
        assert_eq!(apply(Some(&made), &Movement::Made), Err(Refused::AlreadyMade));
        assert_eq!(
            apply(Some(&made), &Movement::Received { site: "a".into() }).unwrap_err().to_string(),
            "a cartridge that is made cannot be received"
        );
        let loaded = replay(&[
            Movement::Made,
            shipped("a"),
            Movement::Received { site: "a".into() },
            Movement::Loaded { device: "d1".into(), site: "a".into() },
        ])
        .unwrap()
        .unwrap();
        assert!(matches!(apply(Some(&loaded), &consumed("B", "d2", "a")), Err(Refused::OtherDevice { .. })));
        assert!(matches!(apply(Some(&loaded), &consumed("B", "d1", "b")), Err(Refused::WrongSite { .. })));
    }
}
