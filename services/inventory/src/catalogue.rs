//! The catalogue: cartridge types (one per GTIN-14) and their lots, with the rules a
//! new entry must meet and the lot's release status.

use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::gs1;

/// Temperature band a cartridge type must be kept in (DOMAIN: storage classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageClass {
    /// -90 to -60 °C.
    UltraCold,
    /// -25 to -15 °C.
    Frozen,
    /// 2 to 8 °C.
    Refrigerated,
}

impl StorageClass {
    pub const ALL: [StorageClass; 3] =
        [StorageClass::UltraCold, StorageClass::Frozen, StorageClass::Refrigerated];

    /// Lowest and highest allowed temperature, °C.
    pub fn range_c(self) -> (f64, f64) {
        match self {
            StorageClass::UltraCold => (-90.0, -60.0),
            StorageClass::Frozen => (-25.0, -15.0),
            StorageClass::Refrigerated => (2.0, 8.0),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StorageClass::UltraCold => "ultra-cold",
            StorageClass::Frozen => "frozen",
            StorageClass::Refrigerated => "refrigerated",
        }
    }

    pub fn parse(s: &str) -> Result<StorageClass, Invalid> {
        StorageClass::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            Invalid::new(
                "storage_class",
                s,
                "ultra-cold (-90 to -60 °C), frozen (-25 to -15 °C) or refrigerated (2 to 8 °C)",
            )
        })
    }
}

/// A kind of cartridge, identified by its GTIN-14.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartridgeType {
    pub gtin: String,
    pub name: String,
    /// What the cartridge holds (e.g. the mRNA construct and lipid mix).
    pub payload: String,
    pub volume_ml: f64,
    pub storage_class: StorageClass,
    /// Minutes outside the storage class a cartridge may accumulate before it is
    /// blocked.
    pub excursion_limit_min: u32,
    /// Device models that take it; empty: every model.
    pub device_models: Vec<String>,
    /// Days from order to receipt at a site.
    pub lead_time_days: u32,
}

/// Longest name, payload or model taken.
pub const MAX_TEXT: usize = 120;
/// Longest lot number (GS1 AI 10).
pub const MAX_LOT: usize = 20;
/// Most cartridges one lot holds.
pub const MAX_LOT_QUANTITY: u32 = 20_000;

fn text(field: &'static str, v: &str, max: usize) -> Result<(), Invalid> {
    if v.trim().is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(Invalid::new(field, v, &format!("1 to {max} printable characters")));
    }
    Ok(())
}

impl CartridgeType {
    /// Checks every field; the first problem is returned.
    pub fn validate(&self) -> Result<(), Invalid> {
        gs1::check_gtin(&self.gtin).map_err(|e| Invalid::new("gtin", &self.gtin, &e.to_string()))?;
        text("name", &self.name, MAX_TEXT)?;
        text("payload", &self.payload, MAX_TEXT)?;
        if !(self.volume_ml.is_finite() && self.volume_ml > 0.0 && self.volume_ml <= 100.0) {
            return Err(Invalid::new(
                "volume_ml",
                &self.volume_ml.to_string(),
                "more than 0 and at most 100 mL",
            ));
        }
        if self.excursion_limit_min > 7 * 24 * 60 {
            return Err(Invalid::new(
                "excursion_limit_min",
                &self.excursion_limit_min.to_string(),
                "0 to 10080 minutes (one week)",
            ));
        }
        for m in &self.device_models {
            text("device_models", m, MAX_TEXT)?;
        }
        if !(1..=365).contains(&self.lead_time_days) {
            return Err(Invalid::new("lead_time_days", &self.lead_time_days.to_string(), "1 to 365 days"));
        }
        Ok(())
    }

    /// Whether a device of `model` takes this type.
    pub fn fits_model(&self, model: &str) -> bool {
        self.device_models.is_empty() || self.device_models.iter().any(|m| m == model)
    }
}

/// Where a lot stands: made and tested (quarantine), released by QA for use, or
/// recalled for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LotStatus {
    Quarantine,
    Released,
    Recalled,
}

impl LotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LotStatus::Quarantine => "quarantine",
            LotStatus::Released => "released",
            LotStatus::Recalled => "recalled",
        }
    }

    pub fn parse(s: &str) -> Option<LotStatus> {
        [LotStatus::Quarantine, LotStatus::Released, LotStatus::Recalled]
            .into_iter()
            .find(|l| l.as_str() == s)
    }

    /// Whether a lot may go from `self` to `to`: quarantine → released → recalled, or
    /// quarantine → recalled. A recall is final.
    pub fn can_become(self, to: LotStatus) -> bool {
        matches!(
            (self, to),
            (LotStatus::Quarantine, LotStatus::Released)
                | (LotStatus::Quarantine, LotStatus::Recalled)
                | (LotStatus::Released, LotStatus::Recalled)
        )
    }
}

/// One production lot of a cartridge type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lot {
    pub gtin: String,
    pub lot: String,
    pub produced: Date,
    pub expires: Date,
    pub quantity: u32,
    pub status: LotStatus,
}

impl Lot {
    /// Checks a new lot: its number is a GS1 lot, its dates are in order and not
    /// already past, and its quantity is sensible.
    pub fn validate(&self, today: Date) -> Result<(), Invalid> {
        check_lot_number(&self.lot)?;
        if self.expires <= self.produced {
            return Err(Invalid::new(
                "expires",
                &self.expires.to_string(),
                &format!("a date after production ({})", self.produced),
            ));
        }
        if self.expires < today {
            return Err(Invalid::new(
                "expires",
                &self.expires.to_string(),
                &format!("today ({today}) or later"),
            ));
        }
        if self.produced > today {
            return Err(Invalid::new(
                "produced",
                &self.produced.to_string(),
                &format!("today ({today}) or earlier"),
            ));
        }
        if !(1..=MAX_LOT_QUANTITY).contains(&self.quantity) {
            return Err(Invalid::new("quantity", &self.quantity.to_string(), "1 to 20000 cartridges"));
        }
        Ok(())
    }

    /// The serial of cartridge `n` (from 1) of the lot, as printed in its code.
    pub fn serial(&self, n: u32) -> String {
        format!("{}{n:06}", serial_prefix(&self.lot))
    }
}

/// Serials are the lot's last four characters and a six-digit number, so a serial
/// stays within GS1's 20 characters and names its lot to a person reading it.
fn serial_prefix(lot: &str) -> String {
    let chars: Vec<char> = lot.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect::<String>() + "-"
}

/// A lot number as GS1 AI (10) allows: 1 to 20 characters of set 82.
pub fn check_lot_number(lot: &str) -> Result<(), Invalid> {
    match gs1::parse(&format!("(10){lot}"), 2000) {
        Ok(s) if s.lot.as_deref() == Some(lot) => Ok(()),
        Ok(_) => Err(Invalid::new("lot", lot, "one GS1 lot number")),
        Err(e) => Err(Invalid::new("lot", lot, &e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind() -> CartridgeType {
        CartridgeType {
            gtin: "09506000134352".into(),
            name: "FIX-LNP 2 mL".into(),
            payload: "factor IX mRNA, SM-102 lipid mix".into(),
            volume_ml: 2.0,
            storage_class: StorageClass::UltraCold,
            excursion_limit_min: 30,
            device_models: vec!["NF-200".into()],
            lead_time_days: 5,
        }
    }

    #[test]
    fn a_type_names_its_bad_field() {
        assert!(kind().validate().is_ok());
        let mut k = kind();
        k.gtin = "09506000134353".into();
        let e = k.validate().unwrap_err();
        assert_eq!(e.field, "gtin");
        assert!(e.to_string().contains("check digit 3"), "{e}");
        let mut k = kind();
        k.volume_ml = 0.0;
        assert_eq!(
            k.validate().unwrap_err().to_string(),
            "volume_ml = \"0\": allowed more than 0 and at most 100 mL"
        );
        let mut k = kind();
        k.lead_time_days = 0;
        assert_eq!(k.validate().unwrap_err().field, "lead_time_days");
        assert_eq!(StorageClass::parse("warm").unwrap_err().field, "storage_class");
        assert_eq!(StorageClass::parse("frozen").unwrap().range_c(), (-25.0, -15.0));
    }

    #[test]
    fn lots_move_forward_only() {
        use LotStatus::*;
        assert!(Quarantine.can_become(Released));
        assert!(Released.can_become(Recalled));
        assert!(Quarantine.can_become(Recalled));
        assert!(!Recalled.can_become(Released));
        assert!(!Released.can_become(Quarantine));
        assert!(!Released.can_become(Released));
    }

    #[test]
    fn a_lot_checks_its_number_dates_and_quantity() {
        let today = Date::constant(2026, 11, 27);
        let lot = Lot {
            gtin: kind().gtin,
            lot: "LNP2611A".into(),
            produced: Date::constant(2026, 11, 2),
            expires: Date::constant(2027, 5, 31),
            quantity: 500,
            status: LotStatus::Quarantine,
        };
        assert!(lot.validate(today).is_ok());
        assert_eq!(lot.serial(7), "611A-000007");
        let mut l = lot.clone();
        l.lot = "A".repeat(21);
        assert!(l.validate(today).unwrap_err().to_string().contains("at most 20"));
        let mut l = lot.clone();
        l.lot = "LOT 1".into();
        assert_eq!(l.validate(today).unwrap_err().field, "lot");
        let mut l = lot.clone();
        l.expires = l.produced;
        assert_eq!(l.validate(today).unwrap_err().field, "expires");
        let mut l = lot.clone();
        l.quantity = 0;
        assert_eq!(l.validate(today).unwrap_err().field, "quantity");
    }
}
