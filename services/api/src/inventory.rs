//! Cartridge inventory: the catalogue, lots, shipments and receipts, movements at
//! the site, consumption by runs, stock with replenishment, and recalls that reach
//! every device as a signed deny list. Transport-free, like [`crate::Fleet`]; the
//! rules live in `nanofleet_inventory`, this module reads, decides with them and
//! writes the event with the state it leaves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use jiff::civil::Date;
use nanofleet_inventory::catalogue::{self, CartridgeType, Lot, LotStatus, StorageClass};
use nanofleet_inventory::coldchain::{self, Reading};
use nanofleet_inventory::movement::{self, Movement, State, Status};
use nanofleet_inventory::replenish::{self, Policy};
use nanofleet_inventory::{denylist, gs1};
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{self as dev, Ack, AckResult, DeniedCartridge, DeniedLot, DenyList};
use nanofleet_proto::topics::Command;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{
    AuditEntry, CartridgeEvent, CartridgeMove, CartridgeRow, CartridgeTypeRow, CartridgeUse, DenyAckRow,
    DenyListRow, LotRow, RecallRow, ShipmentRow, Store,
};
use tokio::sync::{mpsc, oneshot};

use crate::trust::conflict_or;
use crate::{Actor, Caller, Deliveries, Error, People, Recipes, Role, now_ms};

const DAY_MS: i64 = 86_400_000;

/// The deny list in force, encoded, as devices receive it.
type Current = Option<(u64, Arc<Vec<u8>>)>;

/// Inventory; cheap to clone.
#[derive(Clone)]
pub struct Inventory {
    store: Store,
    people: People,
    recipes: Recipes,
    deliveries: Deliveries,
    current: Arc<RwLock<Current>>,
    acks: mpsc::Sender<(DenyAckRow, oneshot::Sender<Result<(), String>>)>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory").finish_non_exhaustive()
    }
}

fn today(now_ms: i64) -> Date {
    jiff::Timestamp::from_millisecond(now_ms)
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date())
        .unwrap_or_default()
}

fn parse_date(field: &'static str, v: &str) -> Result<Date, Error> {
    v.parse::<Date>().map_err(|_| Error::invalid(field, v, "a date as YYYY-MM-DD"))
}

fn invalid(e: nanofleet_inventory::Invalid) -> Error {
    Error::InvalidArgument { field: e.field, value: e.value, allowed: e.allowed }
}

fn audit(
    caller: &Caller,
    action: &str,
    subject: String,
    site: Option<&str>,
    reason: String,
    new: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        at_ms: now_ms(),
        actor: caller.actor().0,
        action: action.into(),
        subject,
        site_id: site.map(str::to_owned),
        reason,
        old_value: None,
        new_value: Some(new.to_string()),
    }
}

fn type_pb(t: &CartridgeTypeRow, recipe_ids: Vec<String>) -> pb::CartridgeType {
    pb::CartridgeType {
        gtin: t.gtin.clone(),
        name: t.name.clone(),
        payload: t.payload.clone(),
        volume_ml: t.volume_ml,
        storage_class: t.storage_class.clone(),
        excursion_limit_min: u32::try_from(t.excursion_limit_min).unwrap_or(0),
        device_models: t.device_models.split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect(),
        lead_time_days: u32::try_from(t.lead_time_days).unwrap_or(0),
        recipe_ids,
    }
}

fn lot_pb(l: &LotRow) -> pb::Lot {
    pb::Lot {
        gtin: l.gtin.clone(),
        lot: l.lot.clone(),
        produced: l.produced.clone(),
        expires: l.expires.clone(),
        quantity: u32::try_from(l.quantity).unwrap_or(0),
        status: l.status.clone(),
        status_reason: l.status_reason.clone(),
        status_by: l.status_by.clone(),
        status_unix_ms: l.status_ms,
    }
}

fn cartridge_pb(c: &CartridgeRow, lot_status: &str) -> pb::Cartridge {
    pb::Cartridge {
        gtin: c.gtin.clone(),
        serial: c.serial.clone(),
        lot: c.lot.clone(),
        status: c.status.clone(),
        site_id: c.site_id.clone(),
        device_id: c.device_id.clone(),
        shipment_id: c.shipment_id.clone(),
        location: c.location.clone(),
        batch_id: c.batch_id.clone(),
        expires_unix_ms: c.expires_ms,
        lot_status: lot_status.into(),
    }
}

fn shipment_pb(s: &ShipmentRow, codes: Vec<String>) -> pb::Shipment {
    pb::Shipment {
        shipment_id: s.shipment_id.clone(),
        site_id: s.site_id.clone(),
        gtin: s.gtin.clone(),
        lot: s.lot.clone(),
        count: u32::try_from(s.count).unwrap_or(0),
        sent_by: s.sent_by.clone(),
        sent_unix_ms: s.sent_ms,
        received_count: u32::try_from(s.received_count).unwrap_or(0),
        received_unix_ms: s.received_ms,
        excursion_minutes: s.excursion_minutes,
        blocked: s.blocked,
        codes,
    }
}

fn recall_pb(r: &RecallRow) -> pb::Recall {
    pb::Recall {
        recall_id: r.recall_id.clone(),
        gtin: r.gtin.clone(),
        lot: r.lot.clone(),
        reason: r.reason.clone(),
        signer_id: r.signer_id.clone(),
        printed_name: r.printed_name.clone(),
        signed_unix_ms: r.signed_ms,
        deny_list_version: u64::try_from(r.deny_version).unwrap_or(0),
    }
}

/// A cartridge row as the rules see it.
fn state_of(c: &CartridgeRow) -> Result<State, Error> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Ok(State {
        status: Status::parse(&c.status).ok_or_else(|| {
            Error::Unavailable(format!("cartridge {} has unknown status {:?}", c.serial, c.status))
        })?,
        site: opt(&c.site_id),
        device: opt(&c.device_id),
        shipment_id: opt(&c.shipment_id),
        location: opt(&c.location),
        batch_id: opt(&c.batch_id),
    })
}

/// The event `m` on cartridge `before`, checked by the rules: the move to write.
fn decide(
    before: &CartridgeRow,
    m: &Movement,
    actor: &str,
    at_ms: i64,
) -> Result<CartridgeMove, movement::Refused> {
    let state = state_of(before).map_err(|_| movement::Refused::Unknown)?;
    let next = movement::apply(Some(&state), m)?;
    let row = CartridgeRow {
        gtin: before.gtin.clone(),
        serial: before.serial.clone(),
        lot: before.lot.clone(),
        status: next.status.as_str().into(),
        site_id: next.site.clone().unwrap_or_default(),
        device_id: next.device.clone().unwrap_or_default(),
        shipment_id: next.shipment_id.clone().unwrap_or_default(),
        location: next.location.clone().unwrap_or_default(),
        batch_id: next.batch_id.clone().unwrap_or_default(),
        expires_ms: before.expires_ms,
        version: before.version + 1,
        updated_ms: at_ms,
    };
    Ok(CartridgeMove { event: event_for(&row, m, actor, at_ms), row })
}

fn event_for(row: &CartridgeRow, m: &Movement, actor: &str, at_ms: i64) -> CartridgeEvent {
    CartridgeEvent {
        id: 0,
        gtin: row.gtin.clone(),
        serial: row.serial.clone(),
        lot: row.lot.clone(),
        kind: m.kind().into(),
        site_id: row.site_id.clone(),
        device_id: row.device_id.clone(),
        at_ms,
        actor: actor.into(),
        detail: serde_json::to_string(m).unwrap_or_default(),
    }
}

fn refused(serial: &str, e: movement::Refused) -> Error {
    Error::Conflict(format!("cartridge {serial}: {e}"))
}

/// Tries at a movement a device reported, when another change moved the cartridge
/// between the read and the write.
const DEVICE_MOVE_ATTEMPTS: usize = 3;

/// Answers waiting for storage, and most in one commit (a recall's thousands of
/// acknowledgements arrive within a second).
const ACK_QUEUE: usize = 20_000;
const ACK_BATCH: usize = 2_000;

async fn record_acks(
    store: Store,
    mut rx: mpsc::Receiver<(DenyAckRow, oneshot::Sender<Result<(), String>>)>,
) {
    let mut buf = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut buf, ACK_BATCH).await > 0 {
        let (rows, waiting): (Vec<DenyAckRow>, Vec<_>) = buf.drain(..).unzip();
        let result = store.record_deny_acks(&rows).await.map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::warn!(error = %e, answers = rows.len(), "deny list answers not stored; devices answer again");
        }
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

impl Inventory {
    /// Loads the deny list in force and starts the answer writer.
    pub async fn open(
        store: Store,
        people: People,
        recipes: Recipes,
        deliveries: Deliveries,
    ) -> Result<Inventory, Error> {
        let current = store
            .latest_deny_list()
            .await?
            .map(|d| (u64::try_from(d.version).unwrap_or(0), Arc::new(d.envelope)));
        let (acks, rx) = mpsc::channel(ACK_QUEUE);
        tokio::spawn(record_acks(store.clone(), rx));
        Ok(Inventory { store, people, recipes, deliveries, current: Arc::new(RwLock::new(current)), acks })
    }

    fn current(&self) -> Current {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    // === catalogue ===

    pub async fn create_type(
        &self,
        caller: &Caller,
        t: pb::CartridgeType,
    ) -> Result<pb::CartridgeType, Error> {
        let pb::CartridgeType {
            gtin,
            name,
            payload,
            volume_ml,
            storage_class,
            excursion_limit_min,
            device_models,
            lead_time_days,
            recipe_ids: _,
        } = t;
        let kind = CartridgeType {
            gtin,
            name,
            payload,
            volume_ml,
            storage_class: StorageClass::parse(&storage_class).map_err(invalid)?,
            excursion_limit_min,
            device_models,
            lead_time_days,
        };
        kind.validate().map_err(invalid)?;
        let row = CartridgeTypeRow {
            gtin: kind.gtin.clone(),
            name: kind.name.clone(),
            payload: kind.payload.clone(),
            volume_ml: kind.volume_ml,
            storage_class: kind.storage_class.as_str().into(),
            excursion_limit_min: i64::from(kind.excursion_limit_min),
            device_models: kind.device_models.join(","),
            lead_time_days: i64::from(kind.lead_time_days),
            created_by: caller.person_id.clone(),
            created_ms: now_ms(),
        };
        let entry = audit(
            caller,
            "cartridge-type.create",
            kind.gtin.clone(),
            None,
            format!("{} ({})", kind.name, kind.storage_class.as_str()),
            serde_json::json!({"gtin": kind.gtin, "name": kind.name, "storage_class": kind.storage_class.as_str()}),
        );
        self.store.insert_cartridge_type(&row, &entry).await.map_err(conflict_or)?;
        Ok(type_pb(&row, Vec::new()))
    }

    /// Recipe ids (released) made for each GTIN.
    async fn recipes_by_gtin(&self) -> Result<HashMap<String, BTreeSet<String>>, Error> {
        let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
        for r in self.store.list_recipes("", "released").await? {
            if let Ok(recipe) = dev::Recipe::decode(r.body.as_slice()) {
                out.entry(recipe.cartridge_gtin).or_default().insert(r.recipe_id);
            }
        }
        Ok(out)
    }

    pub async fn types(&self) -> Result<Vec<pb::CartridgeType>, Error> {
        let recipes = self.recipes_by_gtin().await?;
        Ok(self
            .store
            .cartridge_types()
            .await?
            .iter()
            .map(|t| {
                type_pb(t, recipes.get(&t.gtin).map(|s| s.iter().cloned().collect()).unwrap_or_default())
            })
            .collect())
    }

    async fn kind(&self, gtin: &str) -> Result<CartridgeTypeRow, Error> {
        self.store
            .cartridge_type(gtin)
            .await?
            .ok_or_else(|| Error::NotFound { what: "cartridge type (GTIN)", id: gtin.into() })
    }

    /// Registers a lot in quarantine, with its serialised cartridges.
    pub async fn create_lot(&self, caller: &Caller, req: pb::CreateLotRequest) -> Result<pb::Lot, Error> {
        let pb::CreateLotRequest { gtin, lot, produced, expires, quantity } = req;
        self.kind(&gtin).await?;
        let now = now_ms();
        let l = Lot {
            gtin: gtin.clone(),
            lot: lot.clone(),
            produced: parse_date("produced", &produced)?,
            expires: parse_date("expires", &expires)?,
            quantity,
            status: LotStatus::Quarantine,
        };
        l.validate(today(now)).map_err(invalid)?;
        let expires_ms = gs1::day_start_ms(l.expires) + DAY_MS - 1;
        let row = LotRow {
            gtin: gtin.clone(),
            lot: lot.clone(),
            produced: l.produced.to_string(),
            expires: l.expires.to_string(),
            expires_ms,
            quantity: i64::from(quantity),
            status: LotStatus::Quarantine.as_str().into(),
            status_reason: "registered".into(),
            status_by: caller.person_id.clone(),
            status_ms: now,
            created_ms: now,
        };
        let actor = caller.actor().0;
        let made: Vec<CartridgeMove> = (1..=quantity)
            .map(|n| {
                let row = CartridgeRow {
                    gtin: gtin.clone(),
                    serial: l.serial(n),
                    lot: lot.clone(),
                    status: Status::Made.as_str().into(),
                    site_id: String::new(),
                    device_id: String::new(),
                    shipment_id: String::new(),
                    location: String::new(),
                    batch_id: String::new(),
                    expires_ms,
                    version: 1,
                    updated_ms: now,
                };
                CartridgeMove { event: event_for(&row, &Movement::Made, &actor, now), row }
            })
            .collect();
        let entry = audit(
            caller,
            "lot.create",
            format!("{gtin}/{lot}"),
            None,
            format!("{quantity} cartridges, expiring {}", l.expires),
            serde_json::json!({"quantity": quantity, "produced": row.produced, "expires": row.expires}),
        );
        self.store.insert_lot(&row, &made, &entry).await.map_err(conflict_or)?;
        Ok(lot_pb(&row))
    }

    /// The lot named: by GTIN and number, or by number alone when it is unique.
    async fn find_lot(&self, gtin: &str, lot: &str) -> Result<LotRow, Error> {
        if !gtin.is_empty() {
            return self
                .store
                .lot(gtin, lot)
                .await?
                .ok_or_else(|| Error::NotFound { what: "lot", id: format!("{gtin}/{lot}") });
        }
        let mut found = self.store.lots(None, Some(lot), None).await?;
        match found.len() {
            0 => Err(Error::NotFound { what: "lot", id: lot.into() }),
            1 => Ok(found.remove(0)),
            _ => Err(Error::invalid(
                "gtin",
                "",
                format!(
                    "one of {} (lot {lot} exists for several cartridge types)",
                    found.iter().map(|l| l.gtin.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    pub async fn release_lot(&self, caller: &Caller, req: pb::ReleaseLotRequest) -> Result<pb::Lot, Error> {
        let mut lot = self.find_lot(&req.gtin, &req.lot).await?;
        let from = LotStatus::parse(&lot.status).unwrap_or(LotStatus::Recalled);
        if !from.can_become(LotStatus::Released) {
            return Err(Error::Conflict(format!(
                "lot {} is {}; only a lot in quarantine is released",
                lot.lot, lot.status
            )));
        }
        lot.status = LotStatus::Released.as_str().into();
        lot.status_reason = if req.reason.is_empty() { "released by QA".into() } else { req.reason.clone() };
        lot.status_by = caller.person_id.clone();
        lot.status_ms = now_ms();
        let entry = audit(
            caller,
            "lot.release",
            format!("{}/{}", lot.gtin, lot.lot),
            None,
            lot.status_reason.clone(),
            serde_json::json!({"status": "released"}),
        );
        self.store.set_lot_status(&lot, from.as_str(), &entry).await.map_err(conflict_or)?;
        Ok(lot_pb(&lot))
    }

    pub async fn lots(&self, req: &pb::ListLotsRequest) -> Result<Vec<pb::Lot>, Error> {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let status = opt(&req.status);
        if let Some(s) = &status
            && LotStatus::parse(s).is_none()
        {
            return Err(Error::invalid("status", s.clone(), "quarantine, released or recalled"));
        }
        Ok(self
            .store
            .lots(opt(&req.gtin).as_deref(), None, status.as_deref())
            .await?
            .iter()
            .map(lot_pb)
            .collect())
    }

    async fn whereabouts(&self, caller: &Caller, lot: &LotRow) -> Result<Vec<pb::LotPlace>, Error> {
        let own = caller.site_limit();
        Ok(self
            .store
            .lot_whereabouts(&lot.gtin, &lot.lot)
            .await?
            .into_iter()
            .filter(|(site, ..)| own.is_none_or(|o| o == site))
            .map(|(site_id, status, count)| pb::LotPlace {
                site_id,
                status,
                count: u32::try_from(count).unwrap_or(0),
            })
            .collect())
    }

    async fn trace(&self, caller: &Caller, lot: &LotRow) -> Result<Vec<pb::TracedRun>, Error> {
        let own = caller.site_limit();
        Ok(self
            .store
            .lot_trace(&lot.gtin, &lot.lot)
            .await?
            .into_iter()
            .filter(|u| own.is_none_or(|o| o == u.site_id))
            .map(|u| pb::TracedRun {
                batch_id: u.batch_id,
                serial: u.serial,
                device_id: u.device_id,
                site_id: u.site_id,
                prescription_id: u.prescription_id,
                patient_pseudonym: u.patient_pseudonym,
                started_unix_ms: u.started_ms,
            })
            .collect())
    }

    pub async fn lot(&self, caller: &Caller, req: &pb::GetLotRequest) -> Result<pb::GetLotResponse, Error> {
        let lot = self.find_lot(&req.gtin, &req.lot).await?;
        Ok(pb::GetLotResponse {
            places: self.whereabouts(caller, &lot).await?,
            recalls: self
                .store
                .recalls(Some(&lot.gtin), Some(&lot.lot))
                .await?
                .iter()
                .map(recall_pb)
                .collect(),
            runs: self.trace(caller, &lot).await?,
            lot: Some(lot_pb(&lot)),
        })
    }

    // === recall and deny lists ===

    /// Recalls a lot (QA, with the password again): a new deny list, signed with the
    /// recaller's deny-list key, sent to every active device, and the trace.
    pub async fn recall(
        &self,
        caller: &Caller,
        req: pb::RecallLotRequest,
    ) -> Result<pb::RecallLotResponse, Error> {
        if caller.role != Role::Qa {
            return Err(Error::PermissionDenied(format!(
                "a recall needs the qa role; {} is {}",
                caller.person_id,
                caller.role.as_str()
            )));
        }
        if req.user_id != caller.person_id {
            return Err(Error::PermissionDenied(format!(
                "a recall is signed by the signed-in person: user id {:?} is not {:?}",
                req.user_id, caller.person_id
            )));
        }
        let reason = req.reason.trim();
        if reason.is_empty() || reason.chars().count() > 500 {
            return Err(Error::invalid(
                "reason",
                req.reason.clone(),
                "1 to 500 characters: why the lot is recalled",
            ));
        }
        let mut lot = self.find_lot(&req.gtin, &req.lot).await?;
        let from = LotStatus::parse(&lot.status).unwrap_or(LotStatus::Recalled);
        if !from.can_become(LotStatus::Recalled) {
            return Err(Error::Conflict(format!("lot {} of {} is recalled already", lot.lot, lot.gtin)));
        }
        self.people.verify_password(&req.user_id, &req.password, "lot recall").await?;
        let key = self.recipes.signing_key(caller, denylist::ROLE, &req.password).await?;
        let person = self.people.person(&caller.person_id).await?;
        let now = now_ms();
        let version = self.current().map_or(0, |(v, _)| v) + 1;
        let recall_id = format!("R-{}-{version:04}", today(now).year());
        lot.status = LotStatus::Recalled.as_str().into();
        lot.status_reason = format!("{recall_id}: {reason}");
        lot.status_by = caller.person_id.clone();
        lot.status_ms = now;
        let list = self.deny_list(version, now, Some(&lot)).await?;
        let envelope = denylist::sign(&list, &key).encode_to_vec();
        let deny = DenyListRow {
            version: i64::try_from(version).unwrap_or(i64::MAX),
            issued_ms: now,
            signer_id: caller.person_id.clone(),
            lots: i64::try_from(list.lots.len()).unwrap_or(0),
            cartridges: i64::try_from(list.cartridges.len()).unwrap_or(0),
            envelope: envelope.clone(),
        };
        let recall = RecallRow {
            recall_id: recall_id.clone(),
            gtin: lot.gtin.clone(),
            lot: lot.lot.clone(),
            reason: reason.into(),
            signer_id: caller.person_id.clone(),
            printed_name: person.display_name.clone(),
            signed_ms: now,
            deny_version: deny.version,
        };
        let entry = audit(
            caller,
            "lot.recall",
            format!("{}/{}", lot.gtin, lot.lot),
            None,
            format!("{recall_id}: {reason}"),
            serde_json::json!({
                "recall_id": recall_id, "deny_list_version": version, "printed_name": person.display_name,
                "meaning": "recalled", "signed_unix_ms": now,
            }),
        );
        self.store.recall_lot(&lot, from.as_str(), &recall, &deny, &entry).await.map_err(conflict_or)?;
        let (total, sent) = self.send_in_force(version, envelope).await?;
        tracing::info!(recall = %recall_id, lot = %lot.lot, version, devices = total, sent, "lot recalled; deny list sent");
        let started = std::time::Instant::now();
        let runs = self.trace(caller, &lot).await?;
        let places = self.whereabouts(caller, &lot).await?;
        let trace_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        Ok(pb::RecallLotResponse {
            recall: Some(recall_pb(&recall)),
            devices_sent: u32::try_from(sent).unwrap_or(u32::MAX),
            devices_total: u32::try_from(total).unwrap_or(u32::MAX),
            places,
            runs,
            trace_ms,
        })
    }

    /// The complete deny list of `version`: every recalled lot (with `recalling`, the
    /// one being recalled now) and every blocked or wasted cartridge of an unexpired
    /// lot.
    async fn deny_list(&self, version: u64, now: i64, recalling: Option<&LotRow>) -> Result<DenyList, Error> {
        let mut lots: Vec<DeniedLot> = self
            .store
            .lots(None, None, Some(LotStatus::Recalled.as_str()))
            .await?
            .iter()
            .chain(recalling)
            .map(|l| DeniedLot {
                gtin: l.gtin.clone(),
                lot: l.lot.clone(),
                reason: format!("recalled: {}", l.status_reason),
                since_unix_ms: l.status_ms,
            })
            .collect();
        lots.sort_by(|a, b| (&a.gtin, &a.lot).cmp(&(&b.gtin, &b.lot)));
        lots.dedup_by(|a, b| a.gtin == b.gtin && a.lot == b.lot);
        let mut cartridges = Vec::new();
        for l in self.store.lots(None, None, Some(LotStatus::Released.as_str())).await? {
            if l.expires_ms < now {
                continue;
            }
            for status in [Status::Blocked, Status::Wasted] {
                for c in self.store.lot_cartridges(&l.gtin, &l.lot, status.as_str(), 100_000).await? {
                    cartridges.push(DeniedCartridge {
                        gtin: c.gtin,
                        serial: c.serial,
                        reason: status.as_str().into(),
                        since_unix_ms: c.updated_ms,
                    });
                }
            }
        }
        Ok(DenyList { version, issued_unix_ms: now, lots, cartridges })
    }

    /// Who has acknowledged the deny list in force.
    pub async fn deny_status(&self) -> Result<pb::GetDenyListStatusResponse, Error> {
        let latest = self.store.latest_deny_list().await?;
        let version = latest.as_ref().map_or(0, |d| d.version);
        let acks: HashMap<String, DenyAckRow> =
            self.store.deny_acks().await?.into_iter().map(|a| (a.device_id.clone(), a)).collect();
        let mut total = 0u32;
        let mut acked = 0u32;
        let mut pending = Vec::new();
        for d in self.store.list_devices(None).await? {
            if d.status != "active" {
                continue;
            }
            total += 1;
            let a = acks.get(&d.id);
            if a.is_some_and(|a| a.version >= version && a.result == "accepted") {
                acked += 1;
                continue;
            }
            pending.push(pb::DenyListDevice {
                device_id: d.id.clone(),
                site_id: d.site_id.clone(),
                acked_version: a.map_or(0, |a| u64::try_from(a.version).unwrap_or(0)),
                result: a.map(|a| a.result.clone()).unwrap_or_default(),
                code: a.map(|a| a.code.clone()).unwrap_or_default(),
                reason: a.map(|a| a.reason.clone()).unwrap_or_default(),
                acked_unix_ms: a.map_or(0, |a| a.acked_ms),
                online: d.online,
            });
        }
        Ok(pb::GetDenyListStatusResponse {
            version: u64::try_from(version).unwrap_or(0),
            issued_unix_ms: latest.as_ref().map_or(0, |d| d.issued_ms),
            lots: latest.as_ref().map_or(0, |d| u32::try_from(d.lots).unwrap_or(0)),
            cartridges: latest.as_ref().map_or(0, |d| u32::try_from(d.cartridges).unwrap_or(0)),
            devices_total: total,
            devices_acked: acked,
            pending,
        })
    }

    /// A device came online holding deny list `has`: it gets the one in force if
    /// newer (after the trust root versions it lacks).
    pub fn born(&self, device_id: &str, has: u64) {
        if let Some((version, payload)) = self.current()
            && has < version
        {
            self.deliveries.send_later(device_id, Command::DenyList, payload);
        }
    }

    /// A device's answer about a deny list: stored (group commit), a refusal audited.
    pub async fn answered(&self, device_id: &str, ack: Ack) -> Result<(), String> {
        let accepted = ack.result == AckResult::Accepted as i32;
        if !accepted {
            tracing::warn!(device_id, version = ack.version, code = %ack.code, reason = %ack.reason, "device refused a deny list");
            let entry = AuditEntry {
                at_ms: now_ms(),
                actor: Actor::device(device_id).0,
                action: "deny-list.refused".into(),
                subject: format!("deny list v{}", ack.version),
                site_id: None,
                reason: format!("{}: {}", ack.code, ack.reason),
                old_value: None,
                new_value: None,
            };
            self.store.audit_only(&entry).await.map_err(|e| e.to_string())?;
        }
        let row = DenyAckRow {
            device_id: device_id.to_owned(),
            version: i64::try_from(ack.version).unwrap_or(i64::MAX),
            result: if accepted { "accepted" } else { "refused" }.into(),
            code: ack.code,
            reason: ack.reason,
            acked_ms: now_ms(),
        };
        let (done, stored) = oneshot::channel();
        self.acks.send((row, done)).await.map_err(|_| "shutting down".to_owned())?;
        stored.await.map_err(|_| "shutting down".to_owned())?
    }

    // === shipments ===

    pub async fn ship(&self, caller: &Caller, req: pb::ShipCartridgesRequest) -> Result<pb::Shipment, Error> {
        let lot = self.find_lot(&req.gtin, &req.lot).await?;
        if lot.status != LotStatus::Released.as_str() {
            return Err(Error::Conflict(format!(
                "lot {} is {}; only a released lot is shipped",
                lot.lot, lot.status
            )));
        }
        let now = now_ms();
        if lot.expires_ms < now {
            return Err(Error::Conflict(format!("lot {} expired on {}", lot.lot, lot.expires)));
        }
        if !self.store.list_sites().await?.iter().any(|site| site.id == req.site_id) {
            return Err(Error::NotFound { what: "site", id: req.site_id.clone() });
        }
        if !(1..=catalogue::MAX_LOT_QUANTITY).contains(&req.count) {
            return Err(Error::invalid("count", req.count.to_string(), "1 to 20000 cartridges"));
        }
        let unshipped = self
            .store
            .lot_cartridges(&lot.gtin, &lot.lot, Status::Made.as_str(), i64::from(req.count))
            .await?;
        if unshipped.len() < req.count as usize {
            return Err(Error::invalid(
                "count",
                req.count.to_string(),
                format!("at most {} (the cartridges of lot {} not shipped yet)", unshipped.len(), lot.lot),
            ));
        }
        let shipment_id = format!("SH-{}-{:06X}", now / 1000, rand::random::<u32>() & 0xFF_FFFF);
        let actor = caller.actor().0;
        let m = Movement::Shipped { shipment_id: shipment_id.clone(), to_site: req.site_id.clone() };
        let moves = unshipped
            .iter()
            .map(|c| decide(c, &m, &actor, now).map_err(|e| refused(&c.serial, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let row = ShipmentRow {
            shipment_id: shipment_id.clone(),
            site_id: req.site_id.clone(),
            gtin: lot.gtin.clone(),
            lot: lot.lot.clone(),
            count: i64::from(req.count),
            sent_by: caller.person_id.clone(),
            sent_ms: now,
            received_count: 0,
            received_ms: 0,
            readings: String::new(),
            excursion_minutes: 0.0,
            blocked: false,
        };
        let entry = audit(
            caller,
            "shipment.send",
            shipment_id.clone(),
            Some(&req.site_id),
            format!("{} cartridges of lot {}", req.count, lot.lot),
            serde_json::json!({"gtin": lot.gtin, "lot": lot.lot, "count": req.count}),
        );
        self.store.insert_shipment(&row, &moves, &entry).await.map_err(conflict_or)?;
        Ok(shipment_pb(&row, self.codes(&lot, &unshipped)))
    }

    /// The element strings printed on `cartridges` of `lot`.
    fn codes(&self, lot: &LotRow, cartridges: &[CartridgeRow]) -> Vec<String> {
        let expiry = lot.expires.parse::<Date>().unwrap_or_default();
        let production = lot.produced.parse::<Date>().ok();
        cartridges
            .iter()
            .map(|c| {
                gs1::CartridgeCode {
                    gtin: c.gtin.clone(),
                    lot: c.lot.clone(),
                    serial: c.serial.clone(),
                    expiry,
                    production,
                    expiry_time: None,
                }
                .element_string()
            })
            .collect()
    }

    pub async fn shipments(&self, caller: &Caller, site_id: &str) -> Result<Vec<pb::Shipment>, Error> {
        let site = caller.listing_site(site_id)?;
        let site = (!site.is_empty()).then_some(site);
        Ok(self
            .store
            .shipments(site.as_deref(), 200)
            .await?
            .iter()
            .map(|s| shipment_pb(s, Vec::new()))
            .collect())
    }

    /// Receives a shipment at its site: every scan must read, belong to the shipment
    /// and be in transit; the logger's readings decide whether the cartridges are
    /// blocked. All or nothing.
    pub async fn receive(
        &self,
        caller: &Caller,
        req: pb::ReceiveShipmentRequest,
    ) -> Result<pb::ReceiveShipmentResponse, Error> {
        caller.check_site(&req.site_id)?;
        let mut shipment = self
            .store
            .shipment(&req.shipment_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "shipment", id: req.shipment_id.clone() })?;
        if shipment.site_id != req.site_id {
            return Err(Error::Conflict(format!(
                "shipment {} goes to site {}, not {}: it cannot be received here",
                shipment.shipment_id, shipment.site_id, req.site_id
            )));
        }
        if req.scans.is_empty() {
            return Err(Error::invalid("scans", "", "at least one scanned cartridge"));
        }
        if req.readings.len() < 2 {
            return Err(Error::invalid(
                "readings",
                req.readings.len().to_string(),
                "the shipment logger's readings: at least two",
            ));
        }
        let kind = self.kind(&shipment.gtin).await?;
        let class = StorageClass::parse(&kind.storage_class).map_err(invalid)?;
        let readings: Vec<Reading> =
            req.readings.iter().map(|r| Reading { at_ms: r.time_unix_ms, celsius: r.celsius }).collect();
        let excursion = coldchain::excursion(&readings, class).map_err(invalid)?;
        let blocked = excursion.over(u32::try_from(kind.excursion_limit_min).unwrap_or(0));
        let now = now_ms();
        let year = today(now).year();
        let in_shipment: HashMap<(String, String), CartridgeRow> = self
            .store
            .shipment_cartridges(&shipment.shipment_id)
            .await?
            .into_iter()
            .map(|c| ((c.gtin.clone(), c.serial.clone()), c))
            .collect();
        let actor = caller.actor().0;
        let why_blocked = || {
            format!(
                "cold chain: {:.0} min outside {} {:?} (limit {} min)",
                excursion.minutes,
                class.as_str(),
                class.range_c(),
                kind.excursion_limit_min
            )
        };
        let mut blocks = 0u32;
        let mut seen = BTreeSet::new();
        let mut moves = Vec::with_capacity(req.scans.len() * 2);
        for (i, scan) in req.scans.iter().enumerate() {
            let field = "scans";
            let code = gs1::parse_cartridge(scan, year)
                .map_err(|e| Error::invalid(field, scan.clone(), format!("scan {}: {e}", i + 1)))?;
            let key = (code.gtin.clone(), code.serial.clone());
            if !seen.insert(key.clone()) {
                return Err(Error::invalid(
                    field,
                    scan.clone(),
                    format!("scan {}: serial {} was scanned twice", i + 1, code.serial),
                ));
            }
            let Some(c) = in_shipment.get(&key) else {
                return Err(Error::invalid(
                    field,
                    scan.clone(),
                    format!(
                        "scan {}: cartridge {} serial {} is not in shipment {}",
                        i + 1,
                        code.gtin,
                        code.serial,
                        shipment.shipment_id
                    ),
                ));
            };
            if c.lot != code.lot {
                return Err(Error::invalid(
                    field,
                    scan.clone(),
                    format!(
                        "scan {}: the code says lot {}, serial {} belongs to lot {}",
                        i + 1,
                        code.lot,
                        code.serial,
                        c.lot
                    ),
                ));
            }
            // Loaded into a device or used at this site before its scan-in: it has
            // arrived. Blocked with its shipment if it is still unused.
            if self.arrived_unscanned(c, &req.site_id).await? {
                if blocked && c.status == Status::Loaded.as_str() {
                    let block = decide(c, &Movement::Blocked { reason: why_blocked() }, &actor, now)
                        .map_err(|e| refused(&c.serial, e))?;
                    moves.push(block);
                    blocks += 1;
                }
                continue;
            }
            let received = decide(c, &Movement::Received { site: req.site_id.clone() }, &actor, now)
                .map_err(|e| refused(&c.serial, e))?;
            if blocked {
                let block = decide(&received.row, &Movement::Blocked { reason: why_blocked() }, &actor, now)
                    .map_err(|e| refused(&c.serial, e))?;
                moves.push(received);
                moves.push(block);
                blocks += 1;
            } else {
                moves.push(received);
            }
        }
        let received = u32::try_from(seen.len()).unwrap_or(u32::MAX);
        shipment.received_count += i64::from(received);
        shipment.received_ms = now;
        shipment.readings = serde_json::to_string(&readings).unwrap_or_default();
        shipment.excursion_minutes = excursion.minutes;
        shipment.blocked = blocked;
        let entry = audit(
            caller,
            "shipment.receive",
            shipment.shipment_id.clone(),
            Some(&req.site_id),
            if blocked {
                format!("{received} received, {blocks} blocked: {:.0} min excursion", excursion.minutes)
            } else {
                format!("{received} received")
            },
            serde_json::json!({"received": received, "excursion_minutes": excursion.minutes, "blocked": blocked}),
        );
        self.store.receive_shipment(&shipment, &moves, &entry).await.map_err(conflict_or)?;
        if blocked {
            self.publish_blocked(now).await?;
        }
        Ok(pb::ReceiveShipmentResponse {
            shipment: Some(shipment_pb(&shipment, Vec::new())),
            received,
            blocked: blocks,
            excursion_minutes: excursion.minutes,
            unlogged_minutes: excursion.unlogged_minutes,
        })
    }

    /// Whether `c`, in a shipment to `site`, was loaded into a device or used there
    /// without ever being scanned in: it arrived, unscanned.
    async fn arrived_unscanned(&self, c: &CartridgeRow, site: &str) -> Result<bool, Error> {
        let used = [Status::Loaded.as_str(), Status::Consumed.as_str()].contains(&c.status.as_str());
        if !used || c.site_id != site {
            return Ok(false);
        }
        let events = self.store.cartridge_events(&c.gtin, &c.serial).await?;
        Ok(!events.iter().any(|e| e.kind == Movement::Received { site: String::new() }.kind()))
    }

    /// Cartridges were blocked or wasted: a new deny list, signed with the server's
    /// deny-list key, goes to every device.
    async fn publish_blocked(&self, now: i64) -> Result<(), Error> {
        let key = self.recipes.online_role_key(denylist::ROLE).await?;
        let version = self.current().map_or(0, |(v, _)| v) + 1;
        let list = self.deny_list(version, now, None).await?;
        let envelope = denylist::sign(&list, &key).encode_to_vec();
        let row = DenyListRow {
            version: i64::try_from(version).unwrap_or(i64::MAX),
            issued_ms: now,
            signer_id: "system".into(),
            lots: i64::try_from(list.lots.len()).unwrap_or(0),
            cartridges: i64::try_from(list.cartridges.len()).unwrap_or(0),
            envelope: envelope.clone(),
        };
        let entry = AuditEntry {
            at_ms: now,
            actor: Actor::system().0,
            action: "deny-list.issue".into(),
            subject: format!("deny list v{version}"),
            site_id: None,
            reason: format!("{} blocked or wasted cartridges", list.cartridges.len()),
            old_value: None,
            new_value: Some(serde_json::json!({"version": version, "lots": list.lots.len(), "cartridges": list.cartridges.len()}).to_string()),
        };
        self.store.insert_deny_list(&row, &entry).await.map_err(conflict_or)?;
        self.send_in_force(version, envelope).await?;
        Ok(())
    }

    /// Makes the stored deny list `version` the one in force and sends it to every
    /// active device; returns (active devices, devices reached now).
    async fn send_in_force(&self, version: u64, envelope: Vec<u8>) -> Result<(usize, usize), Error> {
        let payload = Arc::new(envelope);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some((version, payload.clone()));
        let devices: Vec<String> = self
            .store
            .list_devices(None)
            .await?
            .into_iter()
            .filter(|d| d.status == "active")
            .map(|d| d.id)
            .collect();
        let total = devices.len();
        let sent = self.deliveries.fan_out(Arc::new(devices), Command::DenyList, payload).await;
        Ok((total, sent))
    }

    // === cartridges ===

    /// Reads a scan and says whether the cartridge may run, and every reason it may
    /// not.
    pub async fn scan(
        &self,
        caller: &Caller,
        req: &pb::ScanCartridgeRequest,
    ) -> Result<pb::ScanCartridgeResponse, Error> {
        let now = now_ms();
        let code = gs1::parse_cartridge(&req.scan, today(now).year())
            .map_err(|e| Error::invalid("scan", req.scan.clone(), e.to_string()))?;
        let mut problems = Vec::new();
        let kind = self.store.cartridge_type(&code.gtin).await?;
        if kind.is_none() {
            problems.push(format!("GTIN {} is not in the catalogue", code.gtin));
        }
        let row = self.store.cartridge(&code.gtin, &code.serial).await?;
        let lot = self.store.lot(&code.gtin, &code.lot).await?;
        if let Some(c) = &row {
            caller
                .check_site(&c.site_id)
                .map_err(|_| Error::NotFound { what: "cartridge", id: code.serial.clone() })?;
        }
        match (&row, &lot) {
            (None, _) => problems.push(format!("serial {} of {} is not registered", code.serial, code.gtin)),
            (Some(c), _) if c.lot != code.lot => problems.push(format!(
                "the code says lot {}, but serial {} was registered with lot {}: the label is not genuine",
                code.lot, code.serial, c.lot
            )),
            (Some(c), _) if !Status::parse(&c.status).is_some_and(Status::is_stock) => {
                problems.push(format!(
                    "the cartridge is {}{}",
                    c.status,
                    if c.batch_id.is_empty() { String::new() } else { format!(" (batch {})", c.batch_id) }
                ))
            }
            _ => {}
        }
        if let Some(l) = &lot
            && l.status != LotStatus::Released.as_str()
        {
            problems.push(format!("lot {} is {}: {}", l.lot, l.status, l.status_reason));
        }
        if code.expires_unix_ms() < now {
            problems.push(format!("expired on {}", code.expiry));
        }
        if !req.recipe_id.is_empty() {
            let want = self
                .store
                .list_recipes(&req.recipe_id, "released")
                .await?
                .iter()
                .max_by_key(|r| r.version)
                .and_then(|r| dev::Recipe::decode(r.body.as_slice()).ok())
                .map(|r| r.cartridge_gtin);
            match want {
                Some(g) if g != code.gtin => problems
                    .push(format!("recipe {} takes cartridge type {g}, not {}", req.recipe_id, code.gtin)),
                None => problems.push(format!("recipe {} has no released version", req.recipe_id)),
                _ => {}
            }
        }
        if !req.device_id.is_empty() {
            let d = self
                .store
                .get_device(&req.device_id)
                .await?
                .ok_or_else(|| Error::NotFound { what: "device", id: req.device_id.clone() })?;
            caller.check_device_site(&d.id, &d.site_id)?;
            if let Some(c) = &row
                && c.site_id != d.site_id
            {
                problems
                    .push(format!("the cartridge is at site {:?}, the device at {}", c.site_id, d.site_id));
            }
            if let Some(k) = &kind
                && !k.device_models.is_empty()
                && !k.device_models.split(',').any(|m| m == d.model)
            {
                problems.push(format!(
                    "device model {} does not take {} (takes {})",
                    d.model, k.gtin, k.device_models
                ));
            }
        }
        Ok(pb::ScanCartridgeResponse {
            code: Some(dev::Cartridge {
                gtin: code.gtin.clone(),
                lot: code.lot.clone(),
                serial: code.serial.clone(),
                expires_unix_ms: code.expires_unix_ms(),
            }),
            cartridge: row.as_ref().map(|c| cartridge_pb(c, lot.as_ref().map_or("", |l| l.status.as_str()))),
            usable: problems.is_empty(),
            problems,
        })
    }

    async fn cartridge_row(&self, caller: &Caller, gtin: &str, serial: &str) -> Result<CartridgeRow, Error> {
        let not_found = || Error::NotFound { what: "cartridge", id: format!("{gtin}/{serial}") };
        let c = self.store.cartridge(gtin, serial).await?.ok_or_else(not_found)?;
        caller.check_site(&c.site_id).map_err(|_| not_found())?;
        Ok(c)
    }

    pub async fn cartridge(
        &self,
        caller: &Caller,
        req: &pb::GetCartridgeRequest,
    ) -> Result<pb::GetCartridgeResponse, Error> {
        let c = self.cartridge_row(caller, &req.gtin, &req.serial).await?;
        let lot = self.store.lot(&c.gtin, &c.lot).await?;
        let events = self
            .store
            .cartridge_events(&c.gtin, &c.serial)
            .await?
            .into_iter()
            .map(|e| pb::CartridgeEvent {
                kind: e.kind,
                site_id: e.site_id,
                device_id: e.device_id,
                time_unix_ms: e.at_ms,
                actor: e.actor,
                detail: e.detail,
            })
            .collect();
        Ok(pb::GetCartridgeResponse {
            cartridge: Some(cartridge_pb(&c, lot.as_ref().map_or("", |l| l.status.as_str()))),
            events,
        })
    }

    /// Stored, loaded or wasted, at the cartridge's site.
    pub async fn move_cartridge(
        &self,
        caller: &Caller,
        req: pb::MoveCartridgeRequest,
    ) -> Result<pb::Cartridge, Error> {
        let c = self.cartridge_row(caller, &req.gtin, &req.serial).await?;
        let m = match req.kind.as_str() {
            "stored" if !req.location.trim().is_empty() && req.location.chars().count() <= 120 => {
                Movement::Stored { location: req.location.trim().into() }
            }
            "stored" => return Err(Error::invalid("location", req.location.clone(), "1 to 120 characters")),
            "loaded" => {
                let d = self
                    .store
                    .get_device(&req.device_id)
                    .await?
                    .ok_or_else(|| Error::NotFound { what: "device", id: req.device_id.clone() })?;
                caller.check_device_site(&d.id, &d.site_id)?;
                Movement::Loaded { device: d.id, site: d.site_id }
            }
            "wasted" if !req.reason.trim().is_empty() => {
                Movement::Wasted { reason: req.reason.trim().into() }
            }
            "wasted" => return Err(Error::invalid("reason", "", "why the cartridge is wasted")),
            other => return Err(Error::invalid("kind", other, "stored, loaded or wasted")),
        };
        let now = now_ms();
        let mv = decide(&c, &m, &caller.actor().0, now).map_err(|e| refused(&c.serial, e))?;
        let entry = audit(
            caller,
            &format!("cartridge.{}", m.kind()),
            format!("{}/{}", c.gtin, c.serial),
            (!c.site_id.is_empty()).then_some(c.site_id.as_str()),
            serde_json::to_string(&m).unwrap_or_default(),
            serde_json::json!({"status": mv.row.status}),
        );
        self.store.apply_moves(std::slice::from_ref(&mv), Some(&entry)).await.map_err(conflict_or)?;
        if matches!(m, Movement::Wasted { .. }) {
            self.publish_blocked(now).await?;
        }
        let lot = self.store.lot(&c.gtin, &c.lot).await?;
        Ok(cartridge_pb(&mv.row, lot.as_ref().map_or("", |l| l.status.as_str())))
    }

    /// A batch record was stored: its cartridge is consumed. A run is a fact; only a
    /// second use or a use at another site is refused, and audited.
    pub async fn consumed(&self, u: &CartridgeUse) -> Result<(), Error> {
        let batch_id = u.batch_id.as_str();
        let actor = Actor::device(&u.device_id).0;
        let m = Movement::Consumed {
            batch_id: batch_id.into(),
            device: u.device_id.clone(),
            site: u.site_id.clone(),
        };
        for attempt in 1..=DEVICE_MOVE_ATTEMPTS {
            let Some(c) = self.store.cartridge(&u.gtin, &u.serial).await? else {
                tracing::debug!(batch_id, serial = %u.serial, "batch used a cartridge the inventory does not know");
                return Ok(());
            };
            if c.batch_id == batch_id {
                return Ok(());
            }
            match decide(&c, &m, &actor, u.started_ms) {
                Ok(mv) => match self.store.apply_moves(&[mv], None).await {
                    // Moved meanwhile (the device's load, an expiry): read it again.
                    Err(nanofleet_store::Error::Conflict(_)) if attempt < DEVICE_MOVE_ATTEMPTS => continue,
                    done => return Ok(done?),
                },
                Err(e) => {
                    tracing::warn!(batch_id, serial = %u.serial, reason = %e, "cartridge use refused");
                    let entry = AuditEntry {
                        at_ms: now_ms(),
                        actor,
                        action: "cartridge.use.refused".into(),
                        subject: format!("{}/{}", u.gtin, u.serial),
                        site_id: Some(u.site_id.clone()),
                        reason: format!("batch {batch_id}: {e}"),
                        old_value: None,
                        new_value: None,
                    };
                    return Ok(self.store.audit_only(&entry).await?);
                }
            }
        }
        Ok(())
    }

    /// A device's scanner read a cartridge for a run. An accepted load moves the
    /// cartridge into the device; a refused one (the device's interlock held) is
    /// audited. A load the inventory cannot apply (a cartridge used, blocked or expired
    /// meanwhile, loaded at another site) is logged and audited. A cartridge or device
    /// the inventory does not know, and a repeat, change nothing. Only a storage
    /// failure is an error, so the device reports the load again.
    pub async fn loaded(&self, device_id: &str, at_ms: i64, load: &dev::CartridgeLoad) -> Result<(), Error> {
        let unknown = || {
            tracing::debug!(device_id, gtin = %load.gtin, serial = %load.serial, "a load the inventory does not know");
            Ok(())
        };
        if !load.accepted {
            let Some(c) = self.store.cartridge(&load.gtin, &load.serial).await? else { return unknown() };
            tracing::info!(device_id, serial = %c.serial, code = %load.code, "device refused to load a cartridge");
            let why = format!("{} ({})", load.reason, load.code);
            return self.audit_load_once(device_id, &c, "cartridge.load.refused", load, why).await;
        }
        let Some(device) = self.store.get_device(device_id).await? else { return unknown() };
        let actor = Actor::device(device_id).0;
        let m = Movement::Loaded { device: device_id.into(), site: device.site_id };
        for attempt in 1..=DEVICE_MOVE_ATTEMPTS {
            let Some(c) = self.store.cartridge(&load.gtin, &load.serial).await? else { return unknown() };
            let repeat = (c.status == Status::Loaded.as_str() && c.device_id == device_id)
                || (!load.batch_id.is_empty() && c.batch_id == load.batch_id);
            if repeat {
                return Ok(());
            }
            match decide(&c, &m, &actor, at_ms) {
                Ok(mv) => match self.store.apply_moves(&[mv], None).await {
                    // Moved meanwhile (the run's consumption, an expiry): read it again.
                    Err(nanofleet_store::Error::Conflict(_)) if attempt < DEVICE_MOVE_ATTEMPTS => continue,
                    done => return Ok(done?),
                },
                Err(e) => {
                    tracing::warn!(device_id, serial = %c.serial, reason = %e, "cartridge load not recorded");
                    let why = e.to_string();
                    return self.audit_load_once(device_id, &c, "cartridge.load.unrecorded", load, why).await;
                }
            }
        }
        Ok(())
    }

    /// Audits a load once: a re-sent event finds its entry and adds none.
    async fn audit_load_once(
        &self,
        device_id: &str,
        c: &CartridgeRow,
        action: &str,
        load: &dev::CartridgeLoad,
        why: String,
    ) -> Result<(), Error> {
        let subject = format!("{}/{}", c.gtin, c.serial);
        let head = format!("run request {} on {device_id}:", load.request_id);
        let filter = nanofleet_store::AuditFilter {
            action: Some(action.into()),
            subject: Some(subject.clone()),
            limit: Some(1_000),
            ..Default::default()
        };
        if self.store.list_audit(&filter).await?.iter().any(|a| a.entry.reason.starts_with(&head)) {
            return Ok(());
        }
        let entry = AuditEntry {
            at_ms: now_ms(),
            actor: Actor::device(device_id).0,
            action: action.into(),
            subject,
            site_id: (!c.site_id.is_empty()).then(|| c.site_id.clone()),
            reason: format!("{head} {why}"),
            old_value: None,
            new_value: None,
        };
        Ok(self.store.audit_only(&entry).await?)
    }

    /// Every unused cartridge past its expiry gets its `expired` event (a batch at a
    /// time); returns how many.
    pub async fn expire_due(&self, now: i64) -> Result<usize, Error> {
        let mut total = 0;
        loop {
            let due = self.store.cartridges_past_expiry(now, 1_000).await?;
            let actor = Actor::system().0;
            let moves: Vec<CartridgeMove> =
                due.iter().filter_map(|c| decide(c, &Movement::Expired, &actor, now).ok()).collect();
            if moves.is_empty() {
                return Ok(total);
            }
            let entry = AuditEntry {
                at_ms: now,
                actor: actor.clone(),
                action: "cartridge.expire".into(),
                subject: format!("{} cartridges", moves.len()),
                site_id: None,
                reason: "past their expiry date unused".into(),
                old_value: None,
                new_value: Some(
                    serde_json::json!({"serials": moves.iter().map(|m| &m.row.serial).collect::<Vec<_>>()})
                        .to_string(),
                ),
            };
            self.store.apply_moves(&moves, Some(&entry)).await.map_err(conflict_or)?;
            total += moves.len();
            tracing::info!(cartridges = moves.len(), "cartridges expired");
        }
    }

    /// Applies the consumption of stored batch records whose event a crash cut off
    /// (the record is stored before its cartridge's event); returns how many.
    pub async fn reconcile(&self) -> Result<usize, Error> {
        let due = self.store.unconsumed_uses(100_000).await?;
        for batch_id in &due {
            if let Some(u) = self.store.batch_cartridge(batch_id).await? {
                self.consumed(&u).await?;
            }
        }
        if !due.is_empty() {
            tracing::info!(batches = due.len(), "cartridge consumption caught up after a restart");
        }
        Ok(due.len())
    }

    // === stock ===

    /// Stock per site and type, with replenishment.
    pub async fn stock(&self, caller: &Caller, site_id: &str) -> Result<Vec<pb::StockLine>, Error> {
        let site = caller.listing_site(site_id)?;
        let site = (!site.is_empty()).then_some(site);
        let now = now_ms();
        let kinds: HashMap<String, CartridgeTypeRow> =
            self.store.cartridge_types().await?.into_iter().map(|t| (t.gtin.clone(), t)).collect();
        let mut held: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        let mut transit: BTreeMap<(String, String), u32> = BTreeMap::new();
        for h in self.store.held_cartridges(site.as_deref()).await? {
            held.entry((h.site_id, h.gtin)).or_default().push(h.expires_ms);
        }
        for s in self.store.shipments(site.as_deref(), 1000).await? {
            if s.received_ms == 0 {
                *transit.entry((s.site_id.clone(), s.gtin.clone())).or_default() +=
                    u32::try_from(s.count).unwrap_or(0);
            }
        }
        let policy_window = Policy::with_lead_time(1).window_days;
        let mut consumed: HashMap<(String, String), u32> = HashMap::new();
        for (s, g, n) in
            self.store.consumed_since(site.as_deref(), now - i64::from(policy_window) * DAY_MS).await?
        {
            consumed.insert((s.clone(), g.clone()), u32::try_from(n).unwrap_or(0));
            held.entry((s, g)).or_default();
        }
        for k in transit.keys() {
            held.entry(k.clone()).or_default();
        }
        let mut lines = Vec::new();
        for ((site_id, gtin), expiries) in held {
            let kind = kinds.get(&gtin);
            let lead = kind.map_or(7, |k| u32::try_from(k.lead_time_days).unwrap_or(7));
            let used = consumed.get(&(site_id.clone(), gtin.clone())).copied().unwrap_or(0);
            let p = replenish::position(&expiries, used, Policy::with_lead_time(lead), now);
            let in_transit = transit.get(&(site_id.clone(), gtin.clone())).copied().unwrap_or(0);
            // What is on its way counts against the order.
            let order = p.suggested_order.saturating_sub(in_transit);
            lines.push(pb::StockLine {
                site_id,
                name: kind.map(|k| k.name.clone()).unwrap_or_default(),
                gtin,
                on_hand: p.on_hand,
                usable: p.usable,
                consumption_per_day: p.rate_per_day,
                days_of_cover: p.days_of_cover,
                reorder_point: p.reorder_point,
                suggested_order: order,
                lead_time_days: lead,
                alerts: p
                    .alerts
                    .iter()
                    .map(|a| pb::StockAlert { kind: a.kind().into(), message: a.message() })
                    .collect(),
                in_transit,
            });
        }
        Ok(lines)
    }
}
