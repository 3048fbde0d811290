//! Cartridge inventory: the catalogue, serialised cartridges and their events,
//! shipments, the cartridge each batch used, recalls and deny lists.
//!
//! A cartridge's row holds the state its events left it in. Every change writes the
//! event and the new row together, and only if the row is still at the version the
//! caller read: two changes to one cartridge at once cannot both apply.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Error, Result, Store, append_audit_in};

#[derive(Debug, Clone, PartialEq)]
pub struct CartridgeTypeRow {
    pub gtin: String,
    pub name: String,
    pub payload: String,
    pub volume_ml: f64,
    pub storage_class: String,
    pub excursion_limit_min: i64,
    /// Comma-separated; empty: every model.
    pub device_models: String,
    pub lead_time_days: i64,
    pub created_by: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LotRow {
    pub gtin: String,
    pub lot: String,
    /// ISO dates.
    pub produced: String,
    pub expires: String,
    /// The last millisecond of the expiry day (UTC).
    pub expires_ms: i64,
    pub quantity: i64,
    /// `quarantine`, `released` or `recalled`.
    pub status: String,
    pub status_reason: String,
    pub status_by: String,
    pub status_ms: i64,
    pub created_ms: i64,
}

/// A serialised cartridge as its events left it; empty strings for none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartridgeRow {
    pub gtin: String,
    pub serial: String,
    pub lot: String,
    pub status: String,
    pub site_id: String,
    pub device_id: String,
    pub shipment_id: String,
    pub location: String,
    pub batch_id: String,
    pub expires_ms: i64,
    /// Events applied so far.
    pub version: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartridgeEvent {
    /// Assigned by the store; 0 before.
    pub id: i64,
    pub gtin: String,
    pub serial: String,
    pub lot: String,
    pub kind: String,
    pub site_id: String,
    pub device_id: String,
    pub at_ms: i64,
    pub actor: String,
    /// The event as JSON.
    pub detail: String,
}

/// One cartridge's change: the event and the row it leaves, written only if the row
/// is still at `row.version - 1` (a new cartridge: version 1, no row before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartridgeMove {
    pub row: CartridgeRow,
    pub event: CartridgeEvent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShipmentRow {
    pub shipment_id: String,
    pub site_id: String,
    pub gtin: String,
    pub lot: String,
    pub count: i64,
    pub sent_by: String,
    pub sent_ms: i64,
    pub received_count: i64,
    pub received_ms: i64,
    /// Logger readings as JSON.
    pub readings: String,
    pub excursion_minutes: f64,
    pub blocked: bool,
}

/// The cartridge a batch used, as the device's signed record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartridgeUse {
    pub batch_id: String,
    pub gtin: String,
    pub lot: String,
    pub serial: String,
    pub device_id: String,
    pub site_id: String,
    pub prescription_id: String,
    pub patient_pseudonym: String,
    pub started_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallRow {
    pub recall_id: String,
    pub gtin: String,
    pub lot: String,
    pub reason: String,
    pub signer_id: String,
    pub printed_name: String,
    pub signed_ms: i64,
    pub deny_version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyListRow {
    pub version: i64,
    pub issued_ms: i64,
    pub signer_id: String,
    pub lots: i64,
    pub cartridges: i64,
    /// The encoded, signed DSSE envelope.
    pub envelope: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyAckRow {
    pub device_id: String,
    pub version: i64,
    /// `accepted` or `refused`.
    pub result: String,
    pub code: String,
    pub reason: String,
    pub acked_ms: i64,
}

/// A usable cartridge held at a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCartridge {
    pub site_id: String,
    pub gtin: String,
    pub lot: String,
    pub status: String,
    pub expires_ms: i64,
}

const TYPE_COLUMNS: &str = "gtin, name, payload, volume_ml, storage_class, excursion_limit_min, device_models, \
     lead_time_days, created_by, created_ms";
const LOT_COLUMNS: &str = "gtin, lot, produced, expires, expires_ms, quantity, status, status_reason, status_by, status_ms, created_ms";
const CARTRIDGE_COLUMNS: &str = "gtin, serial, lot, status, site_id, device_id, shipment_id, location, batch_id, \
     expires_ms, version, updated_ms";
const EVENT_COLUMNS: &str = "id, gtin, serial, lot, kind, site_id, device_id, at_ms, actor, detail";
const SHIPMENT_COLUMNS: &str = "shipment_id, site_id, gtin, lot, count, sent_by, sent_ms, received_count, \
     received_ms, readings, excursion_minutes, blocked";
const USE_COLUMNS: &str =
    "batch_id, gtin, lot, serial, device_id, site_id, prescription_id, patient_pseudonym, started_ms";

fn type_from(r: &AnyRow) -> Result<CartridgeTypeRow> {
    Ok(CartridgeTypeRow {
        gtin: r.try_get(0)?,
        name: r.try_get(1)?,
        payload: r.try_get(2)?,
        volume_ml: r.try_get(3)?,
        storage_class: r.try_get(4)?,
        excursion_limit_min: r.try_get(5)?,
        device_models: r.try_get(6)?,
        lead_time_days: r.try_get(7)?,
        created_by: r.try_get(8)?,
        created_ms: r.try_get(9)?,
    })
}

fn lot_from(r: &AnyRow) -> Result<LotRow> {
    Ok(LotRow {
        gtin: r.try_get(0)?,
        lot: r.try_get(1)?,
        produced: r.try_get(2)?,
        expires: r.try_get(3)?,
        expires_ms: r.try_get(4)?,
        quantity: r.try_get(5)?,
        status: r.try_get(6)?,
        status_reason: r.try_get(7)?,
        status_by: r.try_get(8)?,
        status_ms: r.try_get(9)?,
        created_ms: r.try_get(10)?,
    })
}

fn cartridge_from(r: &AnyRow) -> Result<CartridgeRow> {
    Ok(CartridgeRow {
        gtin: r.try_get(0)?,
        serial: r.try_get(1)?,
        lot: r.try_get(2)?,
        status: r.try_get(3)?,
        site_id: r.try_get(4)?,
        device_id: r.try_get(5)?,
        shipment_id: r.try_get(6)?,
        location: r.try_get(7)?,
        batch_id: r.try_get(8)?,
        expires_ms: r.try_get(9)?,
        version: r.try_get(10)?,
        updated_ms: r.try_get(11)?,
    })
}

fn event_from(r: &AnyRow) -> Result<CartridgeEvent> {
    Ok(CartridgeEvent {
        id: r.try_get(0)?,
        gtin: r.try_get(1)?,
        serial: r.try_get(2)?,
        lot: r.try_get(3)?,
        kind: r.try_get(4)?,
        site_id: r.try_get(5)?,
        device_id: r.try_get(6)?,
        at_ms: r.try_get(7)?,
        actor: r.try_get(8)?,
        detail: r.try_get(9)?,
    })
}

fn shipment_from(r: &AnyRow) -> Result<ShipmentRow> {
    Ok(ShipmentRow {
        shipment_id: r.try_get(0)?,
        site_id: r.try_get(1)?,
        gtin: r.try_get(2)?,
        lot: r.try_get(3)?,
        count: r.try_get(4)?,
        sent_by: r.try_get(5)?,
        sent_ms: r.try_get(6)?,
        received_count: r.try_get(7)?,
        received_ms: r.try_get(8)?,
        readings: r.try_get(9)?,
        excursion_minutes: r.try_get(10)?,
        blocked: r.try_get::<i64, _>(11)? != 0,
    })
}

fn use_from(r: &AnyRow) -> Result<CartridgeUse> {
    Ok(CartridgeUse {
        batch_id: r.try_get(0)?,
        gtin: r.try_get(1)?,
        lot: r.try_get(2)?,
        serial: r.try_get(3)?,
        device_id: r.try_get(4)?,
        site_id: r.try_get(5)?,
        prescription_id: r.try_get(6)?,
        patient_pseudonym: r.try_get(7)?,
        started_ms: r.try_get(8)?,
    })
}

fn deny_from(r: &AnyRow) -> Result<DenyListRow> {
    Ok(DenyListRow {
        version: r.try_get(0)?,
        issued_ms: r.try_get(1)?,
        signer_id: r.try_get(2)?,
        lots: r.try_get(3)?,
        cartridges: r.try_get(4)?,
        envelope: r.try_get(5)?,
    })
}

/// Writes the moves: each event appended and its row inserted (version 1) or updated
/// from the version before. A row changed meanwhile is a conflict naming it.
async fn apply_moves_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, moves: &[CartridgeMove]) -> Result<()> {
    for m in moves {
        let r = &m.row;
        let insert = format!(
            "INSERT INTO cartridges ({CARTRIDGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (gtin, serial) DO NOTHING"
        );
        let done = if r.version == 1 {
            sqlx::query(&insert)
        } else {
            sqlx::query(
                "UPDATE cartridges SET lot = $3, status = $4, site_id = $5, device_id = $6, shipment_id = $7, \
                 location = $8, batch_id = $9, expires_ms = $10, version = $11, updated_ms = $12 \
                 WHERE gtin = $1 AND serial = $2 AND version = $11 - 1",
            )
        }
        .bind(&r.gtin)
        .bind(&r.serial)
        .bind(&r.lot)
        .bind(&r.status)
        .bind(&r.site_id)
        .bind(&r.device_id)
        .bind(&r.shipment_id)
        .bind(&r.location)
        .bind(&r.batch_id)
        .bind(r.expires_ms)
        .bind(r.version)
        .bind(r.updated_ms)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(Error::Conflict(format!(
                "cartridge {} serial {} changed meanwhile (or exists already); read it again",
                r.gtin, r.serial
            )));
        }
        let e = &m.event;
        sqlx::query(
            "INSERT INTO cartridge_events (gtin, serial, lot, kind, site_id, device_id, at_ms, actor, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&e.gtin)
        .bind(&e.serial)
        .bind(&e.lot)
        .bind(&e.kind)
        .bind(&e.site_id)
        .bind(&e.device_id)
        .bind(e.at_ms)
        .bind(&e.actor)
        .bind(&e.detail)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Store {
    // === catalogue ===

    /// Adds a cartridge type; a conflict when its GTIN is taken.
    pub async fn insert_cartridge_type(&self, t: &CartridgeTypeRow, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(&format!(
            "INSERT INTO cartridge_types ({TYPE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (gtin) DO NOTHING"
        ))
        .bind(&t.gtin)
        .bind(&t.name)
        .bind(&t.payload)
        .bind(t.volume_ml)
        .bind(&t.storage_class)
        .bind(t.excursion_limit_min)
        .bind(&t.device_models)
        .bind(t.lead_time_days)
        .bind(&t.created_by)
        .bind(t.created_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("cartridge type {} exists already", t.gtin)));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn cartridge_type(&self, gtin: &str) -> Result<Option<CartridgeTypeRow>> {
        sqlx::query(&format!("SELECT {TYPE_COLUMNS} FROM cartridge_types WHERE gtin = $1"))
            .bind(gtin)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(type_from)
            .transpose()
    }

    pub async fn cartridge_types(&self) -> Result<Vec<CartridgeTypeRow>> {
        sqlx::query(&format!("SELECT {TYPE_COLUMNS} FROM cartridge_types ORDER BY gtin"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(type_from)
            .collect()
    }

    /// Adds a lot with its cartridges (each with its `made` event); a conflict when
    /// the lot exists.
    pub async fn insert_lot(&self, lot: &LotRow, made: &[CartridgeMove], audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(&format!(
            "INSERT INTO lots ({LOT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (gtin, lot) DO NOTHING"
        ))
        .bind(&lot.gtin)
        .bind(&lot.lot)
        .bind(&lot.produced)
        .bind(&lot.expires)
        .bind(lot.expires_ms)
        .bind(lot.quantity)
        .bind(&lot.status)
        .bind(&lot.status_reason)
        .bind(&lot.status_by)
        .bind(lot.status_ms)
        .bind(lot.created_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("lot {} of {} exists already", lot.lot, lot.gtin)));
        }
        apply_moves_in(&mut tx, made).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn lot(&self, gtin: &str, lot: &str) -> Result<Option<LotRow>> {
        sqlx::query(&format!("SELECT {LOT_COLUMNS} FROM lots WHERE gtin = $1 AND lot = $2"))
            .bind(gtin)
            .bind(lot)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(lot_from)
            .transpose()
    }

    /// Lots, newest first; `lot` matches the lot number across types.
    pub async fn lots(
        &self,
        gtin: Option<&str>,
        lot: Option<&str>,
        status: Option<&str>,
    ) -> Result<Vec<LotRow>> {
        sqlx::query(&format!(
            "SELECT {LOT_COLUMNS} FROM lots WHERE ($1 = '' OR gtin = $1) AND ($2 = '' OR lot = $2) \
             AND ($3 = '' OR status = $3) ORDER BY created_ms DESC, lot"
        ))
        .bind(gtin.unwrap_or(""))
        .bind(lot.unwrap_or(""))
        .bind(status.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(lot_from)
        .collect()
    }

    /// Moves a lot from `from` to `to` status; a conflict when it is no longer `from`.
    pub async fn set_lot_status(&self, lot: &LotRow, from: &str, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        set_lot_status_in(&mut tx, lot, from).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Cartridges of a lot by site and status: `(site_id, status, count)`.
    pub async fn lot_whereabouts(&self, gtin: &str, lot: &str) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT site_id, status, COUNT(*) FROM cartridges WHERE gtin = $1 AND lot = $2 \
             GROUP BY site_id, status ORDER BY site_id, status",
        )
        .bind(gtin)
        .bind(lot)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
    }

    // === cartridges ===

    pub async fn cartridge(&self, gtin: &str, serial: &str) -> Result<Option<CartridgeRow>> {
        sqlx::query(&format!("SELECT {CARTRIDGE_COLUMNS} FROM cartridges WHERE gtin = $1 AND serial = $2"))
            .bind(gtin)
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(cartridge_from)
            .transpose()
    }

    /// Cartridges of a lot in one status, up to `limit`, by serial.
    pub async fn lot_cartridges(
        &self,
        gtin: &str,
        lot: &str,
        status: &str,
        limit: i64,
    ) -> Result<Vec<CartridgeRow>> {
        sqlx::query(&format!(
            "SELECT {CARTRIDGE_COLUMNS} FROM cartridges WHERE gtin = $1 AND lot = $2 AND status = $3 \
             ORDER BY serial LIMIT $4"
        ))
        .bind(gtin)
        .bind(lot)
        .bind(status)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(cartridge_from)
        .collect()
    }

    pub async fn shipment_cartridges(&self, shipment_id: &str) -> Result<Vec<CartridgeRow>> {
        sqlx::query(&format!(
            "SELECT {CARTRIDGE_COLUMNS} FROM cartridges WHERE shipment_id = $1 ORDER BY serial"
        ))
        .bind(shipment_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(cartridge_from)
        .collect()
    }

    /// Unused cartridges (made, in transit, in stock, loaded) whose expiry is before
    /// `now_ms`, up to `limit`.
    pub async fn cartridges_past_expiry(&self, now_ms: i64, limit: i64) -> Result<Vec<CartridgeRow>> {
        sqlx::query(&format!(
            "SELECT {CARTRIDGE_COLUMNS} FROM cartridges WHERE expires_ms < $1 \
             AND status IN ('made', 'in-transit', 'in-stock', 'loaded') ORDER BY expires_ms LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(cartridge_from)
        .collect()
    }

    /// A cartridge's events, oldest first.
    pub async fn cartridge_events(&self, gtin: &str, serial: &str) -> Result<Vec<CartridgeEvent>> {
        sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM cartridge_events WHERE gtin = $1 AND serial = $2 ORDER BY id"
        ))
        .bind(gtin)
        .bind(serial)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(event_from)
        .collect()
    }

    /// Applies moves (and an audit record) all together or not at all.
    pub async fn apply_moves(&self, moves: &[CartridgeMove], audit: Option<&AuditEntry>) -> Result<()> {
        let mut tx = self.begin().await?;
        apply_moves_in(&mut tx, moves).await?;
        if let Some(a) = audit {
            append_audit_in(&mut tx, a.clone()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // === shipments ===

    /// Records a shipment and its cartridges' `shipped` events.
    pub async fn insert_shipment(
        &self,
        s: &ShipmentRow,
        moves: &[CartridgeMove],
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO shipments ({SHIPMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&s.shipment_id)
        .bind(&s.site_id)
        .bind(&s.gtin)
        .bind(&s.lot)
        .bind(s.count)
        .bind(&s.sent_by)
        .bind(s.sent_ms)
        .bind(s.received_count)
        .bind(s.received_ms)
        .bind(&s.readings)
        .bind(s.excursion_minutes)
        .bind(i64::from(s.blocked))
        .execute(&mut *tx)
        .await?;
        apply_moves_in(&mut tx, moves).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn shipment(&self, id: &str) -> Result<Option<ShipmentRow>> {
        sqlx::query(&format!("SELECT {SHIPMENT_COLUMNS} FROM shipments WHERE shipment_id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(shipment_from)
            .transpose()
    }

    /// Shipments to a site (or all), newest first.
    pub async fn shipments(&self, site_id: Option<&str>, limit: i64) -> Result<Vec<ShipmentRow>> {
        sqlx::query(&format!(
            "SELECT {SHIPMENT_COLUMNS} FROM shipments WHERE ($1 = '' OR site_id = $1) ORDER BY sent_ms DESC LIMIT $2"
        ))
        .bind(site_id.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(shipment_from)
        .collect()
    }

    /// Records a receipt at the site: the shipment's readings and verdict, and the
    /// cartridges' events, together.
    pub async fn receive_shipment(
        &self,
        s: &ShipmentRow,
        moves: &[CartridgeMove],
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE shipments SET received_count = $2, received_ms = $3, readings = $4, excursion_minutes = $5, \
             blocked = $6 WHERE shipment_id = $1",
        )
        .bind(&s.shipment_id)
        .bind(s.received_count)
        .bind(s.received_ms)
        .bind(&s.readings)
        .bind(s.excursion_minutes)
        .bind(i64::from(s.blocked))
        .execute(&mut *tx)
        .await?;
        apply_moves_in(&mut tx, moves).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    // === stock ===

    /// Usable cartridges held (in stock or loaded, lot not recalled), at one site or
    /// all.
    pub async fn held_cartridges(&self, site_id: Option<&str>) -> Result<Vec<HeldCartridge>> {
        let rows = sqlx::query(
            "SELECT c.site_id, c.gtin, c.lot, c.status, c.expires_ms FROM cartridges c \
             JOIN lots l ON l.gtin = c.gtin AND l.lot = c.lot \
             WHERE c.status IN ('in-stock', 'loaded') AND l.status <> 'recalled' AND ($1 = '' OR c.site_id = $1)",
        )
        .bind(site_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HeldCartridge {
                    site_id: r.try_get(0)?,
                    gtin: r.try_get(1)?,
                    lot: r.try_get(2)?,
                    status: r.try_get(3)?,
                    expires_ms: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Cartridges consumed since `since_ms`: `(site_id, gtin, count)`.
    pub async fn consumed_since(
        &self,
        site_id: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT site_id, gtin, COUNT(*) FROM cartridge_events WHERE kind = 'consumed' AND at_ms >= $2 \
             AND ($1 = '' OR site_id = $1) GROUP BY site_id, gtin",
        )
        .bind(site_id.unwrap_or(""))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
    }

    // === trace ===

    /// Every batch that used a cartridge of the lot, oldest first.
    pub async fn lot_trace(&self, gtin: &str, lot: &str) -> Result<Vec<CartridgeUse>> {
        sqlx::query(&format!(
            "SELECT {USE_COLUMNS} FROM batch_cartridges WHERE lot = $2 AND gtin = $1 ORDER BY started_ms, batch_id"
        ))
        .bind(gtin)
        .bind(lot)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(use_from)
        .collect()
    }

    /// Batches whose cartridge, registered and at the batch's site, is not consumed:
    /// their consumption was cut off between the stored record and its event (a
    /// crash). Oldest first, up to `limit`.
    pub async fn unconsumed_uses(&self, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT b.batch_id FROM batch_cartridges b JOIN cartridges c ON c.gtin = b.gtin AND c.serial = b.serial \
             WHERE c.site_id = b.site_id AND c.status IN ('in-transit', 'in-stock', 'loaded', 'blocked', 'expired') \
             ORDER BY b.started_ms LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// The cartridge a batch used, if it is known.
    pub async fn batch_cartridge(&self, batch_id: &str) -> Result<Option<CartridgeUse>> {
        sqlx::query(&format!("SELECT {USE_COLUMNS} FROM batch_cartridges WHERE batch_id = $1"))
            .bind(batch_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(use_from)
            .transpose()
    }

    // === recalls and deny lists ===

    /// Recalls a lot: its status, the recall, the deny list that carries it, and the
    /// audit record, together. A conflict when the lot is no longer `from` or the deny
    /// list version is taken.
    pub async fn recall_lot(
        &self,
        lot: &LotRow,
        from: &str,
        recall: &RecallRow,
        deny: &DenyListRow,
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        set_lot_status_in(&mut tx, lot, from).await?;
        insert_deny_list_in(&mut tx, deny).await?;
        sqlx::query(
            "INSERT INTO recalls (recall_id, gtin, lot, reason, signer_id, printed_name, signed_ms, deny_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&recall.recall_id)
        .bind(&recall.gtin)
        .bind(&recall.lot)
        .bind(&recall.reason)
        .bind(&recall.signer_id)
        .bind(&recall.printed_name)
        .bind(recall.signed_ms)
        .bind(recall.deny_version)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a new deny list version (blocked cartridges changed), audited.
    pub async fn insert_deny_list(&self, deny: &DenyListRow, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_deny_list_in(&mut tx, deny).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn recalls(&self, gtin: Option<&str>, lot: Option<&str>) -> Result<Vec<RecallRow>> {
        let rows = sqlx::query(
            "SELECT recall_id, gtin, lot, reason, signer_id, printed_name, signed_ms, deny_version FROM recalls \
             WHERE ($1 = '' OR gtin = $1) AND ($2 = '' OR lot = $2) ORDER BY signed_ms DESC",
        )
        .bind(gtin.unwrap_or(""))
        .bind(lot.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RecallRow {
                    recall_id: r.try_get(0)?,
                    gtin: r.try_get(1)?,
                    lot: r.try_get(2)?,
                    reason: r.try_get(3)?,
                    signer_id: r.try_get(4)?,
                    printed_name: r.try_get(5)?,
                    signed_ms: r.try_get(6)?,
                    deny_version: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// The deny list in force: the newest version.
    pub async fn latest_deny_list(&self) -> Result<Option<DenyListRow>> {
        sqlx::query(
            "SELECT version, issued_ms, signer_id, lots, cartridges, envelope FROM deny_lists \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(deny_from)
        .transpose()
    }

    /// Keeps devices' answers about deny lists, in one transaction; an answer about an
    /// older version than the one recorded changes nothing.
    pub async fn record_deny_acks(&self, answers: &[DenyAckRow]) -> Result<()> {
        let mut tx = self.begin().await?;
        for a in answers {
            sqlx::query(
            "INSERT INTO deny_list_acks (device_id, version, result, code, reason, acked_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device_id) DO UPDATE SET version = excluded.version, \
             result = excluded.result, code = excluded.code, reason = excluded.reason, acked_ms = excluded.acked_ms \
             WHERE deny_list_acks.version <= excluded.version",
        )
            .bind(&a.device_id)
            .bind(a.version)
            .bind(&a.result)
            .bind(&a.code)
            .bind(&a.reason)
            .bind(a.acked_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn deny_acks(&self) -> Result<Vec<DenyAckRow>> {
        let rows = sqlx::query(
            "SELECT device_id, version, result, code, reason, acked_ms FROM deny_list_acks ORDER BY device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DenyAckRow {
                    device_id: r.try_get(0)?,
                    version: r.try_get(1)?,
                    result: r.try_get(2)?,
                    code: r.try_get(3)?,
                    reason: r.try_get(4)?,
                    acked_ms: r.try_get(5)?,
                })
            })
            .collect()
    }
}

async fn set_lot_status_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    lot: &LotRow,
    from: &str,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE lots SET status = $3, status_reason = $4, status_by = $5, status_ms = $6 \
         WHERE gtin = $1 AND lot = $2 AND status = $7",
    )
    .bind(&lot.gtin)
    .bind(&lot.lot)
    .bind(&lot.status)
    .bind(&lot.status_reason)
    .bind(&lot.status_by)
    .bind(lot.status_ms)
    .bind(from)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(Error::Conflict(format!("lot {} of {} is no longer {from}", lot.lot, lot.gtin)));
    }
    Ok(())
}

async fn insert_deny_list_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, d: &DenyListRow) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO deny_lists (version, issued_ms, signer_id, lots, cartridges, envelope) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (version) DO NOTHING",
    )
    .bind(d.version)
    .bind(d.issued_ms)
    .bind(&d.signer_id)
    .bind(d.lots)
    .bind(d.cartridges)
    .bind(&d.envelope)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(Error::Conflict(format!("deny list version {} exists already", d.version)));
    }
    Ok(())
}

/// Writes the cartridge a batch used, with the batch (see `insert_batch`).
pub(crate) async fn insert_use_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, u: &CartridgeUse) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO batch_cartridges ({USE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (batch_id) DO NOTHING"
    ))
    .bind(&u.batch_id)
    .bind(&u.gtin)
    .bind(&u.lot)
    .bind(&u.serial)
    .bind(&u.device_id)
    .bind(&u.site_id)
    .bind(&u.prescription_id)
    .bind(&u.patient_pseudonym)
    .bind(u.started_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
